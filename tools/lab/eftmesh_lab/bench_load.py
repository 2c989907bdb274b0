"""`make bench-load`: tokens/s against the number of concurrent generations, all systems in one run.

Every system decodes EFT up-scaling, base-large + 1.0 * (ft-small - base-small), greedily, a fixed
number of new tokens (EOS ignored), from the same checkpoints and prompts:

  lockstep       the ceiling: N sequences stepped together in this process, written from scratch
                 (no eftmesh code): left-padded batch, one prefill and then one forward per model
                 per step on the N newest tokens with its KV cache, log-softmax mix, argmax
  hf-generate    transformers `generate` of base-large alone at batch N (one model, not three)
  mesh-plain     the real mesh (logit services in their own processes, the combiner over
                 loopback gRPC), N clients each sending one Complete at once, speculation off
  mesh-adaptive  the same, adaptive speculation (its controller caps k by measured step throughput)
  mesh-fixed4    the same, speculation with k = 4 whatever the load (where speculation stops paying)
  poisson        open-loop Poisson arrivals of streaming Generate calls to the mesh (plain), new
                 lengths uniform in 16..128, at a fraction of the peak mesh-plain throughput:
                 achieved tokens/s, time to first token and inter-token latency percentiles

Repetitions alternate between systems so that machine noise hits all alike; the median tokens/s
per system and N, the ratios the issue sets targets for, and the Poisson latencies go to a JSON
file, a plot of tokens/s against N, and a markdown table on stdout.

    python -m eftmesh_lab.bench_load --concurrency 1,4,16,32 --out bench/load.json --plot bench/load.png
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import math
import os
import platform
import random
import shlex
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from eftmesh_lab.bench import workload_prompts
from eftmesh.launcher import LocalMesh, resolve_models
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, logit_pb2, logit_pb2_grpc

LARGE, SMALL, FT = "base-large", "base-small", "ft-small"
ROLES = (LARGE, SMALL, FT)
COMPOSITION = f"{LARGE} + 1.0 * ({FT} - {SMALL})"
SYSTEMS = ("lockstep", "hf-generate", "mesh-plain", "mesh-adaptive", "mesh-fixed4")
# Fixed k = 4 drafts whatever the load: beside adaptive (whose controller caps k by measured step
# throughput) it shows where speculation itself stops paying as concurrency grows.
MODES = {
    "mesh-plain": {"mode": generator_pb2.SPECULATION_MODE_OFF},
    "mesh-adaptive": {"mode": generator_pb2.SPECULATION_MODE_ADAPTIVE},
    "mesh-fixed4": {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 4},
}
REF_N = 16
# (name, numerator (system, N), denominator (system, N)); "poisson" ratios are added separately.
RATIOS = (
    ("mesh_plain16_over_lockstep16", ("mesh-plain", REF_N), ("lockstep", REF_N)),
    ("mesh_plain16_over_mesh_plain1", ("mesh-plain", REF_N), ("mesh-plain", 1)),
    ("mesh_plain1_over_lockstep1", ("mesh-plain", 1), ("lockstep", 1)),
    ("mesh_adaptive16_over_mesh_plain16", ("mesh-adaptive", REF_N), ("mesh-plain", REF_N)),
    ("mesh_plain32_over_mesh_plain1", ("mesh-plain", 32), ("mesh-plain", 1)),
)
# The targets: (ratio, comparison, bound); the last one is for a GPU only.
TARGETS = (
    ("mesh_plain16_over_lockstep16", ">=", 0.7),
    ("mesh_plain16_over_mesh_plain1", ">=", 6.0),
    ("mesh_plain1_over_lockstep1", ">=", 0.9),
    ("mesh_adaptive16_over_mesh_plain16", ">=", 1.0),
    ("poisson_ttft_p99_over_single", "<=", 5.0),
)
GPU_TARGETS = (("mesh_plain32_over_mesh_plain1", ">=", 10.0),)
PASSED = {True: "yes", False: "**no**", None: "not measured"}


# ---- pure helpers ---------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks; nan when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    max_new: int


def poisson_schedule(n: int, rate: float, lengths: tuple[int, int], seed: int) -> list[Arrival]:
    """n arrivals of a Poisson process of `rate` per second (the first at 0), each with a number
    of new tokens drawn uniformly from the inclusive range `lengths`; the same for the same seed."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(Arrival(t, rng.randint(*lengths)))
    return out


