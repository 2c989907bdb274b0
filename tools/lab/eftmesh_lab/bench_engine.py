"""One logit engine alone: its decode step, eager against captured, beside the memory bound.

    python -m eftmesh_lab.bench_engine --model build/real-shapes/base-large --device cuda --out bench/engine-gpu.json

For each execution mode (`--cuda-graphs off`, then `auto`: captured on a GPU; with
`--torch-compile also`, then the captured steps compiled by torch.compile) the engine is
built as the logit service builds it, warmed up (capture included, timed), and N sessions,
each prefilled with a short prompt, are stepped one token at a time through `score_batch` (a
generation's decode step, rows back on the CPU): the median milliseconds per step for each N.
Beside it, the memory-bandwidth bound of one step: the weights' bytes over the HBM bandwidth
(a decode step reads every weight once; KV reads are small at these contexts). On CUDA a
torch.profiler pass over a few captured steps at N=1 counts, per step, the CPU-side launches
(kernels, graph replays, copies) and the host synchronisations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eftmesh.logit.engine import EngineConfig, ModelEngine, ScoreItem
from eftmesh.logit.buckets import GraphConfig

# Peak HBM bandwidth by device name (vendor figures, bytes/s); --hbm-gbps overrides.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}
LAUNCHES = ("cudaLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaLaunchKernelExC", "cuLaunchKernel")
SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def hbm_bandwidth(device: str, override_gbps: float | None) -> float | None:
    if override_gbps:
        return override_gbps * 1e9
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)


def weight_bytes(engine: ModelEngine) -> int:
    seen, total = set(), 0
    for p in engine.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms(engine: ModelEngine, n: int, steps: int, prompt: int = 16) -> float:
    """Median ms of one decode step of n sessions (prefilled with `prompt` tokens)."""
    ids = [[(7 * i + j) % 1000 + 4 for j in range(prompt)] for i in range(n)]
    sids = [f"b{n}-{i}" for i in range(n)]
    engine.score_batch([ScoreItem(s, 0, x, 1) for s, x in zip(sids, ids)])
    length, times = prompt, []
    try:
        for step in range(steps + 3):
            items = [ScoreItem(s, length, [5 + step % 50], 1) for s in sids]
            _sync(engine.device)
            t = time.perf_counter()
            results = engine.score_batch(items)
            _sync(engine.device)
            if step >= 3:  # the first steps of a new shape are warm-up
                times.append(time.perf_counter() - t)
            assert all(r.error is None for r in results), [r.error for r in results if r.error][:1]
            length += 1
    finally:
        for s in sids:
            engine.release(s)
    return statistics.median(times) * 1e3


STEP = "eftmesh_lab.step"  # the profiler range around each profiled step


def in_steps(events: list[Any]) -> Callable[[Any], bool]:
    """Whether an event lies inside one of the profiled steps' ranges (STEP), the CPU's ones (on
    CUDA the profiler also records each range on the GPU's timeline, where a step's work ends
    later): the profiler's own synchronise when it stops, and a harness's, fall outside."""
    cpu = torch.autograd.DeviceType.CPU
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if e.name == STEP and getattr(e, "device_type", cpu) == cpu]
    return lambda e: any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans)


def per_step(events: list[Any], steps: int) -> dict[str, Any]:
    """CPU-side launches and host syncs per step, counting only the events inside a step's
    range (`in_steps`)."""
    inside = in_steps(events)
    counts: dict[str, int] = {}
    for e in events:
        if e.name in LAUNCHES + SYNCS and inside(e):
            counts[e.name] = counts.get(e.name, 0) + 1
    launches = sum(counts.get(k, 0) for k in LAUNCHES)
    syncs = sum(counts.get(k, 0) for k in SYNCS)
    return {"steps": steps, "launches_per_step": launches / steps, "host_syncs_per_step": syncs / steps,
            "by_name": {k: counts[k] / steps for k in (*LAUNCHES, *SYNCS) if k in counts}}


def profile_counts(engine: ModelEngine, steps: int = 5) -> dict[str, Any]:
    """Per captured decode step at N=1: CPU-side launches and host syncs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    engine.score_batch([ScoreItem("p", 0, [4, 5, 6, 7], 1)])
    length = 4
    for _ in range(3):
        engine.score_batch([ScoreItem("p", length, [8], 1)])
        length += 1
    _sync(engine.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function(STEP):
                engine.score_batch([ScoreItem("p", length, [8], 1)])
            length += 1
    engine.release("p")
    return per_step(list(prof.events()), steps)


def run(model: str, device: str, dtype: str, ns: list[int], steps: int, graphs: GraphConfig,
        hbm_gbps: float | None = None, compiled_only: bool = False) -> dict[str, Any]:
    """Eager, then `graphs` (its mode, uncompiled), then with --torch-compile when graphs.compile;
    compiled_only: that last mode alone (a run of its own, after the others)."""
    out: dict[str, Any] = {"model": model, "device": device, "dtype": dtype, "modes": {}}
    bandwidth = hbm_bandwidth(device, hbm_gbps)
    plain = dataclasses.replace(graphs, compile=False)
    configs = {"off": GraphConfig("off", graphs.max_batch, graphs.max_query, graphs.max_context), graphs.mode: plain}
    if graphs.compile:
        configs[f"{graphs.mode}+compile"] = graphs
    if compiled_only:
        configs = {k: v for k, v in configs.items() if v.compile}
    for mode, mode_graphs in configs.items():
        cfg = EngineConfig(max_batch=max(ns), kv_cache_tokens=max(4096, max(ns) * 512), graphs=mode_graphs)
        started = time.perf_counter()
        engine = ModelEngine.from_pretrained(model, role="bench", device=device, dtype=dtype, config=cfg)
        load_s = time.perf_counter() - started
        engine.warmup()
        row: dict[str, Any] = {"execution": engine.info.execution, "cuda_graphs": engine.info.cuda_graphs,
                               "graph_capture_s": engine.info.graph_capture_s, "compile_s": engine.info.compile_s,
                               "graph_memory_bytes": engine.info.graph_memory_bytes,
                               "load_s": round(load_s, 2), "decode_ms": {}}
        for n in ns:
            row["decode_ms"][str(n)] = round(decode_ms(engine, n, steps), 3)
            print(f"{model} [{row['execution']}] N={n}: {row['decode_ms'][str(n)]:.2f} ms per decode step", flush=True)
        if engine.device.type == "cuda" and engine.runner.graphs:
            row["profile_n1"] = profile_counts(engine)
            print(f"  profile at N=1: {row['profile_n1']}", flush=True)
        out["weight_bytes"] = weight_bytes(engine)
        out["modes"][mode] = row
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if bandwidth:
        out["hbm_bytes_per_s"] = bandwidth
        out["bandwidth_bound_ms"] = round(out["weight_bytes"] / bandwidth * 1e3, 4)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eftmesh_lab.bench_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint folder; repeat for several")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"], help="(default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16,32", help="values of N (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per N (default: %(default)s)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "static"], help="the mode compared with off")
    p.add_argument("--cuda-graph-max-batch", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--cuda-graph-max-context", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--torch-compile", choices=["off", "also", "only"], default="off",
                   help="also: a third mode, the same graphs compiled by torch.compile (--torch-compile); only: that "
                        "mode alone (default: %(default)s)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth, GB/s (default: by device name)")
    p.add_argument("--out", default="bench/engine-gpu.json", help="JSON results (default: %(default)s)")
    a = p.parse_args(argv)
    ns = [int(x) for x in a.concurrency.split(",")]
    graphs = GraphConfig(a.cuda_graphs, a.cuda_graph_max_batch, 8, a.cuda_graph_max_context,
                         compile=a.torch_compile != "off")
    results = [run(m, a.device, a.dtype, ns, a.steps, graphs, a.hbm_gbps, compiled_only=a.torch_compile == "only")
               for m in a.model]
    doc = {"what": "decode step of one logit engine alone, eager vs captured, beside the memory-bandwidth bound",
           "machine": {"platform": platform.platform(), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else a.device},
           "args": vars(a), "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written to {a.out}", flush=True)


if __name__ == "__main__":
    main()
