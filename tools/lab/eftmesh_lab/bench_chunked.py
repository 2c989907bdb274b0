"""`make bench-chunked`: what chunked prefill (the combiner's --prefill-chunk) does for the
streams already running when a long prompt arrives, on a real model.

SmolLM2-135M-Instruct (context 8,192; made into a checkpoint folder once, as `make
bench-vocab` does) serves every role: three logit service processes, and two combiners built in
this process over them, one with `--prefill-chunk 0` (every prompt in one step) and one with
`--prefill-chunk C` (pieces of C tokens). Rounds alternate between the two, side by side:

  round   `--streams` greedy streams (short prompts, `--stream-tokens` new tokens each, EOS
          ignored) are started; once every one has `--warm-tokens` tokens, one request with a
          prompt of about `--long-tokens` tokens (a fresh document each round, so its prefill
          is cold) and `--long-new-tokens` new tokens joins. Measured: the longest wait between
          two consecutive chunks of any running stream from the long request's arrival to its
          first token (what a running stream's user sees stall), the running streams' p99
          inter-chunk wait over the whole round, the long request's time to first token, and
          the round's tokens per second.

Medians over `--reps` rounds per configuration. Results in bench/chunked.json and
bench/chunked.png.

    python -m eftmesh_lab.bench_chunked --out bench/chunked.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from eftmesh_lab.bench_prefix import document
from eftmesh_lab.bench_vocab import InProcessCombiner, LogitProcesses, prepare_smollm2


def _say(msg: str) -> None:
    print(msg, flush=True)


def _request(prompt: str, max_new: int) -> Any:
    from eftmesh.v1 import generator_pb2

    return generator_pb2.GenerateRequest(prompt=prompt, sampling={"temperature": 0.0}, seed=0, max_new_tokens=max_new,
                                         ignore_eos=True, speculation={"mode": generator_pb2.SPECULATION_MODE_OFF})


def _stream(stub: Any, prompt: str, max_new: int, arrivals: list[float], tokens: list[int]) -> None:
    """One streamed Generate: each chunk's arrival time and the tokens so far."""
    for chunk in stub.Generate(_request(prompt, max_new), timeout=900):
        if chunk.token_ids:
            arrivals.append(time.perf_counter())
            tokens[0] += len(chunk.token_ids)


