"""--kv-cache-memory: the paged KV cache sized by bytes instead of tokens (logit/kvsize.py).

Real tiny models (GPT-2: multi-head; Llama: grouped-query attention, so its keys are narrower
than its hidden size): the pool built from a budget takes at most the budget and within one
block of it, its bytes per token are what the key shape says, and it serves."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tiny_models import tiny_models
from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit.kvsize import kv_tokens_for_memory, parse_size
from eftmesh.logit.server import parse_args

KW = dict(model_id="t", role="t", kv_block_size=16, session_active_s=0.0)


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_models(len(tokenizer), 128, seed=0)


@pytest.mark.parametrize("text,size", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("16GB", 16 * 10**9),
                                       ("1.5GiB", 3 * 2**29), ("123456", 123456)])
def test_sizes_read_as_binary_or_decimal_units_or_bytes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4G", "lots", "-1GiB", "0", ""])
def test_a_size_that_is_not_one_says_how_to_write_it(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_tokens_are_whole_blocks_with_room_for_the_scratch_block():
    # 100 bytes a token, blocks of 16: 1,600 bytes a block; 10 blocks' bytes hold 9 and the scratch
    assert kv_tokens_for_memory(16_000, 100, 16) == 9 * 16
    assert kv_tokens_for_memory(16_000 + 1_599, 100, 16) == 9 * 16
    with pytest.raises(ValueError, match="give at least 3200 bytes"):
        kv_tokens_for_memory(3_199, 100, 16)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_cache_fills_the_budget_at_the_models_own_bytes_per_token(models, tokenizer, name):
    model = models[name]
    c = model.config
    kv_width = c.num_key_value_heads * c.head_dim if name == "llama" else c.n_embd  # Llama: 2 KV heads of 4
    per_token = 2 * c.num_hidden_layers * kv_width * 4  # float32
    budget = 3 * 2**20
    engine = ModelEngine(model, tokenizer, kv_cache_memory=budget, **KW)
    engine.warmup()  # allocates every layer
    pool = engine.pool
    assert pool.theoretical_bytes_per_token() == per_token
    assert pool.nbytes() <= budget < pool.nbytes() + 16 * per_token  # within one block of the budget
    assert engine.info.kv_cache_tokens == pool.capacity_tokens == budget // (16 * per_token) * 16 - 16
    r = engine.score_batch([ScoreItem("s", 0, [1, 2, 3], 1)])[0]  # and it serves
    assert r.error is None and r.rows.shape[0] == 1
    with pytest.raises(ValueError, match="holds no block"):
        ModelEngine(model, tokenizer, kv_cache_memory=per_token * 16, **KW)


def test_the_flag_replaces_kv_cache_tokens_and_refuses_both(capsys):
    cfg = parse_args(["--model", "m", "--role", "r", "--kv-cache-memory", "2GiB"]).engine
    assert (cfg.kv_cache_memory, cfg.kv_cache_tokens) == (2**31, 16384)
    assert parse_args(["--model", "m", "--role", "r"]).engine.kv_cache_memory is None
    for argv, message in [(["--kv-cache-memory", "2GiB", "--kv-cache-tokens", "4096"], "give one of them"),
                          (["--kv-cache-memory", "two gigs"], "--kv-cache-memory: 'two gigs' is not a size"),
                          (["--kv-cache-tokens", "0"], "--kv-cache-tokens must be >= 1")]:
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", "--role", "r", *argv])
        assert message in capsys.readouterr().err
