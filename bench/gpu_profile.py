#!/usr/bin/env python
"""Why is the paged-KV engine's decode step slow on a GPU? One short, self-contained run.

    PYTHONPATH=services:tools/lab python bench/gpu_profile.py --device cuda            # bf16, report to bench/gpu-profile.txt
    PYTHONPATH=services:tools/lab .venv/bin/python bench/gpu_profile.py --device cpu --out /tmp/prof.txt

Uses only torch, transformers, eftmesh and the lab's step ranges (eftmesh_lab.bench_engine:
services/ and tools/lab/ on PYTHONPATH, as bench/gpu.sh sets them); no network. Sections, each
guarded by a time budget (--budget-s, default 110 s; a section that would start past it is
skipped) and written to the report as soon as it is done:

 1. ModelEngine.from_pretrained(models/demo/base-large), as the logit service builds it (server
    defaults), warmup(); then N=1 and N=16 sessions each prefilled with a short prompt and stepped
    one token at a time through score_batch (a generation's decode step): median ms per step.
 2. The same model under plain transformers: forward with a DynamicCache and one token ("hf-plain"),
    and the way bench_load's "lockstep" calls it ("hf-lockstep": 2-D attention_mask grown with
    torch.cat, explicit position_ids, logits_to_keep=1, log_softmax in float32); and the whole
    lockstep step of bench_load (base-large + base-small + ft-small, plain transformers, no eftmesh).
 3. torch.profiler over a few decode steps at N=1 of each: top ops by self CPU and by self CUDA time,
    and per step: aten ops (all / top level), GPU kernels, cudaLaunchKernel, memcpy (HtoD/DtoH),
    stream/device synchronizations, aten::item/_local_scalar_dense, aten::to/_to_copy/copy_;
    engine phases are labelled (eftmesh::...) by wrapping BatchView/PagedKVPool methods in this
    process only (the source files are not touched).
 4. Where the host waits: on cuda torch.cuda.set_sync_debug_mode("warn") over two steps of each,
    every synchronizing call with its Python file:line; on every device a TorchFunctionMode that
    names the exact file:line of every .item()/.tolist()/.cpu()/int()/.to(device)/copy_ and every
    tensor factory call (torch.tensor/zeros/arange/... and whether it makes it on the CPU).
 5. The thread count: the benchmark ran torch.set_num_threads(1); the N=1 timings again with
    torch's default thread count.

They run in the order 1, 2, 3, 4, 5, then a summary (the engine's phases are attributed by the
labels of section 3, not by a copy of its code);
a section that fails prints its traceback into the report and the run goes on. Each timing is
the median over --steps calls, or over those that fit in 2.5 s (at least 5).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from eftmesh.logit import engine as engine_mod
from eftmesh.logit import kvcache, placement
from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh_lab.bench_engine import STEP, in_steps

ROOT = Path(__file__).resolve().parent.parent
PREFILL = 16  # prompt tokens of each session before the decode steps
# Per-step counters: (label, predicate on an event name)
COUNTERS: list[tuple[str, Callable[[str], bool]]] = [
    ("cudaLaunchKernel*", lambda n: n.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperative"))),
    ("cudaMemcpy*", lambda n: n.startswith(("cudaMemcpy", "cuMemcpy"))),
    ("Memcpy HtoD (device side)", lambda n: "Memcpy HtoD" in n),
    ("Memcpy DtoH (device side)", lambda n: "Memcpy DtoH" in n),
    ("cudaMemsetAsync", lambda n: n.startswith("cudaMemset")),
    ("cudaStreamSynchronize", lambda n: n == "cudaStreamSynchronize"),
    ("cudaDeviceSynchronize", lambda n: n == "cudaDeviceSynchronize"),
    ("cudaEventSynchronize", lambda n: n == "cudaEventSynchronize"),
    ("cudaMalloc/cudaFree/cudaHostAlloc", lambda n: n in ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost",
                                                          "cudaFreeHost")),
    ("aten::item", lambda n: n == "aten::item"),
    ("aten::_local_scalar_dense", lambda n: n == "aten::_local_scalar_dense"),
    ("aten::nonzero / is_nonzero", lambda n: n in ("aten::nonzero", "aten::is_nonzero")),
    ("aten::to", lambda n: n == "aten::to"),
    ("aten::_to_copy", lambda n: n == "aten::_to_copy"),
    ("aten::copy_", lambda n: n == "aten::copy_"),
    ("aten::index_select", lambda n: n == "aten::index_select"),
    ("aten::index_copy_", lambda n: n == "aten::index_copy_"),
    ("aten::scaled_dot_product_attention", lambda n: n == "aten::scaled_dot_product_attention"),
    ("aten::tensor creations (empty/zeros/arange/lift_fresh)",
     lambda n: n in ("aten::empty", "aten::zeros", "aten::arange", "aten::lift_fresh", "aten::empty_strided")),
]


# ---- output -------------------------------------------------------------------------------------

class Report:
    """Every line to stdout and to the report file (flushed as it goes: a killed run keeps what it had)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = path.open("w")

    def __call__(self, *lines: str) -> None:
        for text in lines:
            print(text, flush=True)
            self.f.write(text + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed


# ---- helpers ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], Any], device: torch.device, steps: int, warm: int = 3,
              max_s: float = 2.5) -> tuple[float, float, float, int]:
    """(median, min, max) milliseconds of one call of step, synchronised around each call, and the
    number of calls timed: `steps`, or fewer (at least 5) when they take longer than max_s."""
    for _ in range(warm):
        step()
    times: list[float] = []
    t_end = time.perf_counter() + max_s
    for _ in range(steps):
        if len(times) >= 5 and time.perf_counter() > t_end:
            break
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times), len(times)


