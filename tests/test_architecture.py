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


#: What each part of fedimg may import from the rest of fedimg (docs/architecture.md, "Import rules").
#: A part absent here imports no other part. Lazy imports inside functions count too.
ALLOWED = {
    "runtime": {"errors"},
    "gpucheck": {"runtime"},
    "dicom": {"errors", "safepath"},
    "config": {"errors", "dicom"},
    "datalist": {"atomic", "config", "errors"},
    "preprocess": {"atomic", "config", "datalist", "dicom", "errors", "safepath", "signals"},
    "pacs": {"atomic", "errors", "preprocess", "safepath"},
    "data": {"config", "datalist"},
    "models": {"config", "errors"},
    "tasks": {"config", "runtime"},
    "training": {"config", "data", "models", "runtime", "tasks"},
    "fl": {"config", "errors", "models", "resources", "runtime", "signals", "tasks", "training"},
    "predict": {"atomic", "config", "dicom", "models", "preprocess", "runtime", "tasks"},
}
TOP = {"cli", "demo", "compare"}  # orchestration: may import any part, and nothing imports them


def _fedimg_parts(path) -> set[str]:
    """The top-level fedimg parts (package or module) that one source file imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            names = ["fedimg.<relative>"]
        elif isinstance(node, ast.ImportFrom) and node.module == "fedimg":
            names = [f"fedimg.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        parts |= {n.split(".")[1] for n in names if n.startswith("fedimg.")}
    return parts


def _part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for p in (REPO / "fedimg").rglob("*.py"):
        part = p.relative_to(REPO / "fedimg").parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        graph.setdefault(part, set()).update(_fedimg_parts(p) - {part, "__version__"})
    return graph


def test_parts_import_in_one_direction():
    graph = _part_graph()
    assert "<relative>" not in set().union(*graph.values()), "use absolute fedimg imports"
    wrong = {
        part: sorted(deps - ALLOWED.get(part, set()))
        for part, deps in graph.items()
        if part not in TOP and deps - ALLOWED.get(part, set())
    }
    assert not wrong, f"imports against the layering: {wrong}"
    assert not any(TOP & deps for part, deps in graph.items() if part not in TOP)


def test_the_layering_rule_catches_a_cycle(tmp_path):
    # The check above is only as good as its parser: a lazy import inside a function, and the
    # ``from fedimg import x`` form, are both seen.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from fedimg.predict.report import COLOURS\n\nfrom fedimg import fl\n")
    assert _fedimg_parts(f) == {"predict", "fl"}


def test_importing_fedimg_prints_nothing():
    out = subprocess.run(
        [sys.executable, "-c", "import fedimg, fedimg.config, fedimg.runtime, fedimg.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "" and out.stderr == ""
