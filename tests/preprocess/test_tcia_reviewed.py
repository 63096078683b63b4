"""The TCIA recipe with de-identification on: refused without a person's review, converted with one, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedimg import config as cfg
from fedimg.cli import main
from tests.conftest import MR_SPEC, shared

pytestmark = pytest.mark.slow


def _rows(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    from fedimg.dicom.deid import SiteSecret

    SiteSecret.generate(tmp_path / "site.secret")
    return tmp_path / "site.secret"


def _preprocess(src, dst, secret, *extra: str) -> int:
    """``fedimg preprocess`` of the TCIA export with the MR spec and the site secret, quiet."""
    return main(
        ["preprocess", str(src), str(dst), "--spec", str(MR_SPEC), "--secret-file", str(secret), "--quiet", *extra]
    )


def test_tcia_export_is_refused_under_deid_with_a_clear_reason_and_partner_rows(tmp_path, secret, capsys):
    src = shared("dicom/tcia_brain_tumor_progression")
    dst = tmp_path / "refused"
    rc = _preprocess(src, dst, secret, "--site", "tcia", "--crosswalk", str(tmp_path / "cw.jsonl"))
    err = capsys.readouterr().err
    assert rc == 3 and "no case was converted" in err  # exits non-zero: nothing usable
    rows = _rows(dst)
    crosswalk = {r["input_hash"]: r["input"] for r in map(json.loads, (tmp_path / "cw.jsonl").read_text().splitlines())}
    mask = [r for r in rows if "MaskTumor" in crosswalk[r["input"]]]
    t1 = [r for r in rows if "T1post" in crosswalk[r["input"]]]
    assert mask and all(r["reason"] == "BURNED_IN_ANNOTATION" for r in mask)
    # The mask's refusal says the files declare themselves de-identified, and names the alternatives.
    assert "(0012,0062) Patient Identity Removed YES" in mask[0]["detail"] and "--no-deid" in mask[0]["detail"]
    assert "deid.burned_in_reviewed" in mask[0]["detail"]
    # The T1 images were refused only because of their mask: their own reason, naming the partner's.
    assert t1 and all(r["reason"] == "PARTNER_REFUSED" and "BURNED_IN_ANNOTATION" in r["detail"] for r in t1)
    assert all("Patient Identity Removed" not in r["detail"] for r in t1)


def test_a_reviewed_override_in_the_site_config_converts_and_is_recorded(tmp_path, secret, capsys):
    src = shared("dicom/tcia_brain_tumor_progression")
    site = tmp_path / "site.yaml"
    site.write_text(
        "name: tcia\ndatalist: out/datalist.json\ndeid:\n  burned_in_reviewed:\n"
        "    - series_description: '(?i)mask.?tumou?r'\n      sop_class_uid: 1.2.840.10008.5.1.4.1.1.7\n"
        "      reviewed_by: A. Reviewer (radiology)\n      date: 2026-12-01\n"
        "      note: binary tumour masks made by the curators; no text in the pixels\n"
    )
    assert cfg.load(cfg.SiteConfig, site).deid.burned_in_reviewed[0].date == "2026-12-01"
    dst = tmp_path / "out"
    rc = _preprocess(src, dst, secret, "--site-config", str(site))
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((dst / "summary.json").read_text())
    assert len(summary["cases"]) == 3 and summary["patients"] == 2
    reviewed = [r for r in _rows(dst) if r.get("review")]
    labels = [r for r in _rows(dst) if r.get("role") == "label"]
    assert reviewed and {r["input"] for r in reviewed} == {r["input"] for r in labels}
    assert all(
        r["review"].startswith("burned-in text risk accepted by review 1 (reviewed by A. Reviewer") for r in reviewed
    )
    assert summary["reviews_used"] == {
        "burned-in text risk accepted by review 1 (reviewed by A. Reviewer (radiology), 2026-12-01)": len(reviewed)
    }
    assert "converted by a person's decision" in out


def test_a_review_entry_must_name_a_person_and_a_series(tmp_path):
    for body, match in (
        ("    - series_description: mask\n      date: 2026-12-01\n", "reviewed_by"),
        ("    - reviewed_by: A\n      date: 2026-12-01\n", "series_description"),
        ("    - reviewed_by: A\n      date: x\n      series_description: '(['\n", "regular expression"),
    ):
        path = tmp_path / "s.yaml"
        path.write_text("name: s\ndatalist: d.json\ndeid:\n  burned_in_reviewed:\n" + body)
        with pytest.raises(cfg.ConfigError, match=match):
            cfg.load(cfg.SiteConfig, path)
