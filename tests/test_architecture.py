"""Import rules of ARCHITECTURE.md, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO


def _imports(path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    return mods


def test_only_fedimg_fl_imports_nvflare():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "fedimg").rglob("*.py")
        if "fl" not in p.relative_to(REPO / "fedimg").parts[:1]
        and any(m.split(".")[0] == "nvflare" for m in _imports(p))
    ]
    assert not offenders


def test_training_does_not_import_fl_and_fedimg_never_imports_jobs():
    for p in (REPO / "fedimg").rglob("*.py"):
        mods = _imports(p)
        assert not any(m.startswith(("jobs", "preprocessing")) for m in mods), p
        if p.parent.name in ("training", "data", "models", "tasks"):
            assert not any(m.startswith("fedimg.fl") for m in mods), p


def test_importing_fedimg_prints_nothing():
    out = subprocess.run(
        [sys.executable, "-c", "import fedimg, fedimg.config, fedimg.runtime, fedimg.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "" and out.stderr == ""
