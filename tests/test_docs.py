"""The documentation stays true to the repository: generated pages, links, pointers from the code."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024

# [text](target) and ![alt](target); a target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reason_codes", ROOT / "tools" / "gen_reason_codes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def test_reason_codes_page_is_generated_from_the_code():
    expected = _generator().render()
    current = (ROOT / "docs" / "reason-codes.md").read_text(encoding="utf-8")
    assert current == expected, "docs/reason-codes.md is out of date: run python tools/gen_reason_codes.py"


def test_reason_codes_page_lists_every_code_with_advice():
    from fedimg.dicom.reasons import Reason

    text = (ROOT / "docs" / "reason-codes.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z_]+)` \|[^|]*\| (\w+) \|", text, re.M)}
    assert set(rows) == {r.value for r in Reason}
    assert [r.value for r in Reason if len(r.advice) < 10] == [], "every Reason needs its advice"
    # Spot checks of the derived status: a localizer is skipped, a truncated file refused.
    assert rows["LOCALIZER"] == "skipped" and rows["TRUNCATED"] == "refused"


def test_generator_finds_skips_in_source(tmp_path):
    (tmp_path / "m.py").write_text(
        "mark(rows, rels, SKIPPED, Reason.FOO, 'x')\n"
        "ManifestRow(r, REFUSED, Reason.BAR.value, 'y')\n"
        "ManifestRow(r, SKIPPED, Reason.BAZ.value, 'z')\n"
    )
    assert _generator().skipped_codes(tmp_path) == {"FOO", "BAZ"}


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it <= {README_LIMIT} and move detail to docs/"


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = FENCE.search(text)
    assert first_block is not None
    assert "\n## " not in text[: first_block.start()], "the two commands come before the first section"
    assert re.search(r"^make demo\b", first_block.group(0), re.M)
    assert re.search(r"^make test\b", first_block.group(0), re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert broken == [], f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_docs_pages_named_in_code_exist():
    missing = []
    for folder in ("fedimg", "jobs", "tools", "preprocessing", "benchmarks"):
        for py in sorted((ROOT / folder).rglob("*.py")):
            for name in re.findall(r"\bdocs/[\w./-]+\.md\b", py.read_text(encoding="utf-8")):
                if not (ROOT / name).is_file():
                    missing.append(f"{py.relative_to(ROOT)}: {name}")
    assert missing == []
