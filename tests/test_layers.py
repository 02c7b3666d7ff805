"""The package's layers import only downward, and the store never needs torch to start."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lifelong"
# rank of each layer: a module may import modules of its own layer or of a lower rank;
# edit and eval share a rank but neither imports the other
RANK = {"foundation": 0, "store": 1, "model": 2, "edit": 3, "eval": 3, "ops": 4, "api": 5, "cli": 6}
FOUNDATION = {"errors", "facts", "policy", "deltas", "policies", ""}


def layer(module: str) -> str:
    """'lifelong.edit.keys' -> 'edit'; 'lifelong.policy' -> 'foundation'."""
    top = module.split(".")[1] if module.count(".") else ""
    return "foundation" if top in FOUNDATION else top


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lifelong"):
            yield node.module, node.lineno
            for a in node.names:
                yield f"{node.module}.{a.name}", node.lineno
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("lifelong"))


def test_every_layer_imports_only_downward():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = "lifelong." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        mine = layer(me)
        for target, line in imports(path):
            other = layer(target)
            if other not in RANK:        # a name imported from a package, e.g. lifelong.__version__
                continue
            if RANK[other] > RANK[mine] or (RANK[other] == RANK[mine] and other != mine):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mine} imports {target} ({other})")
    assert not bad, "\n".join(bad)


def test_store_and_read_only_verbs_start_without_torch():
    code = ("import sys, lifelong.store, lifelong.store.migrations, lifelong.store.location, "
            "lifelong.ops.audit, lifelong.cli; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
