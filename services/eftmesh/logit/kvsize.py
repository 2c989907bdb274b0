"""Sizing the paged KV cache by memory (--kv-cache-memory, --gpu-memory-utilization) instead of
by tokens.

A token's keys and values cost 2 x layers x kv_heads x head_dim x dtype bytes, which differ
by two orders of magnitude between the roles of one mesh (the demo's base-large takes 23 KB
a token, its small roles 1 KB; a 1B Llama 32 KiB in bfloat16), so a budget in bytes is what
an operator can give each pod from its card's memory: vLLM's `--kv-cache-memory-bytes` (and
`VLLM_CPU_KVCACHE_SPACE` on a CPU). The key shape is read from the model itself, by one
one-token forward over a throwaway one-block pool, not guessed from its config (configs
name heads and widths differently per architecture; the forward cannot be wrong).

--gpu-memory-utilization F is vLLM's flag of that name, with vLLM's meaning: this process may
use F x the card's memory, and the KV cache gets what the weights, the largest forward's
activations and the CUDA graphs' capture leave of that share. Those are measured, not guessed
(`profile_memory`): forwards at the largest shapes the engine runs, on a throwaway pool, under
the allocator's peak statistics; the card's free memory is then read to check the share fits
beside whatever else holds it (other processes, this one's CUDA context, which lie outside the
share as in vLLM, so F = 0.3 three times shares one card among three roles).

No gRPC here; the engine calls `kv_cache_tokens`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.kvcache import BlockTable, PagedKVPool
from eftmesh.logit.runner import ModelRunner, StepBatch

if TYPE_CHECKING:
    from eftmesh.logit.engine import EngineConfig

log = logging.getLogger(__name__)
GiB = 2**30


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


def kv_tokens_for_memory(budget: int, per_token: int, block_size: int, flag: str = "--kv-cache-memory") -> int:
    """The most tokens (whole blocks) a pool of at most `budget` bytes holds, the scratch block
    included; ValueError when not one block fits."""
    block = per_token * block_size
    blocks = budget // block - 1  # the pool adds its scratch block
    if blocks < 1:
        raise ValueError(f"{flag} leaves {budget} bytes for the KV cache, which holds no block: a block of {block_size} tokens takes "
                         f"{block} bytes ({per_token} per token) and the pool keeps one more as scratch; "
                         f"give at least {2 * block} bytes")
    return blocks * block_size


@dataclass(frozen=True)
class MemoryProfile:
    """What one model takes on its card besides the KV cache, measured by `profile_memory`."""

    weights: int  # bytes the process's tensors hold before any forward: weights, buffers
    activations: int  # the most an eager forward adds at the largest shapes the engine runs
    graphs: int  # what the CUDA graph capture will keep (its largest bucket's step and output); 0 without
    total: int  # the card's memory
    free: int  # free on the card with the weights loaded (others' use and the CUDA context taken)
    shapes: tuple[str, ...] = ()  # what the profile ran, for the log


def kv_memory_for_utilization(utilization: float, p: MemoryProfile) -> int:
    """Bytes the KV cache may take under --gpu-memory-utilization: the process's share of the
    card less its weights, activations and graphs; ValueError, saying what to change, when
    nothing is left or the share does not fit in what the card has free."""
    share = int(p.total * utilization)
    rest = p.weights + p.activations + p.graphs
    budget = share - rest
    if budget <= 0:
        raise ValueError(f"--gpu-memory-utilization {utilization:g} leaves nothing for the KV cache: this process's "
                         f"share is {share / GiB:.2f} GiB of the card's {p.total / GiB:.2f} GiB, and the weights "
                         f"({p.weights / GiB:.2f} GiB), a forward's activations ({p.activations / GiB:.2f} GiB) and "
                         f"the CUDA graphs ({p.graphs / GiB:.2f} GiB) take {rest / GiB:.2f} GiB; raise it above "
                         f"{rest / p.total:.3f}, or lower --prefill-tokens, --max-batch or --cuda-graph-max-*")
    if share - p.weights > p.free:
        raise ValueError(f"--gpu-memory-utilization {utilization:g} asks for {share / GiB:.2f} GiB of the card's "
                         f"{p.total / GiB:.2f} GiB, but only {(p.free + p.weights) / GiB:.2f} GiB is free for this "
                         f"process (others, and its CUDA context, hold the rest): give at most "
                         f"{(p.free + p.weights) / p.total:.3f}, or free the card")
    return budget


class CudaMemory:
    """The CUDA caching allocator's statistics for one device (what `profile_memory` reads; the
    CPU tests give it a fake with the same methods)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"--gpu-memory-utilization sizes the KV cache from a CUDA device's memory, and this "
                             f"model is on {device}: give --kv-cache-memory (on a CPU, the bytes the cache may "
                             f"take: vLLM's VLLM_CPU_KVCACHE_SPACE) or --kv-cache-tokens")
        self.device = device

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def free_total(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def stream_workspace(self) -> int:
        """The cuBLAS workspace a stream's first matrix product allocates: the graphs' capture
        stream gets its own (runner._capture_all), which torch keeps for as long as that stream
        and handle are in use. cuBLASLt shares it by default (one figure: the larger, should they
        differ). torch's own figure where it has one (2.13), else 32 MiB, its largest default
        (Hopper's)."""
        sizes = [getattr(torch.backends.cuda, f, None) for f in ("cublas_workspace_size", "cublaslt_workspace_size")]
        known = [int(f()) for f in sizes if f is not None]
        return max(known) if known else 32 * 2**20


def profile_memory(model: Any, dtype: torch.dtype, *, max_context: int, prefill_tokens: int, max_batch: int,
                   max_k: int, block_size: int, graphs: GraphConfig | None, memory: Any) -> MemoryProfile:
    """Measure what `model` takes besides its KV cache (MemoryProfile), through `memory`
    (CudaMemory). Eager forwards over a throwaway pool at the largest shapes the engine runs:
    one prefill of --prefill-tokens, and the widest verify (max-batch rows of max-k + 1 tokens,
    all kept, as many as a forward of --prefill-tokens holds); with CUDA graphs, the largest
    bucket's static step, which is about what the capture keeps (its graphs share one pool
    and one output buffer: runner._record_all), and the capture stream's cuBLAS workspace;
    `graphs` None: no capture. The pool's own bytes are not counted."""
    layers, device = model.config.num_hidden_layers, model.get_input_embeddings().weight.device
    memory.settle()
    weights = memory.allocated()
    prefill = max(1, min(prefill_tokens, max_context))
    width = min(max_k + 1, prefill)  # a verify of max_k drafts
    rows = max(1, min(max_batch, prefill // width))
    blocks = max(-(-prefill // block_size), rows * -(-width // block_size))
    pool = PagedKVPool(blocks * block_size, block_size, layers, device, dtype)
    eager = ModelRunner(model, pool, max_context=max_context, graphs=GraphConfig(mode="off"), sharded=False)
    runs = {f"prefill 1 x {prefill}": ([[0] * prefill], 1), f"verify {rows} x {width}": ([[0] * width] * rows, width)}
    activations = 0
    for name, (ids, keep) in runs.items():
        tables = [BlockTable() for _ in ids]
        for t, row in zip(tables, ids):
            pool.reserve(t, len(row))
        memory.reset_peak()
        base = memory.allocated()
        with torch.inference_mode():
            eager.forward(StepBatch(tables, [0] * len(ids), ids, keep))
        activations = max(activations, memory.peak() - base - (pool.nbytes() if name.startswith("prefill") else 0))
        for t in tables:
            pool.free(t)
    shapes = list(runs)
    graph_bytes = 0
    if graphs is not None:
        static = ModelRunner(model, pool, max_context=max_context, sharded=False,
                             graphs=dataclasses.replace(graphs, mode="static", compile=False))
        b, q, c = static.capture_order()[0]
        static._dev_in.zero_()  # every row padding: reads and writes land in the scratch block
        memory.reset_peak()
        base = memory.allocated()
        with torch.inference_mode():
            out = static._static_forward(b, q, c)
        # and the output buffer the graphs share, and their capture stream's workspace
        graph_bytes = memory.peak() - base + out.numel() * out.element_size() + memory.stream_workspace()
        shapes.append(f"captured bucket {b} x {q} x {c}")
        del out, static
    del eager, pool
    memory.settle()
    free, total = memory.free_total()
    return MemoryProfile(weights, max(activations, 0), max(graph_bytes, 0), total, free, tuple(shapes))


def kv_cache_tokens(model: Any, cfg: EngineConfig, *, dtype: torch.dtype, devices: list[torch.device],
                    max_context: int, role: str, memory: Any = None) -> int:
    """Tokens the engine's pool holds: --kv-cache-tokens, or as many as --kv-cache-memory or
    --gpu-memory-utilization leave room for at the model's own bytes per token (logged).
    `memory` reads the card for --gpu-memory-utilization (CudaMemory of the model's device)."""
    if cfg.kv_cache_memory is None and cfg.gpu_memory_utilization is None:
        return cfg.kv_cache_tokens
    per_token = slot_bytes(model, dtype, len(devices))
    if cfg.gpu_memory_utilization is None:
        budget, flag = cfg.kv_cache_memory, "--kv-cache-memory"
    else:
        flag = f"--gpu-memory-utilization {cfg.gpu_memory_utilization:g}"
        if len(devices) > 1:
            raise ValueError(f"{flag} sizes the cache on one GPU, and this model is spread over {len(devices)} devices "
                             "(--device-map): give --kv-cache-memory (the bytes for all of them) or --kv-cache-tokens")
        memory = memory if memory is not None else CudaMemory(devices[0])
        captured = cfg.graphs.mode == "auto" and devices[0].type == "cuda"  # what ModelRunner captures
        p = profile_memory(model, dtype, max_context=max_context, prefill_tokens=cfg.prefill_tokens,
                           max_batch=cfg.max_batch, max_k=cfg.max_k, block_size=cfg.kv_block_size,
                           graphs=cfg.graphs if captured else None, memory=memory)
        budget = kv_memory_for_utilization(cfg.gpu_memory_utilization, p)
        log.info("%s: %s of %.2f GiB: weights %.2f GiB, activations %.2f GiB (%s), CUDA graphs %.2f GiB, KV cache "
                 "%.2f GiB", role, flag, p.total / GiB, p.weights / GiB, p.activations / GiB, ", ".join(p.shapes),
                 p.graphs / GiB, budget / GiB)
    tokens = kv_tokens_for_memory(budget, per_token, cfg.kv_block_size, flag)
    log.info("%s: %s: %.2f GiB for the KV cache at %d bytes per token: %d tokens", role, flag, budget / GiB,
             per_token, tokens)
    return tokens
