"""Plain in-process inference for building and checking the demo family: batched greedy
completion (of one model or an EFT mixture) and a per-token latency measurement. The mesh does
the real serving; this exists so the build can check the family shows EFT's effect before its
weights are committed.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import DynamicCache, GPT2LMHeadModel, PreTrainedTokenizerBase


Mixture = Sequence[tuple[float, GPT2LMHeadModel]]


@torch.no_grad()
def greedy_complete(models: GPT2LMHeadModel | Mixture, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions of `prompts`, decoded with special tokens kept and cut after the
    first EOS.

    `models` is one model or a mixture [(weight, model), ...] whose weighted log-probabilities
    are summed at every step, as in EFT (Mitchell et al., 2024): up-scaling is
    [(1, base-large), (w, ft-small), (-w, base-small)]. The argmax of the sum is the argmax of
    its renormalisation, so greedy decoding needs no softmax over the mixture.

    Prompts are batched only with prompts of the same token length, so no padding (and no
    position-id bookkeeping) is needed; prompts carry their own BOS text.
    """
    mixture = [(1.0, models)] if isinstance(models, GPT2LMHeadModel) else list(models)
    eos_id = mixture[0][1].config.eos_token_id
    device = next(mixture[0][1].parameters()).device
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)
    completions: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], device=device)  # [rows, len]
            mask = torch.ones_like(input_ids)  # [rows, seen]; all ones: nothing is padded
            caches = [DynamicCache() for _ in mixture]
            generated: list[torch.Tensor] = []
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                scores = sum(
                    weight * torch.log_softmax(
                        model(input_ids=input_ids, attention_mask=mask, cache=cache,
                              use_cache=True).logits[:, -1, :].float(), dim=-1)
                    for (weight, model), cache in zip(mixture, caches)
                )  # [rows, vocab]
                next_ids = scores.argmax(dim=-1)  # [rows]
                generated.append(next_ids)
                done |= next_ids == eos_id
                if bool(done.all()):
                    break
                input_ids = next_ids[:, None]  # [rows, 1]
                mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
            tokens = torch.stack(generated, dim=1).tolist()  # [rows, new]
            for i, row in zip(chunk, tokens):
                if eos_id in row:
                    row = row[:row.index(eos_id) + 1]
                completions[i] = tokenizer.decode(row, skip_special_tokens=False)
    return completions


@torch.no_grad()
def ms_per_forward(model: GPT2LMHeadModel, context: int = 64, new_tokens: int = 1,
                   calls: int = 20, rounds: int = 7) -> float:
    """Median milliseconds of one forward call that appends `new_tokens` tokens to a KV cache
    holding `context` tokens (batch 1), on the model's device and torch's current threads.

    Each call's tokens are cropped from the cache again so every call sees the same context.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    step_ids = torch.randint(0, vocab, (1, new_tokens), generator=generator).to(device)
    cache = DynamicCache()
    model(input_ids=prefix, cache=cache, use_cache=True)
    model(input_ids=step_ids, cache=cache, use_cache=True)  # warm-up
    cache.crop(-new_tokens)
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            model(input_ids=step_ids, cache=cache, use_cache=True)
            cache.crop(-new_tokens)
        timings.append((time.perf_counter() - start) / calls * 1000.0)
    return statistics.median(timings)
