"""--kv-cache-memory and --gpu-memory-utilization: the paged KV cache sized by bytes or by a
share of the GPU instead of tokens (logit/kvsize.py).

Real tiny models (GPT-2: multi-head; Llama: grouped-query attention, so its keys are narrower
than its hidden size): the pool built from a budget takes at most the budget and within one
block of it, its bytes per token are what the key shape says, and it serves. A share of the
GPU is checked here with a fake of the CUDA allocator's statistics (FakeCudaMemory: no GPU on
this machine), whose readings are scripted while the profile's forwards run for real; the
same sizing against a real card is in test_runner_cuda.py, run by bench/gpu.sh."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tiny_models import tiny_models
from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit import kvsize
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.kvsize import MemoryProfile, kv_memory_for_utilization, kv_tokens_for_memory, parse_size, profile_memory
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


MiB = 2**20


def test_the_share_of_the_card_less_weights_activations_and_graphs_is_the_cache():
    p = MemoryProfile(weights=10 * MiB, activations=3 * MiB, graphs=2 * MiB, total=100 * MiB, free=70 * MiB)
    assert kv_memory_for_utilization(0.5, p) == 50 * MiB - 15 * MiB
    assert kv_memory_for_utilization(0.8, p) == 80 * MiB - 15 * MiB  # share - weights = 70 MiB: just fits
    with pytest.raises(ValueError, match=r"leaves nothing for the KV cache.*raise it above 0\.150"):
        kv_memory_for_utilization(0.15, p)
    with pytest.raises(ValueError, match=r"only 0\.08 GiB is free for this process.*give at most 0\.800"):
        kv_memory_for_utilization(0.81, p)


WORKSPACE = 2 * MiB  # the fake's cuBLAS workspace of a new stream


class FakeCudaMemory:
    """A fake of kvsize.CudaMemory (the CUDA allocator's statistics; there is no GPU here): a
    card of `total` bytes with `free` of them free; the tensors held read `weights`, and each
    profiled forward's peak reads the next of `peaks` above what was held before it."""

    def __init__(self, total: int, free: int, weights: int, peaks: list[int]) -> None:
        self.total, self.free, self.weights, self.peaks = total, free, weights, list(peaks)
        self.calls: list[str] = []
        self._peak = 0

    def settle(self) -> None:
        self.calls.append("settle")

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")
        self._peak = self.weights + self.peaks.pop(0)

    def allocated(self) -> int:
        return self.weights

    def peak(self) -> int:
        return self._peak

    def free_total(self) -> tuple[int, int]:
        return self.free, self.total

    def stream_workspace(self) -> int:
        return WORKSPACE


def test_the_profile_runs_the_largest_prefill_verify_and_captured_step(models, tokenizer):
    model = models["llama"]
    vocab = model.get_output_embeddings().weight.shape[0]
    fake = FakeCudaMemory(total=100 * MiB, free=80 * MiB, weights=5 * MiB, peaks=[4 * MiB, 6 * MiB, 1 * MiB])
    graphs = GraphConfig(max_batch=8, max_query=4, max_context=64)
    p = profile_memory(model, torch.float32, max_context=128, prefill_tokens=100, max_batch=64, max_k=9,
                       block_size=16, graphs=graphs, memory=fake)
    # one prefill of --prefill-tokens; the widest verify a forward of that many tokens holds
    # (100 // 10 rows of 9 drafts + 1); the largest captured bucket
    assert p.shapes == ("prefill 1 x 100", "verify 10 x 10", "captured bucket 8 x 4 x 64")
    assert fake.calls == ["settle", "reset_peak", "reset_peak", "reset_peak", "settle"]
    assert p.weights == 5 * MiB and (p.total, p.free) == (100 * MiB, 80 * MiB)
    # the first forward allocates the throwaway pool, which is not an activation
    assert p.activations == 6 * MiB
    # the step, the output buffer the graphs share, and their capture stream's workspace
    assert p.graphs == 1 * MiB + 8 * 4 * vocab * 4 + WORKSPACE
    short = profile_memory(model, torch.float32, max_context=128, prefill_tokens=4096, max_batch=2, max_k=32,
                           block_size=16, graphs=None, memory=FakeCudaMemory(100 * MiB, 80 * MiB, 0, [0, 0]))
    assert short.shapes == ("prefill 1 x 128", "verify 2 x 33") and short.graphs == 0  # the model's context caps it


def test_a_share_of_the_card_sizes_the_pool_and_it_serves(models, tokenizer, monkeypatch, caplog):
    model = models["llama"]
    fake = FakeCudaMemory(total=64 * MiB, free=60 * MiB, weights=4 * MiB, peaks=[2 * MiB, 3 * MiB])
    monkeypatch.setattr(kvsize, "CudaMemory", lambda device: fake)
    with caplog.at_level("INFO", logger="eftmesh.logit.kvsize"):
        engine = ModelEngine(model, tokenizer, gpu_memory_utilization=0.5, max_k=7, prefill_tokens=64, **KW)
    per_token = kvsize.slot_bytes(model, torch.float32, 1)
    budget = 32 * MiB - 4 * MiB - 3 * MiB  # no graphs on a CPU
    assert engine.info.kv_cache_tokens == kv_tokens_for_memory(budget, per_token, 16)
    assert "--gpu-memory-utilization 0.5 of 0.06 GiB" in caplog.text and "verify 8 x 8" in caplog.text
    engine.warmup()
    assert engine.pool.nbytes() <= budget
    assert engine.score_batch([ScoreItem("s", 0, [1, 2, 3], 1)])[0].error is None


def test_a_share_of_the_gpu_is_refused_for_a_model_on_the_cpu(models, tokenizer):
    with pytest.raises(ValueError, match="this model is on cpu: give --kv-cache-memory"):
        ModelEngine(models["gpt2"], tokenizer, gpu_memory_utilization=0.9, **KW)


def test_one_flag_sizes_the_cache_and_a_share_is_between_0_and_1(capsys):
    cfg = parse_args(["--model", "m", "--role", "r", "--gpu-memory-utilization", "0.9"]).engine
    assert (cfg.gpu_memory_utilization, cfg.kv_cache_memory, cfg.kv_cache_tokens) == (0.9, None, 16384)
    assert parse_args(["--model", "m", "--role", "r"]).engine.gpu_memory_utilization is None
    for argv, message in [(["--gpu-memory-utilization", "0.9", "--kv-cache-tokens", "4096"],
                           "--kv-cache-tokens and --gpu-memory-utilization both size the KV cache: give one of them"),
                          (["--gpu-memory-utilization", "0.9", "--kv-cache-memory", "2GiB"], "give one of them"),
                          (["--gpu-memory-utilization", "0.9", "--kv-cache-memory", "2GiB", "--kv-cache-tokens", "8"],
                           "--kv-cache-tokens and --kv-cache-memory and --gpu-memory-utilization all size"),
                          (["--gpu-memory-utilization", "0"], "0 < F <= 1, got 0"),
                          (["--gpu-memory-utilization", "1.5"], "0 < F <= 1, got 1.5")]:
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", "--role", "r", *argv])
        assert message in capsys.readouterr().err