def cycle(items: Sequence[str], n: int) -> list[str]:
    """The first n items of `items` repeated."""
    return list(itertools.islice(itertools.cycle(items), n))


def ratio(med: dict[str, dict[int, float]], num: tuple[str, int], den: tuple[str, int]) -> float | None:
    """med[num] / med[den], or None when either was not measured."""
    a, b = med.get(num[0], {}).get(num[1]), med.get(den[0], {}).get(den[1])
    return None if a is None or not b else a / b


def check(value: float | None, op: str, bound: float) -> bool | None:
    """Whether `value op bound` holds; None when the value was not measured."""
    if value is None or math.isnan(value):
        return None
    return value >= bound if op == ">=" else value <= bound


# ---- in-process systems ---------------------------------------------------------------------

@dataclass
class Family:
    """The three checkpoints loaded in this process, and their shared tokenizer."""

    models: dict[str, torch.nn.Module]
    tokenizer: Any  # a transformers tokenizer
    device: torch.device

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id


def load_family(roles: dict[str, Path | str], device: str, dtype: str) -> Family:
    """Each role's checkpoint (a folder, a hub id or a .gguf file, as the logit service takes
    them); a checkpoint named by several roles is loaded once, as a process serving it would."""
    from eftmesh.common.loading import load_causal_lm, load_tokenizer

    loaded: dict[str, torch.nn.Module] = {}
    for r in ROLES:
        spec = str(roles[r])
        if spec not in loaded:
            loaded[spec] = load_causal_lm(spec, dtype=getattr(torch, dtype)).to(device).eval()
    models = {r: loaded[str(roles[r])] for r in ROLES}
    return Family(models, load_tokenizer(str(roles[SMALL])), torch.device(device))


def left_pad(family: Family, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, T] padded on the left, and the attention mask (1 on real tokens)."""
    encoded = [family.tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = [[family.pad_id] * (width - len(e)) + e for e in encoded]
    mask = [[0] * (width - len(e)) + [1] * len(e) for e in encoded]
    return (torch.tensor(ids, device=family.device), torch.tensor(mask, device=family.device))


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.24 renames past_key_values to cache; an older one would silently drop `cache`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                   cache: object, vocab: int) -> torch.Tensor:
    """Log-probabilities [N, vocab] (float32) of the next token after each row's last position."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{_cache_kwarg(model): cache})
    return torch.log_softmax(out.logits[:, -1, :vocab].float(), dim=-1)


@torch.inference_mode()
def lockstep_generate(family: Family, prompts: Sequence[str], max_new: int) -> list[list[int]]:
    """Greedy EFT up-scaling of all prompts together: max_new new tokens per prompt."""
    from transformers import DynamicCache

    ids, mask = left_pad(family, prompts)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = {r: DynamicCache(config=m.config) for r, m in family.models.items()}
    new: list[torch.Tensor] = []
    for _ in range(max_new):
        lp = {r: _last_logprobs(m, ids, mask, pos, caches[r], family.vocab) for r, m in family.models.items()}
        ids = torch.log_softmax(lp[LARGE] + (lp[FT] - lp[SMALL]), dim=-1).argmax(-1, keepdim=True)
        new.append(ids)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return torch.cat(new, dim=1).tolist()


