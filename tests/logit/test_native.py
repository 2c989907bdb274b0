"""eftmesh's own forward (native.py, --model-impl) gives transformers' logits, bitwise in float32.

Two engines over the same weights, one running transformers' modeling code and one ours, take
the same random workloads: prefills, decodes, verifies of several k and rollbacks in one
batch, on the eager path and on the static one (what a CUDA graph captures). Every row must be
equal, not close: the forward runs transformers' ops in transformers' order. Models: the tiny
GPT-2 and Llama shapes the logit tests use, Llama variants that take other branches (one
query head per key-value head, biases, llama3 rope scaling, tied embeddings), and the demo
family's base-large checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from random_steps import assert_same_rows, step
from tiny_models import tiny_models
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit.native import ARCHITECTURES, GPT2Forward, LlamaForward, native_forward

N_POSITIONS = 128
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
OFF = GraphConfig(mode="off")
STATIC = GraphConfig(mode="static", max_batch=8, max_query=4, max_context=64)


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


def llama_variants(vocab: int) -> dict[str, torch.nn.Module]:
    """Llama configs whose forwards take the branches the tiny one does not."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  max_position_embeddings=N_POSITIONS, initializer_range=0.2)
    torch.manual_seed(1)
    return {
        # as many key-value heads as query heads (no GQA), biased projections, tied embeddings
        "llama-mha-bias-tied": LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                                                            attention_bias=True, mlp_bias=True,
                                                            tie_word_embeddings=True)).eval(),
        # four query heads per key-value head, llama3 rope scaling, an explicit head_dim
        "llama-gqa4-rope3": LlamaForCausalLM(LlamaConfig(
            **common, num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})).eval(),
    }


@pytest.fixture(scope="module")
def models(tokenizer):
    return {**tiny_models(len(tokenizer), N_POSITIONS, seed=0), **llama_variants(len(tokenizer))}


def engine(model, tokenizer, impl: str, graphs: GraphConfig = OFF) -> ModelEngine:
    return ModelEngine(model, tokenizer, model_id="t", role="t", kv_cache_tokens=2048, kv_block_size=8,
                       session_active_s=0.0, max_batch=16, graphs=graphs, model_impl=impl)


ARCHS = ["gpt2", "llama", "llama-mha-bias-tied", "llama-gqa4-rope3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_native_rows_are_transformers_rows_bit_for_bit(models, tokenizer, arch):
    ref, ours = engine(models[arch], tokenizer, "transformers"), engine(models[arch], tokenizer, "native")
    assert ref.runner.native is None and ours.runner.native is not None
    assert (ref.info.model_impl, ours.info.model_impl) == ("transformers", "native")
    steps = [[("decode", 1), ("verify", 3), ("rollback", 2)], [("verify", 1), ("decode", 1), ("verify", 4)],
             [("rollback", 4), ("decode", 1), ("decode", 1)]]
    assert_same_rows(ref, ours, OFF, [9, 3, 17], steps, 5, N_POSITIONS, 0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_native_static_steps_are_transformers_static_steps_bit_for_bit(models, tokenizer, arch):
    """The static path (padded buckets, device-built slots and mask: what a CUDA graph
    captures) through either forward. (Against the eager path it agrees within 1e-5, not
    bitwise: padding changes the shapes reductions run over; test_runner.py checks that.)"""
    ref = engine(models[arch], tokenizer, "transformers", STATIC)
    ours = engine(models[arch], tokenizer, "native", STATIC)
    steps = [[("decode", 1), ("verify", 2), ("decode", 1)], [("verify", 3), ("rollback", 1), ("decode", 1)]]
    assert_same_rows(ref, ours, STATIC, [4, 11, 6], steps, 9, N_POSITIONS, 0.0)
    assert ref.runner.static_steps == ours.runner.static_steps >= 2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-gqa4-rope3"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.integers(1, 20), min_size=1, max_size=9), steps=st.lists(step, min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_native_equals_transformers_over_random_batches(models, tokenizer, arch, prompts, steps, seed):
    ref, ours = engine(models[arch], tokenizer, "transformers"), engine(models[arch], tokenizer, "native")
    assert_same_rows(ref, ours, OFF, prompts, steps, seed, N_POSITIONS, 0.0)


def test_the_demo_base_large_checkpoint_runs_natively_and_exactly():
    """The shipped demo family's largest model (30 GPT-2 layers), loaded as the service loads it."""
    path = str(DEMO / "base-large")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ref, ours = engine(model, tok, "transformers"), engine(model, tok, "auto")
    assert isinstance(ours.runner.native, GPT2Forward)
    prompt = tok("The quick brown fox").input_ids
    for e in (ref, ours):
        e.score_batch([ScoreItem("p", 0, prompt, 1)])
    seq = list(prompt)
    for _ in range(12):  # greedy decode through both, row by row
        a, b = ref.score_batch([ScoreItem("p", len(seq) - 1, seq[-1:], 1)])[0], \
            ours.score_batch([ScoreItem("p", len(seq) - 1, seq[-1:], 1)])[0]
        assert torch.equal(a.rows, b.rows)
        seq.append(int(a.rows[0].argmax()))


def test_auto_falls_back_to_transformers_and_native_insists(models, tokenizer, caplog, monkeypatch):
    assert isinstance(native_forward(models["gpt2"]), GPT2Forward)
    assert isinstance(native_forward(models["llama"], "native"), LlamaForward)
    assert native_forward(models["llama"], "transformers") is None
    torch.manual_seed(0)
    odd = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                     reorder_and_upcast_attn=True)).eval()
    with caplog.at_level(logging.INFO, logger="eftmesh.logit.native"):
        assert native_forward(odd) is None  # auto: transformers' forward, and the log says why
        assert native_forward(models["llama"], sharded=True) is None
    assert "reorder_and_upcast_attn" in caplog.text and "sharded" in caplog.text
    with pytest.raises(ValueError, match="--model-impl native: reorder_and_upcast_attn"):
        native_forward(odd, "native")
    with pytest.raises(ValueError, match="--model-impl must be one of auto, native, transformers"):
        native_forward(odd, "fast")

    class Moved(torch.nn.Module):  # GPT-2 in a transformers release that names a module otherwise
        config = models["gpt2"].config

    monkeypatch.setitem(ARCHITECTURES, "Moved", ARCHITECTURES["GPT2LMHeadModel"])
    moved = Moved()
    with caplog.at_level(logging.WARNING, logger="eftmesh.logit.native"):
        assert native_forward(moved) is None
    assert "laid out otherwise" in caplog.text
    with pytest.raises(ValueError, match="--model-impl native: Moved is laid out otherwise"):
        native_forward(moved, "native")

    class Other(torch.nn.Module):
        config = models["gpt2"].config

    with pytest.raises(ValueError, match="no native forward for Other"):
        native_forward(Other(), "native")
