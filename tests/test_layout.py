"""The size limits of the code: at most 6 modules at the package's top level, no module over 350 lines and no
function over 60 lines, except those the README's Architecture section lists with a reason. A listed
exception that is no longer over the limit fails too, so the list says what is true today."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "wanda"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 6


def _listed(kind: str) -> set[str]:
    """The names in the first column of the README table whose header starts with ``| kind |``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    in_table = False
    for line in section.splitlines():
        if line.startswith(f"| {kind} |"):
            in_table = True
        elif in_table and line.startswith("| `"):
            names.add(re.match(r"\| `([^`]+)`", line).group(1))
        elif in_table and not line.startswith("|"):
            in_table = False
    return names


def _functions() -> dict[str, int]:
    """Qualified name (wanda.pkg.module.function, methods as module.Class.method) -> lines, docstring included."""
    out: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{prefix}.{child.name}"] = child.end_lineno - child.lineno + 1
                    visit(child, f"{prefix}.{child.name}")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}.{child.name}")

        visit(tree, module)
    return out


def test_the_top_level_holds_at_most_six_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_no_module_is_over_the_limit_unless_listed():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}
    over = {name for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    listed = _listed("module")
    assert over <= listed, f"over {MAX_MODULE_LINES} lines and not listed in the README: {sorted(over - listed)}"
    assert listed <= over, f"listed in the README but no longer over the limit: {sorted(listed - over)}"


def test_no_function_is_over_the_limit_unless_listed():
    over = {name for name, lines in _functions().items() if lines > MAX_FUNCTION_LINES}
    listed = _listed("function")
    assert over <= listed, f"over {MAX_FUNCTION_LINES} lines and not listed in the README: {sorted(over - listed)}"
    assert listed <= over, f"listed in the README but no longer over the limit: {sorted(listed - over)}"
