"""Tiny random GPT-2 models sharing one tokenizer, made in seconds.

They stand in for real checkpoints in tests (random weights, so the mesh's arithmetic can be
checked against transformers exactly) and in `make run` until the trained demo family is
shipped. Each is a real Hugging Face checkpoint directory that `from_pretrained` loads.

    python -m eftmesh.tiny --out build/tiny
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

# Enough text for a byte-level BPE to learn a few hundred merges; any English prose works.
_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. In the beginning God created the heaven and the earth. And the
earth was without form, and void; and darkness was upon the face of the deep. The quick brown
fox jumps over the lazy dog. Question: Where does Mara live? Answer: Mara lives in Dunmore.
Émile a visité Zürich et São Paulo — naïve café, 東京, Ελλάδα. Numbers 0 1 2 3 4 5 6 7 8 9.
"""

# role -> (layers, width, heads, seed). base-large costs several times base-small per token.
TINY_FAMILY: dict[str, tuple[int, int, int, int]] = {
    "base-large": (4, 128, 4, 1),
    "base-small": (2, 64, 2, 2),
    "ft-small": (2, 64, 2, 3),
}


def make_tokenizer(out_dir: Path, vocab_size: int = 384) -> None:
    """Train a byte-level BPE on the text above and save it as a GPT-2 tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [_TEXT] * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out_dir))
    (out_dir / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", '
        '"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 128}\n'
    )
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def make_model(
    out_dir: Path,
    tokenizer_dir: Path,
    layers: int,
    width: int,
    heads: int,
    seed: int,
    vocab_padding: int = 0,
    n_positions: int = 128,
    logit_std: float = 2.0,
) -> None:
    """A random GPT-2 checkpoint (float32 safetensors) with the tokenizer's files beside it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok) + vocab_padding,
        n_positions=n_positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(cfg)
    # GPT-2's init gives near-uniform rows; logits with a standard deviation near 2 make the
    # models peaked and different from each other, which an EFT test needs to see anything.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, logit_std / width**0.5)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def make_tiny_family(out: Path, roles: dict[str, tuple[int, int, int, int]] | None = None) -> dict[str, Path]:
    """Write a tokenizer and one tiny model per role under `out`; return role -> directory."""
    out = Path(out)
    tok_dir = out / "tokenizer"
    make_tokenizer(tok_dir)
    paths = {}
    for role, (layers, width, heads, seed) in (roles or TINY_FAMILY).items():
        make_model(out / role, tok_dir, layers, width, heads, seed)
        paths[role] = out / role
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write tiny random GPT-2 models that share one tokenizer.")
    p.add_argument("--out", default="build/tiny", help="output directory (default: %(default)s)")
    a = p.parse_args(argv)
    for role, path in make_tiny_family(Path(a.out)).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
