"""Training loops for the demo family: pre-training on token streams and supervised
fine-tuning on prompt/completion pairs, both resumable from checkpoints.

Every batch is drawn from a generator seeded by (seed, step), so a run resumed from a checkpoint
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one GPT-2-style model of the family."""

    n_layer: int
    n_embd: int
    n_head: int


@dataclass(frozen=True)
class Schedule:
    """Optimisation settings of one training stage."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # memorising facts is the point; decay only fights it
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


def new_model(spec: ModelSpec, vocab_size: int, n_positions: int, eos_id: int) -> GPT2LMHeadModel:
    """A freshly initialised model; dropout off, since the family is trained for few steps
    on data it must memorise."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


class LossLog:
    """An append-only JSONL log of training losses, one line per logged step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_stage(self, stage: str, after_step: int) -> None:
        """Drop a stage's lines past `after_step`: a resumed run logs those steps again."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if row["stage"] != stage or row["step"] <= after_step:
                kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, **row: object) -> None:
        """Append one row."""
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class StageResult:
    """What a finished training stage reports to FAMILY.json."""

    steps: int
    tokens: int  # tokens whose loss was trained on
    final_loss: float  # mean over the last logged interval
    wall_seconds: float


BatchFn = Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def train_stage(
    stage: str,
    model: GPT2LMHeadModel,
    schedule: Schedule,
    make_batch: BatchFn,
    seed: int,
    checkpoint: Path,
    log: LossLog,
    device: torch.device,
    checkpoint_seconds: float = 180.0,
    log_every: int = 10,
) -> StageResult:
    """Train `model` in place for `schedule.steps` steps, resuming from `checkpoint` if present.

    `make_batch(rng)` returns (input_ids, labels, attention_mask), each [batch, time]; labels
    use IGNORE_INDEX for positions without loss. The model, optimiser state, step, token count
    and elapsed time are checkpointed every `checkpoint_seconds` and at the end.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.95),
                                  weight_decay=schedule.weight_decay)
    step, tokens, elapsed = 0, 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
    log.truncate_stage(stage, step)

    def save() -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "tokens": tokens, "elapsed": elapsed}, tmp)
        os.replace(tmp, checkpoint)  # atomic: a kill mid-save leaves the old checkpoint

    recent: list[float] = []
    final_loss = float("nan")
    last_save = time.monotonic()
    started = time.monotonic() - elapsed
    bar = tqdm(total=schedule.steps, initial=step, desc=stage, unit="step", dynamic_ncols=True)
    while step < schedule.steps:
        rng = np.random.default_rng([seed, step])
        input_ids, labels, mask = (t.to(device) for t in make_batch(rng))
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        step += 1
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        recent.append(loss.item())
        elapsed = time.monotonic() - started
        if step % log_every == 0 or step == schedule.steps:
            final_loss = sum(recent) / len(recent)
            log.write(stage=stage, step=step, loss=round(final_loss, 4),
                      lr=schedule.lr_at(step - 1), tokens=tokens, elapsed_s=round(elapsed, 1))
            bar.set_postfix(loss=f"{final_loss:.3f}")
            recent = []
        bar.update(1)
        if time.monotonic() - last_save > checkpoint_seconds:
            save()
            last_save = time.monotonic()
    bar.close()
    save()
    if math.isnan(final_loss):  # resumed at the very end: report the logged value
        rows = [json.loads(line) for line in log.path.read_text().splitlines()]
        final_loss = next(r["loss"] for r in reversed(rows) if r["stage"] == stage)
    model.eval()
    return StageResult(steps=step, tokens=tokens, final_loss=final_loss, wall_seconds=elapsed)


def stream_batches(streams: Sequence[np.ndarray], weights: Sequence[float], batch_size: int,
                   block_size: int) -> BatchFn:
    """Pre-training batches: each row a random window of `block_size` tokens from one of the
    token streams, the stream drawn with probability `weights`."""
    probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)

    def make_batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sources = rng.choice(len(streams), size=batch_size, p=probabilities)
        rows = []
        for source in sources:
            stream = streams[source]
            start = int(rng.integers(0, len(stream) - block_size))
            rows.append(stream[start:start + block_size].astype(np.int64))
        input_ids = torch.from_numpy(np.stack(rows))  # [batch, block]
        return input_ids, input_ids.clone(), torch.ones_like(input_ids)

    return make_batch


def pair_batches(pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
                 pad_id: int) -> BatchFn:
    """Fine-tuning batches of (prompt ids, completion ids) pairs, right-padded; the loss covers
    the completion only, EOS included, so the model learns where to stop."""

    def make_batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=batch_size, replace=False)]
        width = max(len(p) + len(c) for p, c in chosen)
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)  # [batch, width]
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (prompt, completion) in enumerate(chosen):
            ids = prompt + completion
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, len(prompt):len(ids)] = torch.tensor(completion)
            mask[row, :len(ids)] = 1
        return input_ids, labels, mask

    return make_batch
