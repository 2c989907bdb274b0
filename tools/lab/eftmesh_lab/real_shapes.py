"""A family of real model shapes with random weights: what a GPU step costs at 1B and 135M.

    python -m eftmesh_lab.real_shapes --out build/real-shapes --device cuda --dtype bfloat16

The shapes come from bench/real-shapes/*.json (base-large: a 1B Llama layout; base-small and
ft-small: SmolLM2-135M's), all on one synthetic 49,152-token tokenizer (bench_vocab's WordLevel
tokenizer: the same ids and fingerprint on every build). Weights are random (seeded):
decoding speed depends on the shape, not on the weights, and the GPU machine has no network to
fetch real ones. ft-small is base-small plus a small perturbation, so that the EFT delta is
not zero. Each role is written as an ordinary checkpoint folder (config, safetensors,
tokenizer), the layout `eftmesh up --models` and `bench_load --models` read.

`--scale` shrinks every width and depth (tests build a tiny family of the same layout on a CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from eftmesh_lab.bench_vocab import make_synthetic_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[3] / "bench" / "real-shapes"
ROLES = {"base-large": "base-large.json", "base-small": "small.json", "ft-small": "small.json"}
VOCAB = 49_152
PERTURBATION = 0.02  # ft-small = base-small + N(0, 0.02^2 * std^2) per weight


def load_config(name: str, scale: float = 1.0) -> Any:
    """The LlamaConfig of a shipped shape; `scale` < 1 shrinks widths and depth (heads kept
    dividing the width, at least one layer)."""
    from transformers import LlamaConfig

    raw = {k: v for k, v in json.loads((CONFIG_DIR / name).read_text()).items() if not k.startswith("_")}
    if scale != 1.0:
        heads = max(1, round(raw["num_attention_heads"] * scale))
        kv = max(1, min(heads, round(raw["num_key_value_heads"] * scale)))
        while heads % kv:
            kv -= 1
        head_dim = max(8, round(raw["head_dim"] * scale) // 2 * 2)
        raw.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                   hidden_size=heads * head_dim, intermediate_size=max(16, round(raw["intermediate_size"] * scale)),
                   num_hidden_layers=max(1, round(raw["num_hidden_layers"] * scale)))
    return LlamaConfig(**raw)


def parameter_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the weights one decode step reads (every parameter once; tied embeddings once)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return n * torch.finfo(dtype).bits // 8


def build(out: Path, device: str = "cpu", dtype: str = "bfloat16", scale: float = 1.0, seed: int = 0) -> dict[str, Path]:
    """Write the three roles under `out` (skipped when already there with the same config)."""
    from transformers import LlamaForCausalLM

    dt = getattr(torch, dtype)
    tok = make_synthetic_tokenizer(VOCAB)
    paths: dict[str, Path] = {}
    small_state: dict[str, torch.Tensor] | None = None
    for role, name in ROLES.items():
        path = paths[role] = out / role
        config = load_config(name, scale)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            print(f"{role}: already in {path}", flush=True)
            continue
        started = time.perf_counter()
        torch.manual_seed(seed + (0 if role == "base-large" else 1))
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dt).eval()
        if role == "base-small":
            small_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif role == "ft-small":
            if small_state is None:
                small_state = {k: v.clone() for k, v in LlamaForCausalLM.from_pretrained(
                    out / "base-small", dtype=dt).to(device).state_dict().items()}
            g = torch.Generator(device=device).manual_seed(seed + 2)
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    base = small_state[k]
                    noise = torch.randn(base.shape, generator=g, device=device, dtype=torch.float32)
                    v.copy_((base.float() + PERTURBATION * base.float().std() * noise).to(dt))
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        n = sum(p.numel() for p in model.parameters())
        print(f"{role}: {n / 1e6:.1f}M parameters ({config.num_hidden_layers} layers x {config.hidden_size}) "
              f"written to {path} in {time.perf_counter() - started:.1f} s", flush=True)
        del model
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eftmesh_lab.real_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="build/real-shapes", help="folder of the three roles (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the random weights are made (default: cuda when available)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="dtype the weights are saved in (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink widths and depth by this factor (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    a = p.parse_args(argv)
    build(Path(a.out), a.device, a.dtype, a.scale, a.seed)


if __name__ == "__main__":
    main()
