"""The module boundaries hold: read from every runtime module's imports (ast, nothing run).

- core/: the decoding math, pure torch: no grpc, no transformers, no other eftmesh layer;
- common/: what both services share: never either service;
- combiner/ and logit/: never each other (the in-process scorer, eftmesh.inprocess, sits above both).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "services" / "eftmesh"

FORBIDDEN = {
    "core": ("grpc", "transformers", "eftmesh.combiner", "eftmesh.logit", "eftmesh.common", "eftmesh.v1"),
    "common": ("eftmesh.combiner", "eftmesh.logit"),
    "combiner": ("eftmesh.logit",),
    "logit": ("eftmesh.combiner",),
}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (functions included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_what_it_must_not(layer):
    bad = []
    for path in sorted((ROOT / layer).glob("*.py")):
        for name in imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from eftmesh.logit.engine import ModelEngine\n")
    assert "eftmesh.logit.engine" in imports(f)