def prompt(i: int, n: int = PREFILL) -> list[int]:
    """A deterministic prompt of n token ids (inside the demo vocabulary), different per session."""
    return [(7 + 31 * i + 13 * j) % 1000 + 3 for j in range(n)]


def cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.24 renames past_key_values to cache (as bench_load does)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_dynamic_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


# ---- the engine ---------------------------------------------------------------------------------

class EngineGen:
    """n sessions of one engine, prefilled, then stepped one greedy token each per score_batch."""

    def __init__(self, eng: ModelEngine, n: int, tag: str) -> None:
        self.eng = eng
        self.sids = [f"prof-{tag}-{n}-{i}" for i in range(n)]
        res = eng.score_batch([ScoreItem(sid, 0, prompt(i), 1) for i, sid in enumerate(self.sids)])
        self._take(res)

    def _take(self, res: list[engine_mod.ItemResult]) -> None:
        for r in res:
            if r.error is not None:
                raise r.error
        self.lengths = [r.cache_length for r in res]
        self.next = [int(r.rows[-1].float().argmax()) for r in res]  # rows are on the CPU already

    def step(self) -> None:
        if max(self.lengths) + 2 > self.eng.max_context:  # keep going on long runs: roll back to the prompt
            self.lengths = [PREFILL] * len(self.sids)
        self._take(self.eng.score_batch(
            [ScoreItem(sid, L, [t], 1) for sid, L, t in zip(self.sids, self.lengths, self.next)]))

    def close(self) -> None:
        for sid in self.sids:
            self.eng.release(sid)


def label_engine_phases() -> None:
    """Wrap the engine's and the pool's methods in record_function labels (this process only)."""

    def wrap(cls: type, name: str) -> None:
        fn = getattr(cls, name)

        @functools.wraps(fn)
        def labelled(*a: Any, **k: Any) -> Any:
            with torch.profiler.record_function(f"eftmesh::{cls.__name__}.{name}"):
                return fn(*a, **k)

        setattr(cls, name, labelled)

    for cls, names in ((kvcache.BatchView, ("__init__", "attention_mask", "update", "_indices")),
                       (kvcache.PagedKVPool, ("slots",)),
                       (ModelEngine, ("_admit", "_run", "_forward"))):
        for name in names:
            wrap(cls, name)


# ---- plain transformers --------------------------------------------------------------------------

