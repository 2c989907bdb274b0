"""Where a model's weights live, and what its config admits: device maps, memory caps, context
length, the attention layout the paged cache serves, and a sharded model's mask hand-off.

No gRPC here; the engine and the server's flag parsing use these.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from typing import Any

import torch

from eftmesh.common import loading

from eftmesh.logit.kvcache import BatchView

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    model_id: str,
    *,
    role: str,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, str] | None = None,
    revision: str | None = None,
    tokenizer: str | None = None,
    tokenizer_revision: str | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, model id) of a checkpoint folder, a .gguf file (dequantised to float)
    or a hub id at `revision` (eftmesh.common.loading); the tokenizer from `tokenizer` (at
    `tokenizer_revision`) when given, else from the model's own spec. An unloadable spec raises
    loading.LoadError, one line naming --model or --tokenizer.

    Weights go straight to their devices as they are read (low_cpu_mem_usage): never the whole
    model staged in host RAM. `device_map` None puts every module on `device`; "auto" spreads
    the layers over the visible GPUs (accelerate, within `max_memory` per device, e.g.
    {0: "70GiB", 1: "70GiB"}); a dict names each module's device.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if max_memory and device_map is None:
        raise ValueError("--max-memory applies to a device map: pass --device-map auto")
    source = loading.resolve(model_id, revision, flag="--model")
    if tokenizer is None:
        tok = loading.load_tokenizer_from(source, flag="--model", trust_remote_code=trust_remote_code)
    else:
        tok = loading.load_tokenizer(tokenizer, tokenizer_revision, flag="--tokenizer",
                                     trust_remote_code=trust_remote_code)
    load: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device_map is not None:
        load.update(device_map=device_map, low_cpu_mem_usage=True)
        if max_memory:
            load["max_memory"] = max_memory
    elif importlib.util.find_spec("accelerate") is not None:
        load.update(device_map={"": device}, low_cpu_mem_usage=True)
    model = loading.load_causal_lm_from(source, flag="--model", **load)
    if "device_map" not in load:
        model = model.to(device)  # no accelerate: load on the CPU, then move
    if device_map is not None:
        log.info("%s: device map %s", role, getattr(model, "hf_device_map", device_map))
    return model, tok, source.model_id


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """--device-map: "none" (or empty) -> None, "auto" -> "auto", else a JSON object of module
    names to devices (e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1})."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    if text.strip() == "auto":
        return "auto"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--device-map must be none, auto or a JSON object of module names to devices: {e}") from None
    if not isinstance(value, dict) or not value:
        raise ValueError("--device-map JSON must be a non-empty object of module names to devices")
    return value


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """--max-memory "0=70GiB,1=70GiB,cpu=8GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "8GiB"}."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        if not sep or not key or not size:
            raise ValueError(f"--max-memory wants DEVICE=SIZE pairs separated by commas, got {part!r}")
        out[int(key) if key.isdigit() else key] = size
    return out


def model_devices(model: Any) -> list[torch.device]:
    """The devices the model's weights are on, in module order, without repeats."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def model_max_context(config: Any) -> int:
    """The longest sequence a transformers config admits (positions it can embed)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length from its config; pass --max-context")


def check_full_attention(config: Any) -> None:
    """The paged cache serves full-attention decoders; sliding windows would need their own layout."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"{getattr(config, 'model_type', 'this model')} uses sliding-window or non-attention layers "
            f"({sorted(kinds)}); eftmesh's paged KV cache serves full-attention models only"
        )


def mask_swapper(device: torch.device) -> Any:
    """A forward pre-hook for a module on `device`: where its arguments carry a BatchView and
    that view's mask, it gets the view's copy of the mask on `device` instead."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        view = next((a for a in (*args, *kwargs.values()) if isinstance(a, BatchView)), None)
        if view is None or view.mask is None or view.mask.device == device:
            return None
        mask = view.mask_on(device)
        return (tuple(mask if a is view.mask else a for a in args),
                {k: mask if v is view.mask else v for k, v in kwargs.items()})

    return hook
