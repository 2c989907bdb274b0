"""The two tiny model shapes the logit tests run engines over: GPT-2 (learned positions,
multi-head) and Llama (rotary, grouped-query attention), random weights from a seed."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_models(vocab: int, positions: int, seed: int) -> dict[str, torch.nn.Module]:
    """{"gpt2": ..., "llama": ...} in eval mode, 2 layers of width 32, `positions` long."""
    torch.manual_seed(seed)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                                      initializer_range=0.2, tie_word_embeddings=False))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=positions, initializer_range=0.2,
                                         tie_word_embeddings=False))
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


def graph_llama(vocab: int) -> torch.nn.Module:
    """The graph tests' GQA Llama (3 layers of width 64, 256 positions; seed 0), float32 on the
    CPU in eval mode: test_runner_cuda.py captures it, test_runner.py runs its static path."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        initializer_range=0.2, tie_word_embeddings=False)).eval()
