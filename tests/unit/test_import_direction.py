"""The package's layering: the report reads what the studies declare (their panels, captions and
claim rules), so no study imports the report; and no function in src/ runs over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import qloc

PACKAGE = Path(qloc.__file__).parent
LONGEST_FUNCTION = 60


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, as an absolute name."""
    package = ["qloc", *path.parent.relative_to(PACKAGE).parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_studies_import_nothing_from_the_report():
    for path in sorted((PACKAGE / "studies").glob("*.py")):
        report = sorted(n for n in _imported(path) if n == "qloc.report" or n.startswith("qloc.report."))
        assert not report, f"{path.name} imports {report}"


def test_no_function_runs_over_60_lines():
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long
