"""`make bench-http`: the HTTP API's overhead, HTTP/SSE against gRPC Generate, side by side in one run.

One demo mesh (logit services in their own processes, the combiner with `--http-port`); at each
N (default 1 and 16) N clients each stream one generation at once, either

  grpc-generate  a streaming gRPC Generate (one shared channel, as a service would hold it), or
  http-sse       POST /v1/completions with "stream": true on a kept-alive connection per client,
                 read event by event (this lab's SSE client, eftmesh_lab.loadtest_http),

the same request both ways: EFT up-scaling (the combiner's default composition), greedy, a fixed
number of new tokens (EOS ignored), speculation off (so both do identical decoding work).
Repetitions alternate between the two so that machine noise hits both alike; the median tokens/s
per system and N, their ratio (the issue's targets: >= 0.95 at one stream, >= 0.9 at 16) and the
median time to first token go to a JSON file and a markdown table.

    python -m eftmesh_lab.bench_http --concurrency 1,16 --reps 7 --out bench/http.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from eftmesh_lab.bench import workload_prompts
from eftmesh_lab.bench_load import cycle, machine
from eftmesh_lab.loadtest_http import connect, generate
from eftmesh.launcher import LocalMesh, resolve_models
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

ROLES = ("base-large", "base-small", "ft-small")
SYSTEMS = ("grpc-generate", "http-sse")
TARGETS = {1: 0.95, 16: 0.9}
# One generation: (tokens, seconds to the first token)
Stream = Callable[[int, str, int], tuple[int, float]]


def grpc_stream(address: str) -> tuple[Stream, Callable[[], None]]:
    channel = grpc.insecure_channel(address)
    stub = generator_pb2_grpc.GeneratorStub(channel)

    def one(worker: int, prompt: str, max_new: int) -> tuple[int, float]:
        start, first, tokens = time.perf_counter(), 0.0, 0
        req = generator_pb2.GenerateRequest(
            prompt=prompt, sampling={"temperature": 0.0}, seed=worker, max_new_tokens=max_new, ignore_eos=True,
            speculation={"mode": generator_pb2.SPECULATION_MODE_OFF})
        for chunk in stub.Generate(req, timeout=600):
            if chunk.token_ids and not tokens:
                first = time.perf_counter() - start
            tokens += len(chunk.token_ids)
        return tokens, first

    return one, channel.close


def http_stream(address: str, n: int) -> tuple[Stream, Callable[[], None]]:
    conns = [connect(address, timeout=600) for _ in range(n)]

    def one(worker: int, prompt: str, max_new: int) -> tuple[int, float]:
        body = {"model": "default", "prompt": prompt, "temperature": 0, "seed": worker, "max_tokens": max_new,
                "ignore_eos": True, "stream": True, "speculation": {"mode": "off"}}
        out = generate(conns[worker], "/v1/completions", body, {})
        if out.status != 200:
            raise RuntimeError(out.error)
        return out.completion_tokens, out.first_s or 0.0

    return one, lambda: [c.close() for c in conns]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_(stream: Stream, prompts: Sequence[str], max_new: int, combiner_pid: int) -> dict[str, float]:
    """All prompts at once, one client thread each: tokens/s of the round, median TTFT, and CPU
    ms per token of this (client) process and of the combiner."""
    t0, client0, comb0 = time.perf_counter(), time.process_time(), cpu_s(combiner_pid)
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = list(pool.map(lambda ip: stream(ip[0], ip[1], max_new), enumerate(prompts)))
    wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in results)
    return {"tokens_per_s": tokens / wall, "ttft_ms": 1000 * statistics.median(f for _, f in results),
            "client_cpu_ms_per_token": 1000 * (time.process_time() - client0) / tokens,
            "combiner_cpu_ms_per_token": 1000 * (cpu_s(combiner_pid) - comb0) / tokens}


def ttft_alone(clients: dict[str, tuple[Stream, Callable[[], None]]], prompt: str, rounds: int,
               max_new: int = 8) -> dict[str, float]:
    """Median time to first token of one request alone, alternating the two APIs (after 3
    warm-up rounds): the latency the HTTP front adds, without concurrency's queueing."""
    firsts: dict[str, list[float]] = {name: [] for name in clients}
    for i in range(rounds + 3):
        for name in (SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]):
            _, first = clients[name][0](0, prompt, max_new)
            if i >= 3:
                firsts[name].append(first * 1000)
    return {name: statistics.median(v) for name, v in firsts.items()}