@torch.inference_mode()
def hf_generate(family: Family, prompts: Sequence[str], max_new: int) -> int:
    """transformers `generate` of base-large alone on the left-padded batch; new tokens made."""
    ids, mask = left_pad(family, prompts)
    out = family.models[LARGE].generate(
        ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=family.pad_id)
    return (out.shape[1] - ids.shape[1]) * len(prompts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the mesh -------------------------------------------------------------------------------

@dataclass
class Trace:
    """One streamed generation: time to first token, per-token gaps after it, tokens, end time."""

    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    error: str | None = None


class MeshClient:
    """Complete and Generate calls into the benchmark mesh, from as many threads as wanted."""

    def __init__(self, address: str, temperature: float = 0.0, top_p: float = 1.0) -> None:
        """`temperature` 0: greedy, seeded. Above 0 (with `top_p`) a request carries no seed, as
        a client that wants any sample sends, so adaptive speculation's k follows the load."""
        self.sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {"temperature": 0.0}
        self.seeded = temperature <= 0
        self.channel = grpc.insecure_channel(address)
        self.stub = generator_pb2_grpc.GeneratorStub(self.channel)

    def _drawn(self, seed: int) -> dict:
        """A request's sampling and seed fields."""
        return {"sampling": self.sampling, "seed": seed if self.seeded else None}

    def complete(self, prompt: str, max_new: int, seed: int, speculation: dict) -> int:
        r = self.stub.Complete(generator_pb2.CompleteRequest(
            prompt=prompt, **self._drawn(seed), max_new_tokens=max_new,
            ignore_eos=True, speculation=speculation), timeout=900)
        return len(r.token_ids)

    def generate(self, prompt: str, max_new: int, seed: int, speculation: dict,
                 chunks: list[tuple[float, list[float], int]] | None = None) -> int:
        """`complete`, but as a streaming Generate read chunk by chunk (as a chat client reads).
        `chunks`: where to append (time to first token, the gaps between token-carrying chunks,
        their number), seconds."""
        req = generator_pb2.GenerateRequest(
            prompt=prompt, **self._drawn(seed), max_new_tokens=max_new,
            ignore_eos=True, speculation=speculation)
        start, times, tokens = time.perf_counter(), [], 0
        for c in self.stub.Generate(req, timeout=900):
            if c.token_ids:
                times.append(time.perf_counter())
                tokens += len(c.token_ids)
        if chunks is not None and times:
            chunks.append((times[0] - start, [b - a for a, b in itertools.pairwise(times)], len(times)))
        return tokens

    def round(self, prompts: Sequence[str], max_new: int | Sequence[int], speculation: dict, stream: bool = False,
              chunks: list[tuple[float, list[float], int]] | None = None, per_stream: int = 1) -> int:
        """All prompts sent at once, one client thread each (`max_new`: for all, or one per
        prompt; `stream`: streaming Generate calls, timed into `chunks` as `generate` says,
        else Complete), each thread sending its prompt `per_stream` times back to back;
        completion tokens of the round."""
        news = [max_new] * len(prompts) if isinstance(max_new, int) else list(max_new)
        call = functools.partial(self.generate, chunks=chunks) if stream else self.complete

        def one_stream(i: int, prompt: str, new: int) -> int:
            return sum(call(prompt, new, i + j * len(prompts), speculation) for j in range(per_stream))

        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            futs = [pool.submit(one_stream, i, p, m) for i, (p, m) in enumerate(zip(prompts, news))]
            return sum(f.result() for f in futs)

    def stream(self, prompt: str, max_new: int, seed: int, start_at: float) -> Trace:
        """A plain streaming Generate sent at perf_counter() == start_at; latencies count from
        start_at (open loop: a late send counts against the mesh, not for it)."""
        time.sleep(max(0.0, start_at - time.perf_counter()))
        trace, last = Trace(), start_at
        req = generator_pb2.GenerateRequest(
            prompt=prompt, **self._drawn(seed), max_new_tokens=max_new, ignore_eos=True,
            speculation={"mode": generator_pb2.SPECULATION_MODE_OFF})
        try:
            for chunk in self.stub.Generate(req, timeout=900):
                k = len(chunk.token_ids)
                if not k:
                    continue
                now = time.perf_counter()
                if trace.ttft is None:
                    trace.ttft = now - start_at
                else:  # a chunk may carry several tokens: each gets its share of the gap
                    trace.gaps += [(now - last) / k] * k
                trace.tokens += k
                last = now
        except grpc.RpcError as e:
            trace.error = e.code().name
        trace.end = time.perf_counter()
        return trace

    def close(self) -> None:
        self.channel.close()


def single_ttft(client: MeshClient, prompts: Sequence[str], max_new: int, reps: int = 5) -> float:
    """Median time to first token of one request alone."""
    return statistics.median(
        client.stream(prompts[i % len(prompts)], max_new, i, time.perf_counter()).ttft or math.nan
        for i in range(reps))


def run_poisson(client: MeshClient, prompts: Sequence[str], schedule: Sequence[Arrival]) -> dict:
    """Send the schedule open-loop; achieved throughput and latency percentiles (seconds)."""
    t0 = time.perf_counter() + 0.2
    with ThreadPoolExecutor(max_workers=len(schedule)) as pool:
        futs = [pool.submit(client.stream, prompts[i % len(prompts)], a.max_new, i, t0 + a.at)
                for i, a in enumerate(schedule)]
        traces = [f.result() for f in futs]
    ok = [t for t in traces if t.error is None]
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    gaps = [g for t in ok for g in t.gaps]
    wall = max(t.end for t in traces) - t0
    errors: dict[str, int] = {}
    for t in traces:
        if t.error:
            errors[t.error] = errors.get(t.error, 0) + 1
    return {
        "requests": len(schedule), "completed": len(ok), "errors": errors,
        "tokens": sum(t.tokens for t in ok), "wall_s": wall,
        "achieved_tokens_per_s": sum(t.tokens for t in ok) / wall,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
    }


# ---- the run --------------------------------------------------------------------------------

Runner = Callable[[Sequence[str], int], int]  # (prompts, max_new) -> new tokens made


SYSTEMS = ("lockstep", "hf-generate", *MODES)


def systems(family: Family, client: MeshClient, per_stream: int = 1) -> dict[str, Runner]:
    """Each system's runner; a round sends every prompt `per_stream` times (the loops in
    process: that many rounds in a row; the mesh: each stream's requests back to back)."""
    def lockstep(prompts: Sequence[str], max_new: int) -> int:
        return sum(len(t) for _ in range(per_stream) for t in lockstep_generate(family, prompts, max_new))

    def hf(prompts: Sequence[str], max_new: int) -> int:
        n = sum(hf_generate(family, prompts, max_new) for _ in range(per_stream))
        _sync(family.device)
        return n

    def mesh(speculation: dict) -> Runner:
        return lambda prompts, max_new: client.round(prompts, max_new, speculation, per_stream=per_stream)

    return {"lockstep": lockstep, "hf-generate": hf, **{name: mesh(m) for name, m in MODES.items()}}


def measure(label: str, fn: Runner, prompts: Sequence[str], max_new: int) -> float:
    """Tokens/s of one call of fn, with a progress line."""
    t0 = time.perf_counter()
    n = fn(prompts, max_new)
    dt = time.perf_counter() - t0
    print(f"  {label}: {n} tokens in {dt:.2f} s = {n / dt:.1f} tokens/s", flush=True)
    return n / dt


def controller_caps(metrics_port: int) -> dict[int, float]:
    """The combiner's `eftmesh.speculation.steps`: adaptive steps so far, by the cap on k its
    speculation controller chose."""
    families = text_string_to_metric_families(metrics_page(metrics_port))
    return {int(s.labels["eftmesh_speculation_cap"]): s.value for f in families
            if f.name == "eftmesh_speculation_steps" for s in f.samples if s.name.endswith("_total")}


def metrics_page(port: int) -> str:
    """A mesh process's Prometheus /metrics page (its --metrics-port on loopback)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def sweep(runners: dict[str, Runner], prompts: Sequence[str], ns: Sequence[int], max_new: int,
          reps: int, caps: Callable[[], dict[int, float]] | None = None,
          chosen: dict[int, dict[int, float]] | None = None) -> dict[str, dict[int, list[float]]]:
    """Tokens/s per system and N; a short warm-up at every N first, then repetitions that
    alternate between systems. With `caps` (the combiner's steps by the controller's cap so
    far), `chosen` collects, per N, mesh-adaptive's steps by cap over the repetitions."""
    print("warm-up", flush=True)
    for n in ns:
        for name, fn in runners.items():
            measure(f"warm-up {name} N={n}", fn, cycle(prompts, n), min(8, max_new))
    runs: dict[str, dict[int, list[float]]] = {name: {n: [] for n in ns} for name in runners}
    for rep in range(reps):
        for n in ns:
            for name, fn in runners.items():
                before = caps() if caps and chosen is not None and name == "mesh-adaptive" else None
                runs[name][n].append(measure(f"[rep {rep + 1}/{reps}] {name:13s} N={n:3d}", fn, cycle(prompts, n), max_new))
                if before is not None:
                    for cap, steps in caps().items():
                        row = chosen.setdefault(n, {})
                        row[cap] = row.get(cap, 0.0) + steps - before.get(cap, 0.0)
    return runs


def poisson_section(client: MeshClient, prompts: Sequence[str], peak: float, a: argparse.Namespace) -> dict:
    lengths = (a.poisson_min, a.poisson_max)
    rate = a.poisson_load * peak / statistics.mean(lengths)
    single = single_ttft(client, prompts, a.poisson_min)
    print(f"poisson: single-stream TTFT {single * 1e3:.1f} ms; {a.poisson_requests} requests at "
          f"{rate:.2f}/s ({a.poisson_load:.0%} of {peak:.1f} tokens/s)", flush=True)
    res = run_poisson(client, prompts, poisson_schedule(a.poisson_requests, rate, lengths, a.seed))
    print(f"  poisson: {res['achieved_tokens_per_s']:.1f} tokens/s, TTFT p50/p99 {res['ttft_p50_s'] * 1e3:.0f}/"
          f"{res['ttft_p99_s'] * 1e3:.0f} ms, ITL p50/p99 {res['itl_p50_s'] * 1e3:.1f}/{res['itl_p99_s'] * 1e3:.1f} ms, "
          f"errors {res['errors'] or 'none'}", flush=True)
    return {"load": a.poisson_load, "peak_tokens_per_s": peak, "rate_per_s": rate, "lengths": list(lengths),
            "single_ttft_s": single, **res, "ttft_p99_over_single": res["ttft_p99_s"] / single}


def derive(med: dict[str, dict[int, float]], poisson: dict | None, device: str) -> tuple[dict, dict]:
    """The issue's ratios, and each target with its bound and whether it passed."""
    ratios: dict[str, float | None] = {name: ratio(med, num, den) for name, num, den in RATIOS}
    ratios["poisson_ttft_p99_over_single"] = None if poisson is None else poisson["ttft_p99_over_single"]
    targets = TARGETS + (GPU_TARGETS if device.startswith("cuda") else ())
    return ratios, {
        name: {"value": ratios[name], "op": op, "bound": bound, "pass": check(ratios[name], op, bound)}
        for name, op, bound in targets
    }


def kv_stats(lm: LocalMesh) -> dict[str, dict]:
    """Per role: the paged KV pool's measured bytes per token slot (its tensors' bytes over its
    capacity, from LogitService.Info) against the theoretical 2 x layers x kv_heads x head_dim x
    dtype bytes."""
    out = {}
    for role, port in lm.ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            i = logit_pb2_grpc.LogitServiceStub(ch).Info(logit_pb2.LogitServiceInfoRequest(), timeout=10)
        out[role] = {"kv_cache_tokens": i.kv_cache_tokens, "block_size": i.kv_block_size,
                     "bytes_per_token": i.kv_bytes_per_token, "theoretical": i.kv_bytes_per_token_theoretical,
                     "ratio": i.kv_bytes_per_token / i.kv_bytes_per_token_theoretical}
    return out


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def markdown(out: dict) -> str:
    ns = out["concurrency"]
    lines = ["| system | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for name, row in out["tokens_per_s"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.1f}" for n in ns) + " |")
    lines += ["", "| ratio | value | target | pass |", "|---|---|---|---|"]
    for name, value in out["ratios"].items():
        t = out["targets"].get(name)
        shown = "-" if value is None else f"{value:.2f}"
        target = "|" if t is None else f"{t['op']} {t['bound']} | {PASSED[t['pass']]}"
        lines.append(f"| {name} | {shown} | {target} |")
    p = out["poisson"]  # None: --poisson-requests 0
    lines += [] if p is None else ["", "| poisson (mesh-plain) | achieved tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | single TTFT | errors |",
              "|---|---|---|---|---|---|---|---|",
              f"| {p['load']:.0%} of {p['peak_tokens_per_s']:.1f} tokens/s, {p['requests']} requests | "
              f"{p['achieved_tokens_per_s']:.1f} | {p['ttft_p50_s'] * 1e3:.0f} ms | {p['ttft_p99_s'] * 1e3:.0f} ms | "
              f"{p['itl_p50_s'] * 1e3:.1f} ms | {p['itl_p99_s'] * 1e3:.1f} ms | {p['single_ttft_s'] * 1e3:.0f} ms | "
              f"{sum(p['errors'].values())} |"]
    if caps := out.get("adaptive_caps"):
        lines += ["", "| mesh-adaptive: steps by the controller's cap on k | share |", "|---|---|"]
        lines += [f"| N={n} | " + ", ".join(f"k<={c}: {v:.0%}" for c, v in row.items()) + " |" for n, row in caps.items()]
    lines += ["", "| KV cache | tokens | block | bytes/token measured | theoretical | ratio |", "|---|---|---|---|---|---|"]
    for role, k in out.get("kv_cache", {}).items():
        lines.append(f"| {role} | {k['kv_cache_tokens']} | {k['block_size']} | {k['bytes_per_token']:.0f} | "
                     f"{k['theoretical']:.0f} | {k['ratio']:.3f} |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    """Tokens/s against N (log2 axis), one line per system, the Poisson run as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = out["concurrency"]
    fig, ax = plt.subplots(figsize=(8.0, 4.5))
    for name, row in out["tokens_per_s"].items():
        ax.plot(ns, [row[str(n)] for n in ns], "o-", label=name)
    if out["poisson"]:
        ax.axhline(out["poisson"]["achieved_tokens_per_s"], color="grey", ls=":",
                   label=f"poisson, mesh-plain at {out['poisson']['load']:.0%} of peak")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent generations N")
    ax.set_ylabel("tokens / s (median)")
    model = out["args"].get("model")
    what = f"{Path(model).name} in every role" if model else "EFT up-scaling"
    ax.set_title(f"{what}, {out['max_new']} new tokens, {out['machine']['device']} {out['args']['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eftmesh-bench-load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="checkpoint per role (default: %(default)s; tiny random models when absent)")
    p.add_argument("--model", default=None,
                   help="one model in every role instead of the demo family: a checkpoint folder, a hub id or a "
                        ".gguf file (e.g. build/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf); EFT then reduces "
                        "to that model, and the figures show the mesh's overhead at a real model's size")
    p.add_argument("--concurrency", default="1,4,16,32", help="values of N, comma-separated (default: %(default)s)")
    p.add_argument("--max-new", type=int, default=64, help="new tokens per generation, EOS ignored (default: %(default)s)")
    p.add_argument("--reps", type=int, default=2, help="repetitions per system and N; the median is reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per model, in every system (default: 1 on the CPU, where the systems share "
                        "its cores; 4 on a GPU, where one thread makes each step's host work ~3x slower, see "
                        "bench/gpu-profile.txt)")
    p.add_argument("--device", default="cpu", help="torch device of every model, e.g. cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype (default: %(default)s)")
    p.add_argument("--poisson-load", type=float, default=0.7, help="Poisson arrival rate as a fraction of the peak mesh-plain throughput (default: %(default)s)")
    p.add_argument("--poisson-requests", type=int, default=48,
                   help="requests of the Poisson run; 0 skips it (default: %(default)s)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="the systems to run, comma-separated (default: all: %(default)s); the ratios of those left "
                        "out are 'not measured'")
    p.add_argument("--poisson-min", type=int, default=16, help="fewest new tokens of a Poisson request (default: %(default)s)")
    p.add_argument("--poisson-max", type=int, default=128, help="most new tokens of a Poisson request (default: %(default)s)")
    p.add_argument("--requests-per-stream", type=int, default=1, metavar="K",
                   help="each of the N streams sends K requests back to back: a closed loop with N in flight, as a "
                        "load tester with a concurrency limit runs one (ghz -c). Streams that finish apart (speculative "
                        "ones) are re-admitted apart, each admission a prefill step of its own (default: %(default)s, "
                        "one round)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="mesh requests' temperature; above 0 they are sampled with --top-p and carry no seed (the "
                        "path where adaptive speculation follows the load), and only mesh systems may run (default: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="mesh requests' top-p when --temperature > 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson schedule (default: %(default)s)")
    p.add_argument("--port", type=int, default=50250, help="first port of the benchmark mesh (default: %(default)s)")
    p.add_argument("--combiner-args", default="", help="extra combiner flags, one shell-quoted string (default: none)")
    p.add_argument("--logit-args", default="", help="extra logit-service flags, one shell-quoted string (default: none)")
    p.add_argument("--out", default="bench/load.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="bench/load.png", help="plot of tokens/s against N; empty for none (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    ns = sorted({int(n) for n in a.concurrency.split(",") if n})
    chosen = [x for x in a.systems.split(",") if x]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown or not chosen:
        raise SystemExit(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    if a.requests_per_stream < 1:
        raise SystemExit(f"--requests-per-stream must be >= 1, got {a.requests_per_stream}")
    if a.temperature > 0 and (greedy_only := [x for x in chosen if not x.startswith("mesh-")]):
        raise SystemExit(f"--systems: {', '.join(greedy_only)} decode greedily; with --temperature > 0 choose mesh systems")
    models = Path(a.models)
    if a.model:
        # One real model in every role: EFT reduces to the model itself, and the mesh's figures
        # against the one-process loop measure its overhead at a real model's forward cost.
        roles: dict[str, Path | str] = {r: a.model for r in ROLES}
        prompts = workload_prompts(Path(a.model), "prose", max(ns))  # plain prose: no eval files there
    else:
        roles = {r: path for r, path in resolve_models(models).items() if r in ROLES}
        prompts = workload_prompts(models, "qa", max(ns))
    if a.threads is None:
        a.threads = 1 if a.device == "cpu" else 4
    torch.set_num_threads(a.threads)
    print(f"loading {', '.join(ROLES)} in this process ({a.device}, {a.dtype}, {a.threads} thread(s))", flush=True)
    family = load_family(roles, a.device, a.dtype)
    # Every generation of the sweep and of the Poisson run may be in flight at once.
    combiner_args = ["--max-concurrent-generations", str(max(*ns, a.poisson_requests)), *shlex.split(a.combiner_args)]
    print(f"starting the mesh on 127.0.0.1:{a.port} (logs in build/bench-load/)", flush=True)
    metrics_port = a.port + 100
    with LocalMesh(roles, a.port, a.threads, a.device, a.dtype, log_dir=Path("build/bench-load"), verbose=False,
                   combiner_args=combiner_args, logit_args=shlex.split(a.logit_args), metrics_port=metrics_port) as lm:
        client = MeshClient(lm.address, a.temperature, a.top_p)
        caps: dict[int, dict[int, float]] = {}  # N -> mesh-adaptive's steps by the controller's cap
        runners = {k: v for k, v in systems(family, client, a.requests_per_stream).items() if k in chosen}
        runs = sweep(runners, prompts, ns, a.max_new, a.reps,
                     functools.partial(controller_caps, metrics_port), caps)
        med = {name: {n: statistics.median(v) for n, v in row.items()} for name, row in runs.items()}
        poisson = (poisson_section(client, prompts, max(med["mesh-plain"].values()), a)
                   if a.poisson_requests > 0 and "mesh-plain" in med else None)
        client.close()
        kv = kv_stats(lm)
    ratios, targets = derive(med, poisson, a.device)
    out = {
        "what": "EFT up-scaling tokens/s against concurrent generations N; medians over repetitions, all systems in one run",
        "composition": COMPOSITION, "max_new": a.max_new, "concurrency": ns, "prompts": prompts,
        "machine": machine(a.device), "args": vars(a),
        "tokens_per_s": {name: {str(n): v for n, v in row.items()} for name, row in med.items()},
        "runs": {name: {str(n): v for n, v in row.items()} for name, row in runs.items()},
        "poisson": poisson, "kv_cache": kv, "ratios": ratios, "targets": targets,
        # share of mesh-adaptive's measured steps under each cap on k its controller chose
        "adaptive_caps": {str(n): {str(c): round(v / max(sum(row.values()), 1.0), 3) for c, v in sorted(row.items()) if v > 0}
                          for n, row in sorted(caps.items())},
    }
    write(out, markdown(out), a.out, a.plot)


def write(out: dict, table: str, path: str, plot_path: str) -> None:
    """The results as JSON at `path`, their markdown table on stdout, the tokens/s plot at
    `plot_path` (none when empty)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print("\n" + table + "\n")
    if plot_path:
        plot(out, plot_path)
    print(f"written to {path}" + (f" and {plot_path}" if plot_path else ""), flush=True)


if __name__ == "__main__":
    main()
