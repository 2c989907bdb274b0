"""`make bench-hop`: where one step of the mesh goes, per role: the call, the service, the hop.

Starts the demo mesh (logit services in their own processes, the combiner in another, loopback
gRPC) with Prometheus metrics on, runs rounds of N concurrent greedy generations (EOS ignored;
Complete calls, or streaming Generate calls with --stream), and reads the services' own
histograms before and after each round:

  client ms     the combiner's `eftmesh.upstream.duration`: from sending a role's call to having
                its answer decoded (what a step waits for)
  service ms    the logit service's `eftmesh.logit.duration`: the call inside its handler, the
                wait for the engine included (`queue ms` of it) and the forward
  hop ms        client - service: serialising, the two loopback crossings, gRPC's threads and the
                wake-ups on both sides, and waiting for a core when the processes share them
  outside ms    (plain mode) a step's wall time less its slowest role's call: the combiner's
                mixing, sampling, delivery and scheduling between calls
  CPU ms        per process and step (Linux /proc): the combiner, each logit service, and this
                benchmark's own gRPC client threads; where the machine's cores went
  stream        (--stream) what the readers saw: median time to first token, the gaps between
                chunks that carry tokens (median, p99, max), tokens per chunk

No timers are added to the services: these are the figures a production scrape shows, so the
same table can be made from a deployed mesh's Prometheus. Repetitions are reported separately
and as medians (the machine is shared: read the spread before a single number).

    python -m eftmesh_lab.bench_hop --concurrency 1,16 --reps 3 --out bench/hop.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from eftmesh_lab.bench import workload_prompts
from eftmesh_lab.bench_load import MODES, ROLES, MeshClient, cycle, machine, metrics_page
from eftmesh.launcher import LocalMesh, resolve_models

# (metric family, what it becomes); Prometheus names of the OpenTelemetry instruments
CLIENT, SERVICE, QUEUE, STEPS = ("eftmesh_upstream_duration_seconds", "eftmesh_logit_duration_seconds",
                                 "eftmesh_logit_queue_duration_seconds", "eftmesh_batch_size")

Sums = dict[tuple[str, str, str], tuple[float, float]]  # (family, role, method) -> (sum, count)


def parse(text: str) -> Sums:
    """Histogram sums and counts of the families above from one /metrics page, keyed by
    (family, role, method); successful calls only where the family has a status."""
    out: Sums = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in (CLIENT, SERVICE, QUEUE, STEPS):
            continue
        for s in fam.samples:
            if s.labels.get("rpc_grpc_status_code", "OK") != "OK" or not s.name.endswith(("_sum", "_count")):
                continue
            key = (fam.name, s.labels.get("eftmesh_role", ""), s.labels.get("rpc_method", ""))
            total, count = out.get(key, (0.0, 0.0))
            out[key] = (total + s.value, count) if s.name.endswith("_sum") else (total, count + s.value)
    return out


def delta(before: Sums, after: Sums) -> Sums:
    """What a round added: the series whose count grew, less what they held before it."""
    out: Sums = {}
    for k, (total, count) in after.items():
        total0, count0 = before.get(k, (0.0, 0.0))
        if count > count0:
            out[k] = (total - total0, count - count0)
    return out


def breakdown(d: Sums, wall_s: float, tokens: int, plain: bool) -> dict:
    """One round's figures from the metric deltas `d`: tokens/s, steps, ms per step, and per
    (role, method) the calls and the client, service, queue and hop ms per call."""
    steps = int(d.get((STEPS, "", ""), (0.0, 0.0))[1])
    calls: dict[str, dict] = {}
    for (fam, role, method), (total, count) in sorted(d.items()):
        if fam != CLIENT:
            continue
        service = d.get((SERVICE, role, method), (0.0, 0.0))
        queue = d.get((QUEUE, role, method), (0.0, 0.0))
        row = {"calls": int(count), "client_ms": 1e3 * total / count,
               "service_ms": 1e3 * service[0] / service[1] if service[1] else None,
               "queue_ms": 1e3 * queue[0] / queue[1] if queue[1] else None}
        row["hop_ms"] = row["client_ms"] - row["service_ms"] if row["service_ms"] is not None else None
        calls[f"{role} {method}"] = row
    step_ms = 1e3 * wall_s / steps if steps else None
    outside = None
    if plain and step_ms is not None and calls:
        # one ScoreBatch per role per plain step, all sent at once: the step waits for the slowest
        outside = step_ms - max(r["client_ms"] * r["calls"] / steps for r in calls.values())
    return {"tokens_per_s": tokens / wall_s, "steps": steps, "step_ms": step_ms, "outside_ms": outside, "calls": calls}


def medians(rounds: Sequence[dict]) -> dict:
    """Per-field medians over repetitions (fields missing or None in a round are skipped)."""
    def med(xs: list) -> float | None:
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    keys = sorted({k for r in rounds for k in r["calls"]})
    return {
        **{f: med([r[f] for r in rounds]) for f in ("tokens_per_s", "steps", "step_ms", "outside_ms")},
        **({"stream": {k: med([r["stream"][k] for r in rounds]) for k in rounds[0]["stream"]}}
           if all("stream" in r for r in rounds) else {}),
        "cpu_ms_per_step": {k: med([r.get("cpu_ms_per_step", {}).get(k) for r in rounds])
                            for k in sorted({k for r in rounds for k in r.get("cpu_ms_per_step", {})})},
        "calls": {k: {f: med([r["calls"].get(k, {}).get(f) for r in rounds])
                      for f in ("calls", "client_ms", "service_ms", "queue_ms", "hop_ms")} for k in keys},
    }


def scrape(ports: Sequence[int]) -> Sums:
    out: Sums = {}
    for port in ports:
        out.update(parse(metrics_page(port)))
    return out


def stream_figures(chunks: Sequence[tuple[float, Sequence[float], int]], tokens: int) -> dict:
    """What a streaming round's readers saw (`MeshClient.generate`'s timings): median time to
    first token, the gap between token-carrying chunks (median, p99, max), tokens per chunk; ms."""
    gaps = sorted(g for _, gs, _ in chunks for g in gs)
    n = sum(c for _, _, c in chunks)
    pick = (lambda q: 1e3 * gaps[min(len(gaps) - 1, int(q * len(gaps)))]) if gaps else (lambda q: None)
    return {"ttft_ms": 1e3 * statistics.median(t for t, _, _ in chunks) if chunks else None,
            "chunk_gap_ms_p50": pick(0.5), "chunk_gap_ms_p99": pick(0.99), "chunk_gap_ms_max": 1e3 * gaps[-1] if gaps else None,
            "tokens_per_chunk": tokens / n if n else None}


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far, from /proc (Linux; {} elsewhere):
    name -> seconds. This process is "client", the benchmark's own gRPC client threads."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for name, pid in {"client": os.getpid(), **pids}.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
    return out


def cpu_per_step(before: Mapping[str, float], after: Mapping[str, float], steps: int) -> dict[str, float]:
    """CPU ms each process used per step over a round (where a 2-core machine's cores went)."""
    return {k: 1e3 * (after[k] - before[k]) / steps for k in after if k in before and steps}


def markdown(results: Mapping[str, dict]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = ["| N | tokens/s | step ms | outside ms | role call | calls | client ms | service ms | queue ms | hop ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, m in results.items():
        for i, (name, c) in enumerate(m["calls"].items()):
            head = f"| {n} | {m['tokens_per_s']:.1f} | {f(m['step_ms'])} | {f(m['outside_ms'])} |" if i == 0 else "| | | | |"
            lines.append(f"{head} {name} | {c['calls']:.0f} | {f(c['client_ms'])} | {f(c['service_ms'])} | "
                         f"{f(c['queue_ms'])} | {f(c['hop_ms'])} |")
    cpu = [f"N = {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.get("cpu_ms_per_step", {}).items())
           for n, m in results.items() if m.get("cpu_ms_per_step")]
    if cpu:  # where the cores went: a 2-core machine's processes share them
        lines += ["", "CPU ms per step, per process (client: this benchmark's gRPC client): " + "; ".join(cpu)]
    streams = [f"N = {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in m["stream"].items() if v is not None)
               for n, m in results.items() if m.get("stream")]
    if streams:
        lines += ["", "What the streams' readers saw (ms; tokens per chunk): " + "; ".join(streams)]
    return "\n".join(lines)


def spread(n: int, max_new: int, width: float) -> list[int]:
    """New tokens for n generations, evenly over max_new x [1 - width/2, 1 + width/2] (`--spread`)."""
    if n == 1 or width <= 0:
        return [max_new] * n
    return [max(1, round(max_new * (1 - width / 2 + width * i / (n - 1)))) for i in range(n)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eftmesh-bench-hop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="checkpoint per role (default: %(default)s; tiny random models when absent)")
    p.add_argument("--concurrency", default="1,16", help="values of N, comma-separated (default: %(default)s)")
    p.add_argument("--max-new", type=int, default=128, help="new tokens per generation, EOS ignored (default: %(default)s)")
    p.add_argument("--spread", type=float, default=0.0,
                   help="new tokens vary over --max-new x [1 - spread/2, 1 + spread/2] across a round's generations "
                        "(same total), so they finish on different steps as in a steady state; 0: all alike, "
                        "finishing together (default: %(default)s)")
    p.add_argument("--stream", action="store_true",
                   help="streaming Generate calls, read chunk by chunk as a chat client reads (default: Complete, "
                        "the whole answer at once)")
    p.add_argument("--reps", type=int, default=3, help="rounds per N; each is reported and the medians too (default: %(default)s)")
    p.add_argument("--mode", default="plain", choices=["plain", "adaptive"], help="speculation of every generation (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per logit service (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of every model (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype (default: %(default)s)")
    p.add_argument("--port", type=int, default=50450, help="first port of the mesh (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="the combiner's Prometheus port, the logit services' on the next ones (default: --port + 100)")
    p.add_argument("--combiner-args", default="", help="extra combiner flags, one shell-quoted string (default: none)")
    p.add_argument("--logit-args", default="", help="extra logit-service flags, one shell-quoted string (default: none)")
    p.add_argument("--out", default="bench/hop.json", help="JSON results (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    ns = sorted({int(n) for n in a.concurrency.split(",") if n})
    models = Path(a.models)
    roles = {r: path for r, path in resolve_models(models).items() if r in ROLES}
    prompts = workload_prompts(models, "qa", max(ns))
    speculation = MODES[f"mesh-{a.mode}"]
    metrics = a.port + 100 if a.metrics_port is None else a.metrics_port
    print(f"starting the mesh on 127.0.0.1:{a.port}, metrics on {metrics}-{metrics + len(roles)} "
          "(logs in build/bench-hop/)", flush=True)
    combiner_args = ["--max-concurrent-generations", str(max(ns)), *shlex.split(a.combiner_args)]
    with LocalMesh(roles, a.port, a.threads, a.device, a.dtype, log_dir=Path("build/bench-hop"), verbose=False,
                   combiner_args=combiner_args, logit_args=shlex.split(a.logit_args), metrics_port=metrics) as lm:
        ports = [metrics + i for i in range(len(roles) + 1)]
        client = MeshClient(lm.address)
        pids = {name: proc.pid for name, proc in lm.procs}
        rounds: dict[int, list[dict]] = {}
        for n in ns:
            client.round(cycle(prompts, n), min(8, a.max_new), speculation, a.stream)  # warm-up: first calls, deadlines
            for rep in range(a.reps):
                before, cpu0 = scrape(ports), cpu_seconds(pids)
                t0 = time.perf_counter()
                chunks: list[tuple[float, list[float], int]] = []
                tokens = client.round(cycle(prompts, n), spread(n, a.max_new, a.spread), speculation, a.stream, chunks)
                wall = time.perf_counter() - t0
                r = breakdown(delta(before, scrape(ports)), wall, tokens, a.mode == "plain")
                if a.stream:
                    r["stream"] = stream_figures(chunks, tokens)
                r["cpu_ms_per_step"] = cpu_per_step(cpu0, cpu_seconds(pids), r["steps"])
                rounds.setdefault(n, []).append(r)
                slowest = max(r["calls"].items(), key=lambda kv: kv[1]["client_ms"])
                print(f"  N={n} rep {rep + 1}/{a.reps}: {r['tokens_per_s']:.1f} tokens/s, {r['step_ms']:.2f} ms/step; "
                      f"slowest call {slowest[0]}: client {slowest[1]['client_ms']:.2f} ms = service "
                      f"{slowest[1]['service_ms']:.2f} + hop {slowest[1]['hop_ms']:.2f}; CPU ms per step: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_step"].items())
                      + ("; stream: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stream"].items() if v is not None)
                         if "stream" in r else ""), flush=True)
        client.close()
    results = {str(n): medians(rs) for n, rs in rounds.items()}
    out = {"what": "where a mesh step's time goes, per role, from the services' own metrics; medians over rounds",
           "mode": a.mode, "stream": a.stream, "max_new": a.max_new, "machine": machine(a.device), "args": vars(a),
           "medians": results, "rounds": {str(n): rs for n, rs in rounds.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n" + markdown(results) + "\n")
    print(f"written to {a.out}", flush=True)


if __name__ == "__main__":
    main()