class HFGen:
    """n rows through a transformers model with a DynamicCache, one greedy token per step.

    style "plain": model(input_ids=[n, 1], cache) and nothing else (what generate's step boils down to);
    style "lockstep": as bench_load's lockstep calls each model (2-D mask grown by torch.cat, explicit
    position_ids, logits_to_keep=1, log_softmax of the float logits).
    """

    def __init__(self, model: torch.nn.Module, n: int, style: str, device: torch.device) -> None:
        self.model, self.style, self.kw = model, style, cache_kwarg(model)
        ids = torch.tensor([prompt(i) for i in range(n)], device=device)
        self.mask = torch.ones_like(ids)
        self.pos = torch.arange(ids.shape[1], device=device)[None, :].expand(n, -1)
        self.cache = new_dynamic_cache(model)
        with torch.inference_mode():
            self.tok = self._call(ids, first=True)

    def _call(self, ids: torch.Tensor, first: bool = False) -> torch.Tensor:
        if self.style == "plain":
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
            return out.logits[:, -1].argmax(-1, keepdim=True)
        if not first:
            self.pos = self.pos[:, -1:] + 1
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         logits_to_keep=1, **{self.kw: self.cache})
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).argmax(-1, keepdim=True)

    def step(self) -> None:
        with torch.inference_mode():
            self.tok = self._call(self.tok)


class LockstepGen:
    """bench_load's lockstep_generate step for N rows: three models, the EFT combination, argmax."""

    def __init__(self, models: dict[str, torch.nn.Module], n: int, device: torch.device) -> None:
        self.models = models
        self.kw = {r: cache_kwarg(m) for r, m in models.items()}
        self.ids = torch.tensor([prompt(i) for i in range(n)], device=device)
        self.mask = torch.ones_like(self.ids)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.caches = {r: new_dynamic_cache(m) for r, m in models.items()}

    def _lp(self, r: str) -> torch.Tensor:
        out = self.models[r](input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                             logits_to_keep=1, **{self.kw[r]: self.caches[r]})
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def step(self) -> None:
        with torch.inference_mode():
            lp = {r: self._lp(r) for r in self.models}
            self.ids = torch.log_softmax(lp["base-large"] + (lp["ft-small"] - lp["base-small"]), dim=-1).argmax(
                -1, keepdim=True)
            self.pos = self.pos[:, -1:] + 1
            self.mask = torch.cat([self.mask, torch.ones_like(self.ids)], dim=1)


# ---- profiling ----------------------------------------------------------------------------------

def _us(x: float) -> str:
    return f"{x:10.1f}"


def _dev_self(e: Any) -> float:
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)


def _dev_total(e: Any) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)