def markdown(out: dict) -> str:
    rows = ["| N | gRPC Generate tokens/s | HTTP/SSE tokens/s | HTTP / gRPC | target | TTFT gRPC / HTTP ms "
            "| combiner CPU ms/token gRPC / HTTP | client CPU ms/token gRPC / HTTP |",
            "|---|---|---|---|---|---|---|---|"]
    for n in out["concurrency"]:
        k = str(n)
        g, h = out["tokens_per_s"]["grpc-generate"][k], out["tokens_per_s"]["http-sse"][k]
        target = TARGETS.get(n)

        def pair(key: str, f: str = ".2f", k: str = k) -> str:
            return f"{out[key]['grpc-generate'][k]:{f}} / {out[key]['http-sse'][k]:{f}}"

        rows.append(f"| {n} | {g:.1f} | {h:.1f} | {out['ratio'][k]:.3f} | {f'>= {target}' if target else '-'} | "
                    f"{pair('ttft_ms', '.1f')} | {pair('combiner_cpu_ms_per_token')} | "
                    f"{pair('client_cpu_ms_per_token')} |")
    t = out["ttft_alone_ms"]
    rows.append(f"\nOne request alone ({out['args']['ttft_rounds']} alternating rounds, 8 tokens): time to first token "
                f"p50 {t['grpc-generate']:.1f} ms over gRPC, {t['http-sse']:.1f} ms over HTTP/SSE.")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench-http", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="models/demo", help="model family folder (default: %(default)s)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated N (default: %(default)s)")
    p.add_argument("--max-new", type=int, default=64, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--reps", type=int, default=7, help="repetitions per system and N (default: %(default)s)")
    p.add_argument("--port", type=int, default=50650, help="first port of the mesh (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=50680, help="the combiner's HTTP port (default: %(default)s)")
    p.add_argument("--ttft-rounds", type=int, default=40,
                   help="rounds of one request alone per API for the time to first token (default: %(default)s)")
    p.add_argument("--out", default="bench/http.json", help="JSON results (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    ns = sorted({int(n) for n in a.concurrency.split(",") if n} | {1})
    alone: dict[str, float] = {}
    roles = {r: path for r, path in resolve_models(Path(a.models)).items() if r in ROLES}
    prompts = workload_prompts(Path(a.models), "qa", max(ns))
    combiner_args = ["--http-port", str(a.http_port), "--max-concurrent-generations", str(max(ns) + 8)]
    runs: dict[str, dict[int, list[dict[str, float]]]] = {s: {n: [] for n in ns} for s in SYSTEMS}
    with LocalMesh(roles, a.port, log_dir=Path("build/bench-http"), verbose=False, combiner_args=combiner_args) as lm:
        http_address = f"127.0.0.1:{a.http_port}"
        combiner_pid = dict(lm.procs)["combiner"].pid
        for n in ns:
            clients = {"grpc-generate": grpc_stream(lm.address), "http-sse": http_stream(http_address, n)}
            batch = cycle(prompts, n)
            for stream, _ in clients.values():  # warm-up
                round_(stream, batch, 8, combiner_pid)
            for rep in range(a.reps):
                order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
                for name in order:
                    r = round_(clients[name][0], batch, a.max_new, combiner_pid)
                    runs[name][n].append(r)
                    print(f"  [rep {rep + 1}/{a.reps}] {name:13s} N={n:3d}: {r['tokens_per_s']:.1f} tokens/s, CPU ms "
                          f"per token: client {r['client_cpu_ms_per_token']:.2f}, combiner "
                          f"{r['combiner_cpu_ms_per_token']:.2f}", flush=True)
            if n == 1:
                alone = ttft_alone(clients, prompts[0], a.ttft_rounds)
            for _, close in clients.values():
                close()
    def median(key: str) -> dict[str, dict[str, float]]:
        return {s: {str(n): statistics.median(r[key] for r in v) for n, v in row.items()} for s, row in runs.items()}

    med = median("tokens_per_s")
    out = {
        "what": "HTTP/SSE (POST /v1/completions, stream) vs gRPC Generate tokens/s, same requests, N concurrent "
                "streams, medians over alternating repetitions, one run",
        "composition": "the combiner's default (base-large + 1.0 * (ft-small - base-small)), greedy, speculation off",
        "max_new": a.max_new, "concurrency": ns, "machine": machine("cpu"), "args": vars(a),
        "tokens_per_s": med,
        "ratio": {str(n): med["http-sse"][str(n)] / med["grpc-generate"][str(n)] for n in ns},
        "targets": {str(n): TARGETS[n] for n in ns if n in TARGETS},
        "ttft_ms": median("ttft_ms"),
        "ttft_alone_ms": alone,
        "client_cpu_ms_per_token": median("client_cpu_ms_per_token"),
        "combiner_cpu_ms_per_token": median("combiner_cpu_ms_per_token"),
        "runs": {s: {str(n): v for n, v in row.items()} for s, row in runs.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n" + markdown(out) + f"\n\nwritten to {a.out}", flush=True)


if __name__ == "__main__":
    main()
