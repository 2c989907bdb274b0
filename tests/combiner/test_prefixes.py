"""The combiner's estimate of what the logit services' prefix caches hold (combiner/prefixes.py)."""

from __future__ import annotations

import pytest

from eftmesh.combiner.prefixes import PrefixEstimate, chain


def test_a_prompt_is_cached_up_to_the_longest_remembered_chain_of_whole_blocks():
    est = PrefixEstimate(block=4, capacity=100)
    history = list(range(100, 122))  # 22 tokens: 5 whole blocks
    assert est.cached(history) == 0 and est.uncached(history) == 22
    est.remember(history)
    assert len(est) == 5
    assert est.cached(history + [7, 8, 9]) == 20  # a next turn: its history's whole blocks
    assert est.cached(history[:20]) == 16  # never the last token: its row must be computed
    assert est.uncached([1] + history) == 23  # the same tokens one place later: another chain
    changed = history[:5] + [0] + history[6:]
    assert est.cached(changed) == 4  # equal up to the block that differs
    assert est.cached([]) == 0 and est.uncached([5]) == 1


def test_chains_key_a_block_by_everything_before_it():
    a, b = list(chain([1, 2, 3, 4, 5, 6, 7, 8], 4)), list(chain([9, 9, 9, 9, 5, 6, 7, 8], 4))
    assert len(a) == 2 and a[1] != b[1]  # the same second block after another first one


def test_the_least_recently_used_chains_are_forgotten_first():
    est = PrefixEstimate(block=2, capacity=4)
    est.remember([1, 2, 3, 4])  # 2 blocks
    est.remember([5, 6, 7, 8])  # 2 more: full
    assert est.cached([1, 2, 3, 4, 0]) == 4  # used: now the most recent
    est.remember([9, 9])  # over capacity: [5, 6]'s chain goes first
    assert est.cached([5, 6, 7, 8, 0]) == 0 and est.cached([1, 2, 3, 4, 0]) == 4 and len(est) == 4
    with pytest.raises(ValueError, match="block and capacity"):
        PrefixEstimate(block=0)
