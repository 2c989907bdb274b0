"""Derived upstream deadlines (combiner/deadlines.py): pure, no clock, no network."""

import pytest

from eftmesh.combiner.deadlines import PREFILL_TOKENS, STRAGGLER_FLOOR_S, CallDeadlines, DeadlinePolicy


def test_no_deadline_is_derived_before_a_role_answered_or_without_another_replica():
    d = CallDeadlines(DeadlinePolicy(margin=10, floor_s=1.0, cap_s=30.0))
    assert d.deadline("base-large", 1, failover=True) == (30.0, False)
    d.record("base-large", 0.02, 1)
    assert d.deadline("base-large", 1, failover=False) == (30.0, False)  # waiting is the only way
    assert d.deadline("ft-small", 1, failover=True) == (30.0, False)  # another role: nothing learned


def test_the_deadline_is_a_margin_over_the_typical_call_within_floor_and_cap():
    d = CallDeadlines(DeadlinePolicy(margin=10, floor_s=1.0, cap_s=30.0))
    d.record("r", 0.02, 1)
    assert d.deadline("r", 1, failover=True) == (1.0, True)  # 10 x 20 ms is below the floor
    for _ in range(50):
        d.record("r", 0.5, 1)  # a slower model: the average follows
    seconds, derived = d.deadline("r", 1, failover=True)
    assert derived and seconds == pytest.approx(5.0, rel=0.01)
    for _ in range(50):
        d.record("r", 10.0, 1)
    assert d.deadline("r", 1, failover=True) == (30.0, True)  # capped at --call-timeout


def test_a_long_prompt_gets_time_in_proportion_to_its_tokens():
    d = CallDeadlines(DeadlinePolicy(margin=4, floor_s=0.1, cap_s=100.0))
    d.record("r", 0.01, 1)  # decode steps: 10 ms
    d.record("r", 0.64, 64)  # a 64-token prefill: 10 ms per token
    short, _ = d.deadline("r", 1, failover=True)
    long, _ = d.deadline("r", 1000, failover=True)
    assert short == pytest.approx(0.1)  # 4 x 10 ms = 40 ms, floored
    assert long == pytest.approx(4 * 1000 * 0.01)  # 1000 tokens at 10 ms each, times the margin
    d.record("r", 0.01, PREFILL_TOKENS - 1)  # a step teaches nothing per token
    assert d.snapshot()["r"]["token_s"] == pytest.approx(0.01)
    assert d.snapshot()["r"]["call_s"] == pytest.approx(0.01)  # and a prefill nothing per step


def test_bad_policies_name_their_flags():
    with pytest.raises(ValueError, match="--upstream-deadline-margin"):
        DeadlinePolicy(margin=0.5)
    with pytest.raises(ValueError, match="--upstream-deadline-floor"):
        DeadlinePolicy(floor_s=60.0, cap_s=30.0)
    with pytest.raises(ValueError, match="--upstream-straggler-factor"):
        DeadlinePolicy(straggler_factor=0.5)


def test_a_step_waits_for_a_straggler_a_smaller_multiple_of_the_same_estimate():
    d = CallDeadlines(DeadlinePolicy(margin=10, floor_s=1.0, cap_s=30.0, straggler_factor=2.0))
    assert d.hold_after("r", 1) is None  # nothing known: the step waits
    d.record("r", 0.05, 1)
    assert d.hold_after("r", 1) == pytest.approx(0.1)  # 2 x 50 ms, well before the 1 s deadline
    d.record("r", 0.64, 64)  # prefills: 10 ms per token
    assert d.hold_after("r", 100) == pytest.approx(2.0)  # a long prompt is not a straggler
    fast = CallDeadlines(DeadlinePolicy(straggler_factor=2.0))
    fast.record("r", 0.001, 1)
    assert fast.hold_after("r", 1) == STRAGGLER_FLOOR_S  # never below a scheduler's time slice


def test_a_draft_call_is_expected_to_take_its_forwards_not_one_steps_time():
    """A draft role's calls mix one-forward ScoreBatches (the plain generations) with DraftBatches
    of k + 1 forwards run one after another. The estimate is per forward, so a k = 8 draft is
    neither set aside as a straggler nor given up on for taking nine forwards, and the drafts do
    not stretch what a score call may take either."""
    d = CallDeadlines(DeadlinePolicy(margin=10, floor_s=0.1, cap_s=30.0, straggler_factor=2.0))
    for _ in range(10):
        d.record("ft-small", 0.010, 1)  # a ScoreBatch: one forward of 10 ms
        d.record("ft-small", 0.090, 5, forwards=9)  # a DraftBatch of k = 8: nine forwards
    assert d.snapshot()["ft-small"]["call_s"] == pytest.approx(0.010)
    assert d.hold_after("ft-small", 5, forwards=9) == pytest.approx(0.18)  # 2 x 9 x 10 ms: the draft is on time
    assert d.hold_after("ft-small", 1) == pytest.approx(0.02)  # a score call still 2 x 10 ms
    assert d.deadline("ft-small", 5, failover=True, forwards=9) == (pytest.approx(0.9), True)
    assert d.deadline("ft-small", 1, failover=True) == (pytest.approx(0.1), True)  # 10 x 10 ms, the floor