def one_round(comb: InProcessCombiner, tokenizer: Any, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    n = a.streams
    arrivals: list[list[float]] = [[] for _ in range(n)]
    counts = [[0] for _ in range(n)]
    started = time.perf_counter()
    threads = [threading.Thread(target=_stream, args=(comb.stub, f"Story {tag} {i}: once upon a time,", a.stream_tokens,
                                                      arrivals[i], counts[i])) for i in range(n)]
    for t in threads:
        t.start()
    while min(c[0] for c in counts) < a.warm_tokens:
        time.sleep(0.005)
    long_arrival = time.perf_counter()
    long_times: list[float] = []
    long = threading.Thread(target=_stream, args=(comb.stub, document(tokenizer, a.long_tokens, tag) + "\n\nSummary:",
                                                  a.long_new_tokens, long_times, [0]))
    long.start()
    long.join()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stall, p99 = waits(arrivals, long_arrival, long_times[0])
    tokens = sum(c[0] for c in counts) + a.long_new_tokens
    return {"stall_s": stall, "itl_p99_s": p99, "long_ttft_s": long_times[0] - long_arrival, "tokens_per_s": tokens / wall}


def waits(arrivals: list[list[float]], lo: float, hi: float) -> tuple[float, float]:
    """From each stream's chunk arrival times: the longest wait between two chunks that overlaps
    [lo, hi] (the long prompt's arrival to its first token), and the p99 of every wait."""
    stall = max((b - x for t in arrivals for x, b in zip(t, t[1:]) if b >= lo and x <= hi), default=0.0)
    every = sorted(b - x for t in arrivals for x, b in zip(t, t[1:]))
    return stall, every[int(0.99 * (len(every) - 1))] if every else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk", type=int, default=512, help="the chunked combiner's --prefill-chunk, sized for a CPU (default: %(default)s)")
    p.add_argument("--streams", type=int, default=4, help="running streams (default: %(default)s)")
    p.add_argument("--stream-tokens", type=int, default=96, help="new tokens per running stream (default: %(default)s)")
    p.add_argument("--warm-tokens", type=int, default=16, help="tokens every stream has before the long prompt joins (default: %(default)s)")
    p.add_argument("--long-tokens", type=int, default=2000, help="tokens of the long prompt (default: %(default)s)")
    p.add_argument("--long-new-tokens", type=int, default=8, help="new tokens of the long request (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="rounds per configuration, alternating; medians reported (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="the logit services' dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="the logit services' torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per logit service (default: %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=16384, help="each logit service's KV cache, in tokens (default: %(default)s)")
    p.add_argument("--build-dir", default="build", help="where the model is made and kept (default: %(default)s)")
    p.add_argument("--log-dir", default="build/bench-chunked", help="logit service logs (default: %(default)s)")
    p.add_argument("--out", default="bench/chunked.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="bench/chunked.png", help="the chart (default: %(default)s)")
    a = p.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    model = prepare_smollm2(Path(a.build_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    # a whole prefill of a few thousand tokens takes tens of seconds on a 2-core CPU: the
    # combiners' --call-timeout (30 s) would give up on it
    a.ns, a.max_new_tokens, a.block_size, a.queue_timeout, a.call_timeout = [a.streams + 1], a.stream_tokens, 4, 900.0, 600.0
    configs = {"whole": 0, "chunked": a.chunk}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with LogitProcesses(model, a, Path(a.log_dir)) as procs:
        combs = {}
        for name, chunk in configs.items():
            a.prefill_chunk = chunk
            combs[name] = InProcessCombiner(model, procs.ports, a)
        try:
            for name, comb in combs.items():
                _say(f"{name}: warm-up")
                _stream(comb.stub, "Hello!", 4, [], [0])
            for rep in range(a.reps):
                for name, comb in combs.items():
                    r = one_round(comb, tokenizer, a, f"{name}-{rep}")
                    rounds[name].append(r)
                    _say(f"  {name} (--prefill-chunk {configs[name]}) round {rep}: running streams' longest wait "
                         f"{r['stall_s']:.2f} s, p99 {r['itl_p99_s'] * 1e3:.0f} ms; long prompt's TTFT "
                         f"{r['long_ttft_s']:.2f} s; {r['tokens_per_s']:.1f} tokens/s")
        finally:
            for comb in combs.values():
                comb.close()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    out = {
        "model": "SmolLM2-135M-Instruct", "device": a.device, "machine": f"{platform.machine()}, {a.threads} thread(s) per service",
        "config": {k: v for k, v in vars(a).items() if k not in ("ns",)},
        "rounds": rounds, "median": med,
        "stall_ratio": med["chunked"]["stall_s"] / med["whole"]["stall_s"],
        "long_ttft_ratio": med["chunked"]["long_ttft_s"] / med["whole"]["long_ttft_s"],
        "throughput_ratio": med["chunked"]["tokens_per_s"] / med["whole"]["tokens_per_s"],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(out, a.plot)
    _say(f"running streams' longest wait while a {a.long_tokens}-token prompt prefills: {med['whole']['stall_s']:.2f} s "
         f"whole, {med['chunked']['stall_s']:.2f} s in pieces of {a.chunk} ({out['stall_ratio']:.2f}x); the long "
         f"prompt's TTFT {out['long_ttft_ratio']:.2f}x, throughput {out['throughput_ratio']:.2f}x; written to {a.out} "
         f"and {a.plot}")


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, chunk = out["median"], out["config"]["chunk"]
    labels = ["--prefill-chunk 0", f"--prefill-chunk {chunk}"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title in zip(axes, ("stall_s", "long_ttft_s", "tokens_per_s"),
                              ("running streams' longest wait (s)", "long prompt's time to first token (s)",
                               "tokens per second, all streams")):
        ax.bar(labels, [med["whole"][key], med["chunked"][key]], color=["C1", "C0"])
        ax.set_title(title, fontsize=10)
    cfg = out["config"]
    fig.suptitle(f"a {cfg['long_tokens']}-token prompt joining {cfg['streams']} running streams; {out['model']} in "
                 f"every role, {out['device']} (medians of {cfg['reps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
