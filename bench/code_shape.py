"""The shape of the package's code, as the layered-core issue measures it: the longest function
and class (lines, decorators excluded), how many exceed 60 and 250 lines, and the imports of our
own modules made inside functions outside the command-line front (`cli/`, `__main__.py`) and
the package's `__init__.py` (TYPE_CHECKING blocks are not imports at run time).

    python bench/code_shape.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "microtune"
FRONT = {"__main__.py", "__init__.py"}


def _ours(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "microtune"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "microtune" for alias in node.names)
    return False


def main() -> None:
    functions, classes, lazy = [], [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((size, f"{where}:{node.lineno} {node.name}"))
                if where.parts[0] != "cli" and str(where) not in FRONT:
                    lazy += [f"{where}:{n.lineno}" for n in ast.walk(node) if _ours(n)]
            elif isinstance(node, ast.ClassDef):
                classes.append((size, f"{where}:{node.lineno} {node.name}"))
    functions.sort(reverse=True)
    classes.sort(reverse=True)
    print(f"files: {len(list(PACKAGE.rglob('*.py')))}")
    print(f"longest function: {functions[0][1]} ({functions[0][0]} lines)")
    print(f"longest class: {classes[0][1]} ({classes[0][0]} lines)")
    print(f"functions over 60 lines: {sum(size > 60 for size, _ in functions)}")
    print(f"classes over 250 lines: {sum(size > 250 for size, _ in classes)}")
    print(f"function-level imports of microtune outside cli/, __main__, __init__: {len(lazy)}")
    for hit in lazy:
        print(f"  {hit}")


if __name__ == "__main__":
    main()
