"""Sizing the paged KV cache by memory (--kv-cache-memory) instead of by tokens.

A token's keys and values cost 2 x layers x kv_heads x head_dim x dtype bytes, which differ
by two orders of magnitude between the roles of one mesh (the demo's base-large takes 23 KB
a token, its small roles 1 KB; a 1B Llama 32 KiB in bfloat16), so a budget in bytes is what
an operator can give each pod from its card's memory: vLLM's `--kv-cache-memory-bytes` (and
`VLLM_CPU_KVCACHE_SPACE` on a CPU). The key shape is read from the model itself, by one
one-token forward over a throwaway one-block pool, not guessed from its config (configs
name heads and widths differently per architecture; the forward cannot be wrong).

No gRPC here; the engine calls `kv_tokens_for_memory`.
"""

from __future__ import annotations

from typing import Any

import torch

from eftmesh.logit.kvcache import BlockTable, PagedKVPool
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.runner import ModelRunner, StepBatch


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '16GB' (powers of 1000) or a plain number of bytes -> bytes (> 0)."""
    from accelerate.utils import convert_file_size_to_int

    s = text.strip()
    try:
        n = int(s) if s.isdigit() else int(convert_file_size_to_int(s))
    except ValueError:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with KiB, MiB, GiB, TiB "
                         "(powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. 4GiB") from None
    if n <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return n


def slot_bytes(model: Any, dtype: torch.dtype, devices: int) -> int:
    """Bytes one token slot takes in the pool (every layer's keys and values), measured from a
    one-token forward over a throwaway pool of one block."""
    layers = model.config.num_hidden_layers
    device = model.get_input_embeddings().weight.device
    probe = PagedKVPool(1, 1, layers, device, dtype)  # one usable block of one token, and the scratch block
    table = BlockTable()
    probe.reserve(table, 1)
    runner = ModelRunner(model, probe, max_context=1, graphs=GraphConfig(mode="off"), sharded=devices > 1)
    with torch.inference_mode():
        runner.forward(StepBatch([table], [0], [[0]], 1))
    if probe.kv_heads == 0:
        raise ValueError(f"{type(model).__name__} wrote no keys to the cache in a forward: its KV size is unknown")
    return probe.theoretical_bytes_per_token()


def kv_tokens_for_memory(budget: int, per_token: int, block_size: int) -> int:
    """The most tokens (whole blocks) a pool of at most `budget` bytes holds, the scratch block
    included; ValueError when not one block fits."""
    block = per_token * block_size
    blocks = budget // block - 1  # the pool adds its scratch block
    if blocks < 1:
        raise ValueError(f"--kv-cache-memory {budget} bytes holds no block: a block of {block_size} tokens takes "
                         f"{block} bytes ({per_token} per token) and the pool keeps one more as scratch; "
                         f"give at least {2 * block} bytes")
    return blocks * block_size
