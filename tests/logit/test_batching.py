"""Decode steps of different sessions that meet at the model run as one batched forward pass
(caches left-padded and masked, each row at its own position), and give what running them one
at a time gives: the same log-probabilities (float32, 1e-5) and caches that go on agreeing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eftmesh.common.errors import NotFound
from eftmesh.logit.engine import ModelEngine

PREFIXES = {"a": [5, 17, 3, 99, 41, 8, 250], "b": [7, 7], "c": [300, 12, 45, 61]}  # vocab 384


@pytest.fixture(scope="module")
def engines(tiny_family):
    path = str(tiny_family["base-large"])
    alone = ModelEngine.from_pretrained(path, role="base-large")
    batched = ModelEngine.from_pretrained(path, role="base-large", max_batch=8)
    return alone, batched


def count_batches(engine: ModelEngine) -> list[int]:
    sizes: list[int] = []
    original = engine._forward_batch

    def wrapped(ready):
        sizes.append(len(ready))
        return original(ready)

    engine._forward_batch = wrapped
    return sizes


def concurrent_steps(engine: ModelEngine, steps: dict[str, tuple]) -> dict[str, tuple]:
    """Run one step per session (start, token) or (start, tokens, rows) from its own thread,
    all queued while the model is busy, so that they meet."""
    results: dict[str, tuple] = {}

    def run(sid, start, tokens, rows=1):
        tokens = tokens if isinstance(tokens, list) else [tokens]
        try:
            results[sid] = engine.score(sid, start, tokens, rows)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[sid] = (e,)

    threads = [threading.Thread(target=run, args=(sid, *step)) for sid, step in steps.items()]
    with engine._lock:  # the model is busy: every step queues
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(engine._pending) < len(steps) and time.monotonic() < deadline:
            time.sleep(0.001)
    for t in threads:
        t.join(10)
    return results


def test_batched_decode_steps_equal_steps_run_alone(engines):
    alone, batched = engines
    sizes = count_batches(batched)
    for engine in engines:
        for sid, prefix in PREFIXES.items():
            engine.score(sid, 0, prefix, 1)
    next_tokens = {"a": 11, "b": 300, "c": 2}
    for round_ in range(3):  # several rounds: the caches written by a batch must stay right
        steps = {sid: (len(prefix) + round_, next_tokens[sid] + round_) for sid, prefix in PREFIXES.items()}
        got = concurrent_steps(batched, steps)
        for sid, (start, token) in steps.items():
            want, want_len = alone.score(sid, start, [token], 1)
            rows, length = got[sid]
            assert length == want_len == start + 1
            torch.testing.assert_close(rows, want, atol=1e-5, rtol=0)
            assert int(rows.argmax()) == int(want.argmax())
    assert sizes == [3, 3, 3]  # each round ran as one forward of three rows


def test_a_bad_step_fails_alone_and_the_rest_of_its_batch_goes_on(engines):
    _, batched = engines
    sizes = count_batches(batched)
    batched.score("x", 0, [1, 2, 3], 1)
    batched.score("y", 0, [4, 5], 1)
    got = concurrent_steps(batched, {"x": (3, 9), "y": (2, 9), "ghost": (4, 9)})
    assert isinstance(got["ghost"][0], NotFound)
    assert got["x"][1] == 4 and got["y"][1] == 3
    assert sizes == [2]


def test_prefill_and_a_step_alone_take_the_plain_path(engines):
    _, batched = engines
    sizes = count_batches(batched)
    batched.score("p", 0, [1, 2, 3, 4], 2)  # prefill, two rows
    rows, length = batched.score("p", 4, [5], 1)  # a lone decode step: no batch of one
    assert rows.shape[0] == 1 and length == 5
    assert sizes == []


def test_verify_sized_steps_batch_by_length_and_equal_steps_run_alone(engines):
    alone, batched = engines
    sizes = count_batches(batched)
    prefixes = {"v1": [3, 4, 5, 6, 7], "v2": [9, 8], "v3": [1, 1, 2, 3, 5, 8, 13, 21], "v4": [30, 31, 32]}
    for engine in engines:
        for sid, prefix in prefixes.items():
            engine.score(sid, 0, prefix, 1)
    # three verifies of 2 drafts (3 tokens, 3 rows; one asks fewer rows) and one decode step
    steps = {"v1": (5, [10, 11, 12], 3), "v2": (2, [13, 14, 15], 3), "v3": (8, [16, 17, 18], 2),
             "v4": (3, [19], 1)}
    got = concurrent_steps(batched, steps)
    for sid, (start, tokens, rows) in steps.items():
        want, want_len = alone.score(sid, start, tokens, rows)
        got_rows, got_len = got[sid]
        assert got_len == want_len == start + len(tokens) and got_rows.shape == want.shape == (rows, want.shape[1])
        torch.testing.assert_close(got_rows, want, atol=1e-5, rtol=0)
    assert sizes == [3]  # the 3-token steps as one forward; the lone decode step alone
    # the caches a verify batch wrote go on agreeing, after a rollback too
    for sid, (start, _, _) in steps.items():  # keep one of the sent tokens, then one more
        want, _ = alone.score(sid, start + 1, [42], 1)
        got_rows, length = batched.score(sid, start + 1, [42], 1)
        torch.testing.assert_close(got_rows, want, atol=1e-5, rtol=0)
        assert length == start + 2
