"""Training plumbing: schedules, batches, the loss log, resume, and greedy completion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eftmesh_lab.demo.inference import greedy_complete
from eftmesh_lab.demo.training import (
    IGNORE_INDEX, LossLog, ModelSpec, Schedule, new_model, pair_batches, stream_batches,
    train_stage,
)

TINY = ModelSpec(n_layer=1, n_embd=16, n_head=2)


def test_schedule_warms_up_then_decays_to_its_floor() -> None:
    schedule = Schedule(steps=100, batch_size=1, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert schedule.lr_at(0) == 0.1
    assert schedule.lr_at(9) == 1.0
    lrs = [schedule.lr_at(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert abs(schedule.lr_at(100) - 0.1) < 1e-9


def test_stream_batches_are_a_function_of_the_rng_seed() -> None:
    streams = [np.arange(1000, dtype=np.uint16), np.arange(5000, 6000, dtype=np.uint16)]
    make = stream_batches(streams, [0.5, 0.5], batch_size=8, block_size=16)
    a = make(np.random.default_rng([1, 2]))
    b = make(np.random.default_rng([1, 2]))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    input_ids, labels, mask = a
    assert input_ids.shape == labels.shape == mask.shape == (8, 16)
    assert torch.equal(input_ids, labels) and bool(mask.all())
    assert bool((input_ids[:, 1:] - input_ids[:, :-1] == 1).all())  # contiguous windows


def test_pair_batches_train_on_the_completion_only() -> None:
    pairs = [([0, 5, 6], [7, 0]), ([0, 5], [8, 9, 0])]
    input_ids, labels, mask = pair_batches(pairs, batch_size=2, pad_id=0)(
        np.random.default_rng(0))
    for row in range(2):
        length = int(mask[row].sum())
        ids = input_ids[row, :length].tolist()
        prompt, completion = next(p for p in pairs if p[0] + p[1] == ids)
        assert labels[row, :len(prompt)].tolist() == [IGNORE_INDEX] * len(prompt)
        assert labels[row, len(prompt):length].tolist() == completion
        assert (labels[row, length:] == IGNORE_INDEX).all()


def test_loss_log_truncates_a_stage_past_its_checkpoint(tmp_path: Path) -> None:
    log = LossLog(tmp_path / "log.jsonl")
    for step in (10, 20, 30):
        log.write(stage="a", step=step, loss=1.0)
        log.write(stage="b", step=step, loss=1.0)
    log.truncate_stage("a", after_step=10)
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("a", 10), ("b", 10), ("b", 20), ("b", 30)]


class _Interrupted(Exception):
    pass


def test_a_resumed_stage_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    streams = [np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16)]
    make = stream_batches(streams, [1.0], batch_size=2, block_size=8)
    schedule = Schedule(steps=6, batch_size=2, lr=1e-2, warmup_steps=1)

    def run(directory: Path, batches) -> torch.nn.Module:
        torch.manual_seed(0)
        model = new_model(TINY, vocab_size=64, n_positions=16, eos_id=0)
        train_stage("t", model, schedule, batches, seed=3, checkpoint=directory / "c.pt",
                    log=LossLog(directory / "log.jsonl"), device=torch.device("cpu"),
                    checkpoint_seconds=0.0, log_every=2)
        return model

    def interrupted_at_step_4(rng: np.random.Generator):
        interrupted_at_step_4.calls += 1
        if interrupted_at_step_4.calls > 4:
            raise _Interrupted
        return make(rng)

    interrupted_at_step_4.calls = 0
    for name in ("whole", "parts"):
        (tmp_path / name).mkdir()
    whole = run(tmp_path / "whole", make)
    with pytest.raises(_Interrupted):
        run(tmp_path / "parts", interrupted_at_step_4)
    assert torch.load(tmp_path / "parts" / "c.pt", weights_only=False)["step"] == 4
    resumed = run(tmp_path / "parts", make)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    logged = [json.loads(line)["step"]
              for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6]


class _CharTokenizer:
    """Stand-in for a tokenizer: one id per character, '#' is EOS (id 0)."""

    alphabet = "#abcdefghijklmnopqrstuvwxyz "

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.alphabet[i] for i in ids)


@torch.no_grad()
def test_greedy_complete_matches_one_prompt_at_a_time_without_cache() -> None:
    torch.manual_seed(1)
    model = new_model(TINY, vocab_size=28, n_positions=32, eos_id=0).eval()
    tokenizer = _CharTokenizer()
    prompts = ["#ab", "#cd", "#hello", "#hi"]
    batched = greedy_complete(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    for prompt, completion in zip(prompts, batched):
        ids = tokenizer.encode(prompt)
        new: list[int] = []
        for _ in range(6):
            next_id = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(next_id)
            if next_id == 0:
                break
        assert completion == tokenizer.decode(new)
