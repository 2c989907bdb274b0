"""The GPU run's figures against issue 15's "done when" list, in one table.

`bash bench/gpu.sh` ends with this: it reads what the run wrote to its results folder and
says, target by target, what was measured, the bound, and whether it passed, so that the
session holding the device sees at once what is met and what to look at next:

    python -m eftmesh_lab.gpu_targets --results bench      # bench/gpu-targets.json and a table

engine-gpu.json (eftmesh_lab.bench_engine: the engine alone, eager and captured, for the demo
base-large and the real 1B shape), load-gpu.json (bench_load on the demo family) and
load-gpu-real.json (bench_load on the real-shape family). A file or a figure the run did not
produce is "not measured", never a pass. Only reads JSON: no GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eftmesh_lab.bench_load import PASSED, check

REAL_MODEL = "real-shapes"  # bench/gpu.sh builds the 1B shape in build/real-shapes/base-large


@dataclass(frozen=True)
class Target:
    name: str
    family: str  # "demo" or "real"
    source: str  # which file the value comes from
    op: str  # ">=" or "<="
    bound: float
    unit: str


TARGETS = (
    Target("mesh plain, 1 stream", "demo", "load-gpu.json", ">=", 200.0, "tokens/s"),
    Target("mesh plain 1 stream / hf-generate base-large 1 stream", "demo", "load-gpu.json", ">=", 2.0, "x"),
    Target("mesh plain, 32 streams", "demo", "load-gpu.json", ">=", 5000.0, "tokens/s"),
    Target("base-large captured decode step, N=1", "real", "engine-gpu.json", "<=", 3.0, "ms"),
    Target("base-large captured decode step, N=32", "real", "engine-gpu.json", "<=", 6.0, "ms"),
    Target("mesh plain, 1 stream", "real", "load-gpu-real.json", ">=", 150.0, "tokens/s"),
    Target("mesh plain, 32 streams", "real", "load-gpu-real.json", ">=", 3000.0, "tokens/s"),
    Target("host syncs per captured step", "real", "engine-gpu.json", "<=", 1.0, ""),
    Target("CPU-side launches per captured step", "real", "engine-gpu.json", "<=", 20.0, ""),
)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tokens(doc: dict | None, system: str, n: int) -> float | None:
    if doc is None:
        return None
    v = doc.get("tokens_per_s", {}).get(system, {}).get(str(n))
    return None if v is None else float(v)


def _engine_row(doc: dict | None, family: str) -> dict | None:
    """The engine benchmark's result for the family's base-large (the real shape's path holds
    REAL_MODEL; the demo's does not)."""
    if doc is None:
        return None
    for r in doc.get("results", []):
        if (REAL_MODEL in str(r.get("model", ""))) == (family == "real"):
            return r
    return None


def _captured(row: dict | None) -> dict | None:
    """The row's captured mode, when it really ran captured graphs."""
    if row is None:
        return None
    for mode in row.get("modes", {}).values():
        if mode.get("execution") == "cuda-graphs":
            return mode
    return None


def measure(t: Target, docs: dict[str, dict | None]) -> float | None:
    """The value a target compares, from the run's files; None where it was not measured."""
    if t.source.startswith("load-gpu"):
        doc = docs[t.source]
        if t.name.startswith("mesh plain 1 stream /"):
            mesh, hf = _tokens(doc, "mesh-plain", 1), _tokens(doc, "hf-generate", 1)
            return mesh / hf if mesh is not None and hf else None
        return _tokens(doc, "mesh-plain", 32 if "32" in t.name else 1)
    mode = _captured(_engine_row(docs[t.source], t.family))
    if mode is None:
        return None
    if "decode step" in t.name:
        v = mode.get("decode_ms", {}).get("32" if "N=32" in t.name else "1")
        return None if v is None else float(v)
    profile = mode.get("profile_n1") or {}
    return profile.get("host_syncs_per_step" if "syncs" in t.name else "launches_per_step")


def evaluate(results: Path) -> dict[str, Any]:
    docs = {name: _load(results / name) for name in ("engine-gpu.json", "load-gpu.json", "load-gpu-real.json")}
    rows = []
    for t in TARGETS:
        v = measure(t, docs)
        rows.append({"family": t.family, "target": t.name, "value": v, "op": t.op, "bound": t.bound,
                     "unit": t.unit, "pass": check(v, t.op, t.bound), "source": t.source})
    context = {}
    for family in ("demo", "real"):
        row = _engine_row(docs["engine-gpu.json"], family)
        if row is not None:
            context[family] = {
                "bandwidth_bound_ms": row.get("bandwidth_bound_ms"),
                "eager_decode_ms": row.get("modes", {}).get("off", {}).get("decode_ms"),
                "graph_capture_s": (_captured(row) or {}).get("graph_capture_s"),
                "graph_memory_bytes": (_captured(row) or {}).get("graph_memory_bytes"),
                "execution": [m.get("execution") for m in row.get("modes", {}).values()],
            }
    missing = [name for name, doc in docs.items() if doc is None]
    return {"what": "issue 15's GPU targets against the figures of one bench/gpu.sh run", "results": str(results),
            "targets": rows, "engine": context, "missing_files": missing}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| family | target | measured | bound | pass |", "|---|---|---|---|---|"]
    for r in doc["targets"]:
        v = "-" if r["value"] is None else f"{r['value']:.2f} {r['unit']}".strip()
        lines.append(f"| {r['family']} | {r['target']} | {v} | {(r['op'] + ' ' + format(r['bound'], 'g') + ' ' + r['unit']).strip()} | {PASSED[r['pass']]} |")
    for family, e in doc["engine"].items():
        lines.append(f"\n{family} base-large: memory-bandwidth bound {e['bandwidth_bound_ms']} ms per step; eager decode "
                     f"{e['eager_decode_ms']} ms; capture {e['graph_capture_s']} s keeping "
                     f"{e.get('graph_memory_bytes')} bytes; modes run: {e['execution']}")
    if doc["missing_files"]:
        lines.append(f"\nnot written by the run: {', '.join(doc['missing_files'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eftmesh_lab.gpu_targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="bench", help="the folder bench/gpu.sh wrote to (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON summary (default: RESULTS/gpu-targets.json)")
    a = p.parse_args(argv)
    results = Path(a.results)
    doc = evaluate(results)
    out = Path(a.out) if a.out else results / "gpu-targets.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))
    print(f"written to {out}", flush=True)


if __name__ == "__main__":
    main()
