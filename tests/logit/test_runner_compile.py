"""--torch-compile: the static forward compiled by torch.compile (inductor) at warm-up.

On this CPU inductor generates C++ for the static path (with the machine's C++ compiler; the
Dockerfile's images carry g++ for it). What only a real compile shows runs here on
tiny models, in the slow tier (a compile takes tens of seconds): compiled rows equal eager ones
over random batch compositions that cross buckets, and serving never compiles again once
warm-up is done. The fallback when a compile fails is tested with a fake compiler.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from random_steps import assert_same_rows, step
from tiny_models import tiny_models
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit import runner as runner_module
from eftmesh.logit.engine import DraftItem, ModelEngine, ScoreItem
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.runner import StepBatch

# float32, compiled against eager: inductor fuses and reorders the float32 reductions (norms,
# matmul epilogues), so rows differ by rounding that grows with the logits' size. One random
# workload (llama, prompts [5, 20], verify 3 / rollback 5 then verify 3 / decode 1, seed 65536)
# differs by 1.1e-5 on logits of 3.7 (3e-6 relative), deterministically; a wrong mask, bucket
# or cache position differs by O(1).
SAME = 5e-5
N_POSITIONS = 128
COMPILED = GraphConfig(mode="auto", max_batch=8, max_query=4, max_context=128, compile=True)  # contexts 64, 128
# inductor's CPU code is C++: without a compiler the real compile cannot run here (the fallback
# test below needs none)
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="no C++ compiler: torch.compile's CPU backend cannot run")
KW = dict(model_id="t", role="t", kv_cache_tokens=2048, kv_block_size=8, session_active_s=0.0, max_batch=16)


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_models(len(tokenizer), N_POSITIONS, seed=0)


@pytest.fixture(scope="module")
def compiled(models, tokenizer):
    """Per architecture: (eager engine, compiled engine) over the same weights, warmed up once
    (the compile is what takes the time)."""
    out = {}
    for arch in ("gpt2", "llama"):
        eager = ModelEngine(models[arch], tokenizer, graphs=GraphConfig(mode="off"), **KW)
        fast = ModelEngine(models[arch], tokenizer, graphs=COMPILED, **KW)
        eager.warmup()
        fast.warmup()
        out[arch] = (eager, fast)
    return out


def test_compile_needs_the_static_path_and_says_which_flag_to_change():
    with pytest.raises(ValueError, match="--torch-compile .* --cuda-graphs off"):
        GraphConfig(mode="off", compile=True)
    from eftmesh.logit.server import parse_args

    cfg = parse_args(["--model", "m", "--role", "base-large", "--torch-compile"], environ={})
    assert cfg.engine.graphs.compile and cfg.engine.graphs.mode == "auto"
    assert not parse_args(["--model", "m", "--role", "base-large"], environ={}).engine.graphs.compile


def test_a_failed_compile_leaves_a_service_that_runs_uncompiled_and_says_so(models, tokenizer, monkeypatch, caplog):
    """A fake compiler: torch.compile's result fails on its first call, as inductor does on a
    machine without a C++ compiler. The service starts, logs it, and runs eagerly (on a CPU,
    the static path uncompiled would only add padding)."""

    def no_compiler(fn, **kwargs):
        def failing(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found (a fake)")
        return failing

    monkeypatch.setattr(runner_module.torch, "compile", no_compiler)
    eager = ModelEngine(models["gpt2"], tokenizer, graphs=GraphConfig(mode="off"), **KW)
    engine = ModelEngine(models["gpt2"], tokenizer, graphs=COMPILED, **KW)
    with caplog.at_level(logging.ERROR, logger="eftmesh.logit.runner"):
        engine.warmup()
    assert "torch.compile failed" in caplog.text and "InvalidCxxCompiler" in caplog.text
    assert not engine.runner.compile and not engine.runner.static
    assert (engine.info.execution, engine.info.compile_s) == ("eager", 0.0)
    for items in ([ScoreItem("s", 0, list(range(5, 25)), 1)], [ScoreItem("s", 20, [7], 1)]):
        a, b = eager.score_batch(items)[0], engine.score_batch(items)[0]
        assert b.error is None and torch.equal(a.rows, b.rows)


@pytest.mark.slow
@needs_cxx
def test_warm_up_compiles_and_info_says_so(compiled):
    from eftmesh.logit.convert import info_to_pb

    for eager, fast in compiled.values():
        assert fast.runner.compile and fast.runner.compiles >= 4  # batch 1 / past 1 x query 1 / past 1
        pb = info_to_pb(fast.info, "t", 0.0, 0.0)  # what LogitService.Info answers
        assert pb.execution == "compiled" and pb.compile_s > 0 and pb.cuda_graphs == 0
        assert eager.info.execution == "eager" and eager.info.compile_s == 0.0


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.integers(1, 20), min_size=1, max_size=11), steps=st.lists(step, min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
@example(prompts=[5, 20], steps=[[("verify", 3), ("rollback", 5)], [("verify", 3), ("decode", 1)]], seed=65536)  # (SAME's)
def test_compiled_steps_equal_eager_ones_and_serving_never_compiles(compiled, arch, prompts, steps, seed):
    eager, fast = compiled[arch]
    compiles = fast.runner.compiles
    assert_same_rows(eager, fast, COMPILED, prompts, steps, seed, N_POSITIONS, SAME)
    assert fast.runner.compiles == compiles  # warm-up covered every shape these steps took


@pytest.mark.slow
@needs_cxx
def test_compiled_drafts_equal_eager_ones(compiled, tokenizer):
    eager, fast = compiled["llama"]
    compiles, static_before = fast.runner.compiles, fast.runner.static_steps
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (5, 17)]
    greedy, sampled = SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.9, top_p=0.9)
    items = [DraftItem(f"d{i}", 0, p, 3, greedy if i % 2 == 0 else sampled, seed=i) for i, p in enumerate(prompts)]
    want, got = eager.draft_batch(items), fast.draft_batch(items)
    for w, r in zip(want, got):
        assert w.error is None and r.error is None
        assert w.drafts == r.drafts
        assert (w.rows - r.rows).abs().max().item() <= SAME
    assert fast.runner.static_steps >= static_before + 3 and fast.runner.compiles == compiles
    for engine in (eager, fast):
        for it in items:
            engine.release(it.session_id)


@pytest.mark.slow
@needs_cxx
def test_contexts_that_grow_across_buckets_take_the_same_compiled_graphs(compiled, tokenizer):
    """Two sessions decode and verify from 5 and 30 tokens to past 100: their contexts cross
    from the 64 bucket to the 128 one, which warm-up never ran (it compiles at the smallest
    context; the shapes are dynamic)."""
    eager, fast = compiled["gpt2"]
    assert fast.runner.contexts == [64, 128]
    compiles = fast.runner.compiles
    g = torch.Generator().manual_seed(5)
    seqs = {f"g{n}": torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (5, 30)}
    for engine in (eager, fast):
        engine.score_batch([ScoreItem(sid, 0, s, 1) for sid, s in seqs.items()])
    contexts = set()
    step = 0
    while min(len(s) for s in seqs.values()) < 100:
        q = 1 if step % 2 == 0 else 4  # a decode, then a verify of 3 drafts
        items = [ScoreItem(sid, len(s), torch.randint(0, len(tokenizer), (q,), generator=g).tolist(), q)
                 for sid, s in seqs.items()]
        before = fast.runner.static_steps
        for w, r in zip(eager.score_batch(items), fast.score_batch(items)):
            assert w.error is None and r.error is None
            assert (w.rows - r.rows).abs().max().item() <= SAME
        assert fast.runner.static_steps == before + 1  # one compiled forward for both rows
        contexts.add(fast.runner.bucket(StepBatch([], [len(s) for s in seqs.values()], [[0] * q] * 2, q))[2])
        for it in items:
            seqs[it.session_id].extend(it.tokens)
        step += 1
    assert contexts == {64, 128} and fast.runner.compiles == compiles
    for engine in (eager, fast):
        for sid in seqs:
            engine.release(sid)
