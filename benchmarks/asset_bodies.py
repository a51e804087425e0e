"""Lines of every asset body (functions decorated with @dg.asset / @dg.multi_asset /
@dg.asset_check under gtex_assets/defs), the largest and the median, and the total lines of
defs/. The architecture target: bodies of about 30 lines (load, call lib, write, metadata).

    python benchmarks/asset_bodies.py [REPO_DIR]
"""

from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path

DECORATORS = {"asset", "multi_asset", "asset_check", "multi_asset_check"}


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def asset_bodies(defs_dir: Path) -> list[tuple[str, int]]:
    """(module:function, body lines without the docstring) for every decorated asset."""
    out = []
    for path in sorted(defs_dir.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            if not any(_decorator_name(d) in DECORATORS for d in fn.decorator_list):
                continue
            body = fn.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring is the asset's description, not logic
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            out.append((f"{path.relative_to(defs_dir)}:{fn.name}", lines))
    return out


def main(repo: Path) -> None:
    defs_dir = repo / "gtex_assets" / "defs"
    bodies = sorted(asset_bodies(defs_dir), key=lambda b: -b[1])
    total = sum(len(p.read_text().splitlines()) for p in defs_dir.rglob("*.py"))
    for name, n in bodies:
        print(f"{n:5d}  {name}")
    sizes = [n for _, n in bodies]
    print(
        f"\n{len(bodies)} asset/check bodies: largest {max(sizes)} lines, median "
        f"{statistics.median(sizes):g}, over 30 lines: {sum(n > 30 for n in sizes)}; "
        f"defs/ total {total} lines"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
