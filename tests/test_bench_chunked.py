"""make bench-chunked's arithmetic (eftmesh_lab.bench_chunked.waits): the benchmark itself runs
SmolLM2 in three processes for minutes, so only what it computes from arrival times is tested."""

from __future__ import annotations

import pytest

from eftmesh_lab.bench_chunked import waits


def test_the_stall_is_the_longest_wait_overlapping_the_long_prefill_and_p99_spans_the_round():
    # stream a waits 5 s across the long prompt's prefill [10, 14]; stream b waits 2 s inside it;
    # waits of 8 and 9 s that ended before the long prompt arrived are not its stall, but are in
    # the round's p99
    a = [0.0, 1.0, 9.0, 10.0, 15.0, 15.5]
    b = [0.0, 0.5, 9.5, 11.0, 13.0, 13.5]
    stall, p99 = waits([a, b], 10.0, 14.0)
    assert stall == pytest.approx(5.0)
    assert p99 == pytest.approx(8.0)  # 10 waits: the p99 is the 9th of them sorted
    assert waits([[1.0]], 0.0, 1.0) == (0.0, 0.0)  # one chunk: no wait at all
