"""Checks of the logit service's flags that `eftmesh up` makes too, before it starts any service
(no torch here, so `up` answers at once). The service's parser (server.py) makes the same ones."""

from __future__ import annotations

KV_SIZING = ("--kv-cache-tokens", "--kv-cache-memory", "--gpu-memory-utilization")
# --kv-cache-dtype: what the paged KV cache stores (vLLM's names): the model's dtype, or 8-bit
# floats, fp8 being fp8_e4m3 (kvcache.KV_DTYPES maps them to torch dtypes)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def kv_sizing_error(tokens: int | None, memory: str | None, utilization: float | None) -> str | None:
    """What is wrong with the KV cache sizing flags given (None: not given), or None: at most
    one of them, and a share of the GPU in (0, 1]."""
    given = [flag for flag, value in zip(KV_SIZING, (tokens, memory, utilization)) if value is not None]
    if len(given) > 1:
        return f"{' and '.join(given)} {'both' if len(given) == 2 else 'all'} size the KV cache: give one of them"
    if utilization is not None and not 0 < utilization <= 1:
        return f"--gpu-memory-utilization is a share of the GPU's memory, 0 < F <= 1, got {utilization:g}"
    return None