def profile_steps(out: Report, title: str, step: Callable[[], Any], device: torch.device, steps: int,
                  top: int = 25) -> dict[str, float]:
    """Profile `steps` calls of step; print the top ops and the per-step counts. Returns the counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # once outside, so nothing first-time lands in the profile
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
        sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps  # profiled: slower than the plain timing
    events = prof.events()
    avgs = [a for a in prof.key_averages() if a.key != STEP]  # (the steps' own ranges are no op)
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    # (not the ranges' copies on the GPU's timeline, user annotations, which span a step's work)
    gpu_events = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    kernels = len(gpu_events) or sum(len(getattr(e, "kernels", [])) for e in cpu_events)
    aten_all = sum(1 for e in cpu_events if e.name.startswith("aten::"))
    aten_top = sum(1 for e in cpu_events if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    gpu_busy_us = sum(float(e.time_range.elapsed_us()) for e in gpu_events)
    counts: dict[str, float] = {
        "wall ms/step (under the profiler)": wall_ms,
        "aten ops/step (all, nested included)": aten_all / steps,
        "aten ops/step (top level: not inside another aten op)": aten_top / steps,
        "GPU kernels+memcpys/step (device events)": kernels / steps,
        "GPU busy us/step (sum of device self times)": gpu_busy_us / steps,
    }
    inside = in_steps(events)
    for label, pred in COUNTERS:
        if label.startswith("cuda"):  # the CUDA runtime's calls: a step's own (not the profiler's stop, nor sync() above)
            c = sum(1 for e in events if pred(e.name) and inside(e))
        else:
            c = sum(a.count for a in avgs if pred(a.key))
        if c or device.type == "cuda" or not label.startswith(("cuda", "Memcpy")):
            counts[label + "/step"] = c / steps
    out("", f"=== profile: {title} ({steps} steps) ===")
    width = max(len(k) for k in counts)
    for k, v in counts.items():
        out(f"  {k:<{width}}  {v:10.1f}")
    labelled = [a for a in avgs if a.key.startswith("eftmesh::")]
    if labelled:
        out("  engine phases (CPU total us/step, calls/step):")
        for a in sorted(labelled, key=lambda a: -a.cpu_time_total):
            out(f"    {a.key:<40} {a.cpu_time_total / steps:10.1f} us  {a.count / steps:6.1f} calls")
    head = f"  {'name':<60} {'calls/st':>8} {'selfCPU':>10} {'CPU tot':>10} {'selfCUDA':>10} {'CUDA tot':>10}  (us/step)"

    def table(rows: list[Any], what: str) -> None:
        out(f"  -- top {top} by {what} --", head)
        for a in rows[:top]:
            out(f"  {a.key[:60]:<60} {a.count / steps:8.1f} {_us(a.self_cpu_time_total / steps)} "
                f"{_us(a.cpu_time_total / steps)} {_us(_dev_self(a) / steps)} {_us(_dev_total(a) / steps)}")

    table(sorted(avgs, key=lambda a: -a.self_cpu_time_total), "self CPU time")
    if device.type == "cuda":
        table(sorted(avgs, key=lambda a: -_dev_self(a)), "self CUDA time")
    return counts


SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__", "nonzero",
                "__contains__", "equal"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange"}
TORCH_DIR = str(Path(torch.__file__).parent)


def _call_site(keep: int = 2) -> str:
    """The innermost `keep` Python frames outside torch and outside this mode: the exact lines."""
    frames = [f for f in reversed(traceback.extract_stack()[:-2])
              if not f.filename.startswith(TORCH_DIR) and f.name not in ("__torch_function__", "labelled")]
    return " <- ".join(f"{f.filename.replace(str(ROOT) + '/', '').split('site-packages/')[-1]}:{f.lineno} {f.name}"
                       for f in frames[:keep])


def hazard_sites(out: Report, title: str, step: Callable[[], Any], device: torch.device, steps: int = 2) -> None:
    """Every Python-level call that syncs the host with the device or moves data between them, or
    creates a tensor, with its exact file:line (a TorchFunctionMode over `steps` calls)."""
    from torch.overrides import TorchFunctionMode

    sites: collections.Counter[tuple[str, str]] = collections.Counter()

    class Hazards(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            what = None
            if name in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
                what = f"Tensor.{name}() of a {args[0].device.type} tensor"
            elif name in ("to", "copy_") and args and isinstance(args[0], torch.Tensor):
                target = kwargs.get("device")
                if target is None:
                    target = next((a for a in args[1:] if isinstance(a, (str, torch.device))
                                   or (name == "copy_" and isinstance(a, torch.Tensor))), None)
                if isinstance(target, torch.Tensor):
                    target = target.device
                if target is not None and name == "to":
                    what = f"Tensor.to({torch.device(target).type}) from {args[0].device.type}"
                elif target is not None:  # dst.copy_(src): src's device -> dst's
                    what = f"Tensor.copy_ {torch.device(target).type} -> {args[0].device.type}"
            elif name in FACTORIES and not (args and isinstance(args[0], torch.Tensor)):
                dev = kwargs.get("device")
                what = f"torch.{name}(device={'None -> CPU' if dev is None else torch.device(dev).type})"
            if what is not None:
                sites[(what, _call_site())] += 1
            return func(*args, **kwargs)

    step()
    sync(device)
    with Hazards():
        for _ in range(steps):
            step()
    sync(device)
    out("", f"=== Python calls that create tensors, move them between host and device, or read them on the "
            f"host: {title} (per step, exact file:line) ===")
    if not sites:
        out("  none")
    for (what, where), c in sorted(sites.items(), key=lambda kv: (kv[0][1], kv[0][0]))[:40]:
        out(f"  {c / steps:5.1f}x {what:<44} {where}")


def sync_debug(out: Report, title: str, step: Callable[[], Any], device: torch.device, steps: int = 2) -> None:
    """torch.cuda.set_sync_debug_mode("warn") over `steps` calls: every synchronising CUDA call's line."""
    if device.type != "cuda":
        return
    step()
    sync(device)
    sites: collections.Counter[str] = collections.Counter()
    original = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        picked = [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno} {f.name}" for f in reversed(frames)
                  if any(s in f.filename for s in ("eftmesh", "transformers", "gpu_profile"))][:3]
        sites[f"{str(message).splitlines()[0][:60]} @ {' <- '.join(picked) or f'{filename}:{lineno}'}"] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = original
    out("", f"=== synchronising CUDA calls (set_sync_debug_mode warn): {title} (per step) ===")
    if not sites:
        out("  none")
    for where, c in sorted(sites.items(), key=lambda kv: -kv[1]):
        out(f"  {c / steps:5.1f}x {where}")


