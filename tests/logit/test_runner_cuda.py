"""CUDA graphs of the model runner, on a GPU only (skipped elsewhere; bench/gpu.sh runs them).

Captured steps equal eager ones (float32 within 1e-5; bfloat16: the same greedy tokens over
64 steps), and a replayed step makes no host sync but its one wait for the logits
(`torch.cuda.set_sync_debug_mode("error")` turns any other into an error).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from random_steps import GREEDY_PROMPTS, forced_worst_gap, greedy_tokens
from tiny_models import graph_llama
from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.placement import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GRAPHS = GraphConfig(mode="auto", max_batch=8, max_query=4, max_context=128)
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


def llama(vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    return graph_llama(vocab).to("cuda", dtype)


def engines(tokenizer, dtype: torch.dtype, graphs: GraphConfig = GRAPHS,
            kv_cache_dtype: str = "auto") -> tuple[ModelEngine, ModelEngine]:
    model = llama(len(tokenizer), dtype)
    kw = dict(model_id="t", role="t", kv_cache_tokens=4096, kv_block_size=16, session_active_s=0.0,
              kv_cache_dtype=kv_cache_dtype)
    eager = ModelEngine(model, tokenizer, graphs=GraphConfig(mode="off"), **kw)
    graphed = ModelEngine(model, tokenizer, graphs=graphs, **kw)
    graphed.warmup()
    return eager, graphed


def test_warmup_captures_every_bucket_and_info_says_so(tokenizer):
    _, graphed = engines(tokenizer, torch.float32)
    r = graphed.runner
    assert len(r.graphs) == len(r.batches) * len(r.queries) * len(r.contexts)
    assert graphed.info.execution == "cuda-graphs" and graphed.info.cuda_graphs == len(r.graphs)
    assert graphed.info.graph_capture_s > 0
    # every graph writes its logits into one buffer (runner._record_all), and Info says what the
    # capture kept: that buffer and the graphs' pool
    assert len({out.untyped_storage().data_ptr() for _, out in r.graphs.values()}) == 1
    assert graphed.info.graph_memory_bytes >= max(r.batches) * max(r.queries) * graphed.vocab_size * 4


@pytest.mark.parametrize("rows,compiled", [(1, False), (3, False), (8, False), (3, True)],
                         ids=["1", "3", "8", "3-compiled"])
def test_captured_decode_and_verify_equal_eager_in_float32(tokenizer, rows, compiled):
    # compiled: --torch-compile, the compiled static forward then captured (one row count:
    # a compile takes tens of seconds and bench/gpu.sh has minutes)
    graphs = dataclasses.replace(GRAPHS, compile=compiled)
    eager, graphed = engines(tokenizer, torch.float32, graphs)
    assert graphed.info.execution == ("compiled+cuda-graphs" if compiled else "cuda-graphs")
    compiles = graphed.runner.compiles
    g = torch.Generator().manual_seed(rows)
    seqs = {f"s{i}": torch.randint(0, len(tokenizer), (5 + 7 * i,), generator=g).tolist() for i in range(rows)}
    for e in (eager, graphed):
        e.score_batch([ScoreItem(sid, 0, s, 1) for sid, s in seqs.items()])
    for q in (1, 2, 4, 3, 1):  # decode, verifies of 1, 3 and 2 drafts
        items = [ScoreItem(sid, len(s), [7] * q, q) for sid, s in seqs.items()]
        before = graphed.runner.static_steps
        want, got = eager.score_batch(items), graphed.score_batch(items)
        assert graphed.runner.static_steps > before
        for w, r in zip(want, got):
            assert (w.rows.float() - r.rows.float()).abs().max().item() <= 1e-5
        for s in seqs.values():
            s.extend([7] * q)
    assert graphed.runner.compiles == compiles  # replays: nothing compiled while serving


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_captured_bfloat16_greedy_tokens_equal_eager_over_64_steps(kv):
    """On the demo base-large, a trained model (random_steps.GREEDY_PROMPTS says why not random
    weights), with the model's own cache and with --kv-cache-dtype fp8 (its clamp, cast and
    byte copies captured in the graphs too). The CPU twin is in test_runner.py."""
    model, tok, _ = load_model(str(DEMO / "base-large"), role="t", device="cuda", dtype="bfloat16")
    kw = dict(model_id="t", role="t", kv_cache_tokens=4096, kv_block_size=16, session_active_s=0.0,
              kv_cache_dtype=kv)
    eager = ModelEngine(model, tok, graphs=GraphConfig(mode="off"), **kw)
    graphed = ModelEngine(model, tok, graphs=GRAPHS, **kw)
    graphed.warmup()
    for text in GREEDY_PROMPTS:
        prompt = tok(text).input_ids
        assert greedy_tokens(eager, prompt, 64) == greedy_tokens(graphed, prompt, 64), text
    assert graphed.runner.static_steps >= 64 * len(GREEDY_PROMPTS)


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_captured_bfloat16_llama_follows_eager_over_64_steps(tokenizer, kv):
    """The GQA Llama's captured steps in bfloat16 (the greedy check above runs the demo GPT-2):
    both engines fed the same tokens, every log-probability within 0.5 of eager's over 64 steps
    (on the CPU, its static path: 0.09, and 0.16 over an fp8 cache; test_runner.py)."""
    eager, graphed = engines(tokenizer, torch.bfloat16, kv_cache_dtype=kv)
    assert forced_worst_gap(eager, graphed, [1, 2, 3, 4], 64) < 0.5
    assert graphed.runner.static_steps >= 64


def test_a_replayed_step_makes_no_host_sync_but_its_one_wait(tokenizer):
    _, graphed = engines(tokenizer, torch.bfloat16)
    graphed.score_batch([ScoreItem("x", 0, [1, 2, 3], 1)])
    from eftmesh.logit.runner import StepBatch

    session = graphed.sessions.get("x")
    graphed.admission.reserve(session, 4, ())
    batch = StepBatch([session.table], [3], [[5]], 1)
    assert graphed.runner.bucket(batch) is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            out = graphed.runner.forward(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape[:2] == (1, 1) and out.device.type == "cpu"


def test_a_share_of_the_card_sizes_the_cache_and_serving_stays_within_it(tokenizer):
    """--gpu-memory-utilization against the real allocator (kvsize.CudaMemory): the pool takes
    what the measured weights, activations and CUDA graphs leave of the share, and warm-up,
    capture and the largest shapes served keep the card's reserved memory within it."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    model = llama(len(tokenizer), torch.bfloat16)
    _, total = torch.cuda.mem_get_info()
    room = 256 * 2**20
    share = torch.cuda.memory_allocated() + room  # what is held now, and a quarter GiB
    kw = dict(model_id="t", role="t", kv_block_size=16, session_active_s=0.0, prefill_tokens=256, max_batch=8, max_k=3)
    with pytest.raises(ValueError, match="leaves nothing for the KV cache"):
        ModelEngine(model, tokenizer, gpu_memory_utilization=torch.cuda.memory_allocated() / total, graphs=GRAPHS, **kw)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = ModelEngine(model, tokenizer, gpu_memory_utilization=share / total, graphs=GRAPHS, **kw)
    engine.warmup()
    assert engine.info.execution == "cuda-graphs"
    assert room / 2 <= engine.pool.nbytes() < room  # most of it: a tiny model's activations are small
    engine.score_batch([ScoreItem("p", 0, list(range(1, 250)), 1)])  # a prefill of --prefill-tokens
    engine.score_batch([ScoreItem(f"v{i}", 0, [5] * 4, 4) for i in range(8)])  # the widest verify
    engine.score_batch([ScoreItem(f"v{i}", 4, [6], 1) for i in range(8)])  # a replayed decode
    slack = 32 * 2**20  # the caching allocator's rounding (2 MiB blocks, 20 MiB segments)
    assert torch.cuda.max_memory_reserved() <= share + slack
