"""New studies at a site: incremental preprocessing, then the federation resumed from its saved global model.

End to end from DICOM: synthetic DX radiographs with label sheets ->
``fedimg preprocess`` (de-identified, labels from the CSV) -> 2 rounds of
federated 2D classification -> site-1 receives new studies -> incremental
preprocessing (old cases reused, their splits fixed) -> 2 more rounds resumed
from the saved global model, numbered 2 and 3, with site-1 now training on
more cases.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fedimg import config as cfg
from tests.conftest import REPO

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]
DX_SPEC = REPO / "configs" / "preprocessing" / "dx_chest_cls.yaml"


def _datalist(path):
    dl = json.loads(path.read_text())
    return {it["case_id"]: split for split in ("training", "validation") for it in dl[split]}


def test_incremental_preprocessing_then_resumed_training(tmp_path):
    from fedimg.dicom.deid import Pseudonymizer, SiteSecret
    from fedimg.fl.simulate import run_simulation
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.synth import generate
    from tests.conftest import tiny_classification

    small = generate(tmp_path / "small", n_sites=2, n_cases=6, seed=5, progress=False, modality="DX")
    big = generate(tmp_path / "big", n_sites=2, n_cases=12, seed=5, progress=False, modality="DX")
    spec = cfg.load(cfg.PreprocessSpec, DX_SPEC, ["target_size=[32, 32]"])
    export = tmp_path / "pacs"
    shutil.copytree(small.out_dir, export)
    site_cfgs, secrets = {}, {}
    for site in ("site-1", "site-2"):
        secrets[site] = Pseudonymizer(SiteSecret.generate(tmp_path / f"{site}.secret"))
        preprocess(
            export / site,
            tmp_path / "pre" / site,
            spec,
            site=site,
            progress=False,
            pseudonymizer=secrets[site],
            labels_csv=export / site / "labels.csv",
        )
        cfg.save(
            cfg.SiteConfig(
                name=site, datalist=str(tmp_path / "pre" / site / "datalist.json"), device="cpu", num_threads=1
            ),
            tmp_path / f"{site}.yaml",
        )
        site_cfgs[site] = str(tmp_path / f"{site}.yaml")
    before = _datalist(tmp_path / "pre" / "site-1" / "datalist.json")

    exp = tiny_classification(
        2, name="newdata", **{"fed.cross_site_eval": "false", "task.class_names": "[no_lesion, lesion]"}
    )
    first = run_simulation(exp, REPO / "jobs" / "train", site_cfgs, tmp_path / "ws1")

    # site-1's PACS export grows (the old files untouched); its preprocessing runs again into the same folder.
    src = big.out_dir / "site-1"
    for study in src.glob("*/*"):
        dest = export / "site-1" / study.relative_to(src)
        if study.is_dir() and not dest.exists():
            shutil.copytree(study, dest)
    shutil.copy2(src / "labels.csv", export / "site-1" / "labels.csv")
    res = preprocess(
        export / "site-1",
        tmp_path / "pre" / "site-1",
        spec,
        site="site-1",
        progress=False,
        pseudonymizer=secrets["site-1"],
        labels_csv=export / "site-1" / "labels.csv",
    )
    after = _datalist(tmp_path / "pre" / "site-1" / "datalist.json")
    assert len(after) > len(before)
    assert all(after[c] == s for c, s in before.items())  # no case changed split: no validation case trains
    summary = json.loads((tmp_path / "pre" / "site-1" / "summary.json").read_text())
    assert summary["cases_reused"] == len(before), summary
    assert summary["cases_converted"] == len(after) - len(before), summary
    assert len(res.cases) == len(after)

    second = run_simulation(exp, REPO / "jobs" / "train", site_cfgs, tmp_path / "ws2", resume_from=first)
    rounds = [r for r in second.rounds if not r.get("final_eval")]
    assert [r["round"] for r in rounds] == [2, 3]
    # site-1 trains on its new cases too: more optimizer steps per round than before.
    old = [r["weights"]["site-1"] for r in first.rounds if not r.get("final_eval")]
    new = [r["weights"]["site-1"] for r in rounds]
    assert min(new) > max(old)
    assert second.global_metrics[0]["step"] == 2
    assert second.summary["start_round"] == 2 and second.summary["end_round"] == 4
