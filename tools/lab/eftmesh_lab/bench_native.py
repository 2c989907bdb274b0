"""`make bench-native`: eftmesh's own forward (`--model-impl native`, the default where it
covers the model) against transformers' (`--model-impl transformers`), side by side.

Two parts, both on the demo checkpoints, plain EFT, greedy, one torch thread per model:

1. **The step alone**: each role's engine in this process, and SmolLM2-135M-Instruct's (a real
   Llama, from the GGUF bench_vocab fetches; `--no-smollm2` skips it), both implementations
   over the same weights, timing decode steps of N rows at a fixed context (medians of
   alternating rounds), and checking that the two give the same logits bit for bit.
2. **The mesh**: two meshes at once, one per implementation, beside `lockstep` (bench_load's
   one-process loop running transformers' eager forward over the same three checkpoints: the
   in-process reference of issue 15's point 6), repetitions alternating between the three.

    python -m eftmesh_lab.bench_native --concurrency 1,4,16 --reps 5 --out bench/native.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from eftmesh_lab.bench_compile import mesh_tables, sweep_meshes
from eftmesh_lab.bench_load import COMPOSITION, ROLES, machine, write
from eftmesh.launcher import resolve_models
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit.placement import load_model

IMPLS = ("transformers", "native")
SYSTEMS = ("lockstep", "mesh-plain transformers", "mesh-plain native")


def step_times(path: Path, rows: int, context: int, steps: int, rounds: int) -> dict:
    """Median ms of one decode step of `rows` rows at `context` tokens, per implementation,
    rounds alternating; and whether every step's logits were equal between the two."""
    model, tok, _ = load_model(str(path), role="bench")
    engines = {impl: ModelEngine(model, tok, model_id="bench", role="bench", graphs=GraphConfig(mode="off"),
                                 kv_cache_tokens=rows * (context + steps * rounds + 64), max_batch=max(rows, 1),
                                 model_impl=impl) for impl in IMPLS}
    g = torch.Generator().manual_seed(0)
    prompts = {f"s{i}": torch.randint(1, len(tok), (context,), generator=g).tolist() for i in range(rows)}
    for e in engines.values():
        e.score_batch([ScoreItem(sid, 0, p, 1) for sid, p in prompts.items()])
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    equal, length = True, context
    for _ in range(rounds):
        rows_out = {}
        for impl, e in engines.items():
            at = length
            started = time.perf_counter()
            for k in range(steps):
                out = e.score_batch([ScoreItem(sid, at + k, [7 + k], 1) for sid in prompts])
            times[impl].append((time.perf_counter() - started) / steps * 1e3)
            rows_out[impl] = torch.stack([r.rows for r in out])
        equal = equal and torch.equal(rows_out["transformers"], rows_out["native"])
        length += steps
    med = {impl: statistics.median(v) for impl, v in times.items()}
    return {"rows": rows, "context": context, "ms": med, "speedup": med["transformers"] / med["native"],
            "rounds_ms": times, "bitwise_equal": equal}


def markdown(out: dict) -> str:
    lines = ["| model | rows | transformers ms | native ms | speedup | equal |", "|---|---|---|---|---|---|"]
    for role, rows in out["step"].items():
        for r in rows:
            lines.append(f"| {role} | {r['rows']} | {r['ms']['transformers']:.2f} | {r['ms']['native']:.2f} | "
                         f"{r['speedup']:.2f}x | {r['bitwise_equal']} |")
    ns = out["concurrency"]
    lines += ["", "| system | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for name, row in out["tokens_per_s"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.1f}" for n in ns) + " |")
    for name, row in out["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.2f}" for n in ns) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eftmesh-bench-native", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="checkpoint per role (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16", help="values of N for the meshes, comma-separated (default: %(default)s)")
    p.add_argument("--step-rows", default="1,16", help="rows of the step-alone part, comma-separated (default: %(default)s)")
    p.add_argument("--no-smollm2", dest="smollm2", action="store_false",
                   help="leave SmolLM2-135M-Instruct (a real Llama; needs the real-models extra) out of the step-alone part")
    p.add_argument("--context", type=int, default=100, help="context of the step-alone part, tokens (default: %(default)s)")
    p.add_argument("--max-new", type=int, default=64, help="new tokens per generation, EOS ignored (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per system and N; medians reported (default: %(default)s)")
    p.add_argument("--port", type=int, default=50670, help="first port of the transformers mesh; the native one takes +10 (default: %(default)s)")
    p.add_argument("--out", default="bench/native.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="bench/native.png", help="plot of tokens/s against N; empty for none (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(1)
    roles = {r: path for r, path in resolve_models(Path(a.models)).items() if r in ROLES}
    models = dict(roles)
    if a.smollm2:
        from eftmesh_lab.bench_vocab import prepare_smollm2

        models["SmolLM2-135M-Instruct"] = prepare_smollm2(Path("build"))
    step = {}
    for role, path in models.items():
        step[role] = [step_times(path, int(n), a.context, steps=8, rounds=7) for n in a.step_rows.split(",") if n]
        print(f"{role}: " + ", ".join(f"{r['rows']} rows {r['ms']['transformers']:.2f} -> {r['ms']['native']:.2f} ms "
                                      f"(equal: {r['bitwise_equal']})" for r in step[role]), flush=True)
    ns = sorted({int(n) for n in a.concurrency.split(",") if n})
    variants = {SYSTEMS[1]: ["--model-impl", "transformers"], SYSTEMS[2]: ["--model-impl", "native"]}
    runs, info, startup = sweep_meshes(a, variants, Path("build/bench-native"))
    out = {
        "what": "eftmesh's own forward (--model-impl native) against transformers' (--model-impl transformers): "
                "decode step times in one process, and EFT up-scaling through two meshes beside lockstep, plain, "
                "greedy; tokens/s medians over alternating repetitions",
        "composition": COMPOSITION, "max_new": a.max_new, "concurrency": ns, "machine": machine("cpu"),
        "args": {**vars(a), "dtype": "float32"}, "step": step,
        **mesh_tables(runs, SYSTEMS, "native / transformers mesh"),
        "services": info, "startup_s": startup, "poisson": None,
    }
    write(out, markdown(out), a.out, a.plot)


if __name__ == "__main__":
    main()