# ---- the run ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(placement.DTYPES),
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--models", default=str(ROOT / "models" / "demo"))
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per measurement (default: %(default)s)")
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps per profile (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="the larger N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for the main sections, as the benchmark ran (default: %(default)s; "
                        "0 leaves torch's default)")
    p.add_argument("--budget-s", type=float, default=110.0, help="skip sections that would start after this (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu-profile.txt"))
    a = p.parse_args(argv)
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(a.budget_s)
    out = Report(Path(a.out))
    default_threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    models = Path(a.models)
    large = str(models / "base-large")

    out(f"# eftmesh GPU profile: {' '.join(sys.argv)}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", dtype {dtype}, threads {torch.get_num_threads()} (torch default {default_threads}), "
        f"cpus {os.cpu_count()}, PREFILL {PREFILL}, N = 1 and {a.batch}, {a.steps} timed steps")
    timings: list[tuple[str, tuple[float, float, float, int]]] = []

    def timed(label: str, fn: Callable[[], Any]) -> None:
        r = median_ms(fn, device, a.steps)
        timings.append((label, r))
        out(f"  {label:<58} median {r[0]:8.2f} ms/step (min {r[1]:.2f}, max {r[2]:.2f}) = {1e3 / r[0]:8.1f} steps/s "
            f"over {r[3]} [{clock.elapsed:.0f} s]")

    def section(name: str, need_s: float) -> bool:
        if clock.left() < need_s:
            out("", f"--- skipped {name}: {clock.elapsed:.0f} s elapsed of the {a.budget_s:.0f} s budget ---")
            return False
        out("", f"--- {name} [{clock.elapsed:.0f} s] ---")
        return True

    # 1. the engine, as the logit service builds it (server.build: from_pretrained with the defaults)
    out("", f"--- loading base-large with ModelEngine.from_pretrained ({device}, {dtype}) [{clock.elapsed:.0f} s] ---")
    eng = ModelEngine.from_pretrained(large, role="base-large", device=str(device), dtype=dtype)
    t0 = time.perf_counter()
    eng.warmup()
    out(f"  loaded; warmup {time.perf_counter() - t0:.2f} s, merge_tokens {eng.merge_tokens}, "
        f"attn_implementation {getattr(eng.model.config, '_attn_implementation', '?')}, "
        f"layers {eng.model.config.num_hidden_layers}, max_context {eng.max_context} [{clock.elapsed:.0f} s]")
    @contextlib.contextmanager
    def guard(name: str) -> Iterator[None]:
        """A failing section is reported (with its traceback) and the run goes on."""
        try:
            yield
        except Exception:
            out(f"  !!! {name} failed:", *("  ! " + line for line in traceback.format_exc().splitlines()))

    gens: dict[int, EngineGen] = {}
    if section("engine decode steps (score_batch, one token per session)", 10):
        for n in (1, a.batch):
            with guard(f"engine N={n}"):
                gens[n] = EngineGen(eng, n, "time")
                timed(f"engine score_batch N={n}", gens[n].step)

    # 2. plain transformers on the same weights, and bench_load's lockstep
    hf = lock = None
    if section("plain transformers (AutoModelForCausalLM + DynamicCache)", 10):
        with guard("plain transformers"):
            hf = AutoModelForCausalLM.from_pretrained(large, dtype=placement.DTYPES[dtype]).to(device).eval()
            out(f"  attn_implementation {getattr(hf.config, '_attn_implementation', '?')}, cache kwarg {cache_kwarg(hf)}")
            for style in ("plain", "lockstep"):
                for n in (1, a.batch):
                    g = HFGen(hf, n, style, device)
                    timed(f"hf-{style} N={n} (base-large)", g.step)
    if hf is not None and section("bench_load's lockstep step (base-large + base-small + ft-small, plain transformers)", 12):
        with guard("lockstep"):
            fam = {"base-large": hf}
            for r in ("base-small", "ft-small"):
                fam[r] = AutoModelForCausalLM.from_pretrained(str(models / r), dtype=placement.DTYPES[dtype]).to(device).eval()
            lock = LockstepGen(fam, 1, device)
            for n in (1, a.batch):
                g = LockstepGen(fam, n, device)
                timed(f"lockstep 3 models N={n}", g.step)

    # 3. profiles at N=1
    label_engine_phases()
    prof_counts: dict[str, dict[str, float]] = {}
    prof_gen = EngineGen(eng, 1, "prof")
    subjects: list[tuple[str, Callable[[], Any]]] = [("engine score_batch N=1", prof_gen.step)]
    if hf is not None:
        subjects.append(("hf-plain N=1", HFGen(hf, 1, "plain", device).step))
        subjects.append(("hf-lockstep N=1", HFGen(hf, 1, "lockstep", device).step))
    if lock is not None:
        subjects.append(("lockstep 3 models N=1", lock.step))
    for title, fn in subjects:
        if section(f"profile {title}", 8):
            with guard(f"profile {title}"):
                prof_counts[title] = profile_steps(out, title, fn, device, a.profile_steps)

    # 4. where the host waits for the device, and what crosses between them
    for title, fn in subjects[:3]:
        if section(f"sync sites {title}", 5):
            with guard(f"sync debug {title}"):
                sync_debug(out, title, fn, device)
            with guard(f"hazard sites {title}"):
                hazard_sites(out, title, fn, device)

    # 5. thread count
    if a.threads and default_threads != torch.get_num_threads() and section(
            f"N=1 again with torch's default {default_threads} threads (the rest ran with {torch.get_num_threads()})", 8):
        with guard("threads"):
            torch.set_num_threads(default_threads)
            try:
                timed(f"engine score_batch N=1, {default_threads} threads", prof_gen.step)
                if hf is not None:
                    timed(f"hf-plain N=1, {default_threads} threads", HFGen(hf, 1, "plain", device).step)
            finally:
                torch.set_num_threads(a.threads)

    # summary
    out("", "=== summary (median ms per decode step) ===")
    for label, r in timings:
        out(f"  {label:<66} {r[0]:8.2f} ms/step")
    if prof_counts:
        titles = list(prof_counts)
        keys = list(dict.fromkeys(k for c in prof_counts.values() for k in c))
        out("", "  per step (profiled)".ljust(58) + "".join(f"{t[:22]:>24}" for t in titles))
        for k in keys:
            out(f"  {k[:56]:<56}" + "".join(f"{prof_counts[t].get(k, float('nan')):24.1f}" for t in titles))
    out("", f"done in {clock.elapsed:.1f} s; report in {out.path}")
    for g in gens.values():
        g.close()
    prof_gen.close()
    out.close()


if __name__ == "__main__":
    main()
