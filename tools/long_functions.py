"""List functions in fedimg/ longer than a limit, docstrings excluded (the structure rule of docs/architecture.md).

Usage: python tools/long_functions.py [--limit 80]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring."""
    total = node.end_lineno - node.lineno + 1  # type: ignore[operator]
    first = node.body[0] if node.body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(getattr(first, "value", None), ast.Constant)
        and isinstance(first.value.value, str)
    ):
        total -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
    return total


def long_functions(limit: int) -> list[tuple[int, str, str]]:
    """(lines, file, name) of every function over ``limit`` lines, longest first."""
    rows = []
    for path in sorted((ROOT / "fedimg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = body_lines(node)
                if n > limit:
                    rows.append((n, path.relative_to(ROOT).as_posix(), node.name))
    return sorted(rows, reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--limit", type=int, default=80)
    for n, path, name in long_functions(p.parse_args().limit):
        print(f"{n:4d}  {path}:{name}")


if __name__ == "__main__":
    main()
