"""The speculative acceptance rule on hand-built tensors, with a statistical test that can fail."""

from __future__ import annotations

import math
import random

import pytest
import torch

from eftmesh.core.speculative import (
    AcceptanceShape,
    AdaptiveBlockSize,
    expected_tokens_per_block,
    ideal_speedup,
    per_draft_acceptance,
    verify_greedy,
    verify_sampled,
)

# Chi-square critical values at significance 0.001 (from standard tables).
CHI2_CRIT_001 = {3: 16.266, 4: 18.467, 15: 37.697}


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_keeps_the_matching_prefix_then_corrects():
    p = torch.log_softmax(torch.tensor([[0.0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 5], [5, 0, 0, 0]]), -1)
    assert verify_greedy(torch.tensor([1, 2, 0]), p).__dict__ == {"accepted": 2, "next_token": 3}
    assert verify_greedy(torch.tensor([0, 2, 3]), p).__dict__ == {"accepted": 0, "next_token": 1}


def test_greedy_takes_a_bonus_token_when_every_draft_matches():
    p = torch.log_softmax(torch.tensor([[0.0, 5, 0], [0, 0, 5], [5, 0, 0]]), -1)
    assert verify_greedy(torch.tensor([1, 2]), p).__dict__ == {"accepted": 2, "next_token": 0}


def test_identical_draft_and_target_accept_everything():
    lp = torch.log_softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    g = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(lp[:3].exp(), 1, generator=g).squeeze(1)
    assert verify_sampled(drafts, lp[:3], lp, g).accepted == 3


def test_a_token_the_target_forbids_is_always_rejected():
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    q = torch.log(torch.tensor([[0.1, 0.1, 0.8]]))
    for seed in range(20):
        v = verify_sampled(torch.tensor([2]), q, p, torch.Generator().manual_seed(seed))
        assert v.accepted == 0 and v.next_token in (0, 1)


P = torch.tensor([0.1, 0.2, 0.3, 0.4])
Q = torch.tensor([0.4, 0.3, 0.2, 0.1])


def _first_tokens(q_claimed: torch.Tensor, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run n blocks where drafts come from Q but verification is told q_claimed; return the
    counts of the first and second emitted tokens."""
    g = torch.Generator().manual_seed(seed)
    p = P.log().expand(k + 1, -1)
    first = torch.zeros(4)
    second = torch.zeros(4)
    for _ in range(n):
        drafts = torch.multinomial(Q, k, replacement=True, generator=g)
        v = verify_sampled(drafts, q_claimed.log().expand(k, -1), p, g)
        emitted = drafts[: v.accepted].tolist() + [v.next_token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    return first, second


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_reproduces_the_target_distribution(k):
    first, second = _first_tokens(Q, k, 6000, seed=k)
    assert chi2(first, P) < CHI2_CRIT_001[3]
    if k > 1:  # the second token follows an accepted draft: also distributed as p
        assert second.sum() > 500
        assert chi2(second, P) < CHI2_CRIT_001[3]


def test_the_same_test_rejects_a_sampler_told_the_wrong_q():
    wrong = torch.tensor([0.25, 0.25, 0.25, 0.25])  # drafts really come from Q
    first, _ = _first_tokens(wrong, 1, 6000, seed=7)
    assert chi2(first, P) > CHI2_CRIT_001[3]


def test_verification_processes_p_and_q_with_the_request_settings():
    # raw rows, processed inside (temperature, top-k, top-p): the first emitted token follows
    # process(p), with drafts drawn from process(q); whole blocks of 3, rejections included
    from eftmesh.core.sampling import SamplingConfig, process

    cfg = SamplingConfig(temperature=0.8, top_k=4, top_p=0.95)
    gen = torch.Generator().manual_seed(5)
    # p keeps tokens 0, 1, 2, 4 (top-k drops two); q keeps 1, 2, 3, 5: drafts of 3 and 5 always fail
    p_raw, q_raw = torch.tensor([1.0, 0.2, 0.8, -0.5, 0.5, 0.0]), torch.tensor([0.0, 0.9, 0.3, 0.6, -0.2, 0.7])
    p_proc, q_proc = process(p_raw[None], cfg).exp()[0], process(q_raw[None], cfg).exp()[0]
    first = torch.zeros(6)
    for _ in range(4000):
        drafts = torch.multinomial(q_proc, 3, replacement=True, generator=gen)
        v = verify_sampled(drafts, q_raw.expand(3, -1), p_raw.expand(4, -1), gen, cfg)
        first[(drafts[: v.accepted].tolist() + [v.next_token])[0]] += 1
    kept = p_proc > 0
    assert kept.tolist() == [True, True, True, False, True, False] and first[~kept].sum() == 0  # top-k / top-p's cut holds
    assert chi2(first[kept], p_proc[kept]) < CHI2_CRIT_001[3]  # 4 kept tokens: 3 degrees of freedom


def test_rows_after_a_rejection_are_never_read():
    # draft 0 is forbidden by p, so it is always rejected; row 1 of p (NaN) is never read
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]]))
    q = torch.log(torch.tensor([[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]))
    v = verify_sampled(torch.tensor([2, 1]), q, p, torch.Generator().manual_seed(0))
    assert v.accepted == 0 and v.next_token in (0, 1)


def test_a_row_read_without_finite_mass_is_named():
    from eftmesh.core.sampling import NoFiniteMass

    p = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    q = torch.tensor([[float("nan"), 0.0, 0.0]])
    with pytest.raises(NoFiniteMass, match=r"row\(s\) \[0\]"):
        verify_sampled(torch.tensor([0]), q, p, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("min_rows", [1, 10**6])  # a position per call; every position in one call
def test_a_batch_of_blocks_gets_the_verdicts_each_block_gets_alone(monkeypatch, min_rows):
    from eftmesh.core import speculative
    from eftmesh.core.sampling import NoFiniteMass, SamplingConfig, process

    monkeypatch.setattr(speculative, "LAZY_MIN_ROWS", min_rows)
    cfg = SamplingConfig(temperature=0.9, top_p=0.8)
    gen = torch.Generator().manual_seed(11)
    blocks, p_parts, first = [], [], 0
    for b in range(12):
        k = 1 + b % 4
        q = torch.randn(k + 1, 40, generator=gen)
        p = q + 0.5 * torch.randn(k + 1, 40, generator=gen)  # near q: some drafts pass, some do not
        drafts = torch.multinomial(process(q[:k], cfg).exp(), 1, generator=gen).view(-1)
        if b == 3:
            p[0], p[1] = q[0], float("nan")  # draft 0 always passes; the NaN row after it fails that block alone
        if b == 5:
            p[0, drafts[0]] = -math.inf  # draft 0 always rejected: the NaN row after it is never read
            p[1] = float("nan")
        blocks.append(speculative.Block(drafts.tolist(), first, q, torch.Generator().manual_seed(100 + b)))
        p_parts.append(p)
        first += k + 1
    together = speculative.verify_blocks(torch.cat(p_parts), blocks, cfg)
    for b, (block, p) in enumerate(zip(blocks, p_parts)):
        alone = speculative.verify_blocks(p, [speculative.Block(block.drafts, 0, block.q, torch.Generator().manual_seed(100 + b))], cfg)[0]
        if isinstance(alone, NoFiniteMass):
            assert isinstance(together[b], NoFiniteMass) and str(together[b]) == str(alone)
        else:
            assert together[b] == alone
    assert isinstance(together[3], NoFiniteMass) and together[5].accepted == 0
    accepted = [v.accepted for v in together if not isinstance(v, NoFiniteMass)]
    assert 0 in accepted and any(a > 0 for a in accepted)  # rejections and passes both


@pytest.mark.parametrize("min_rows", [1, 10_000])
def test_draft_probabilities_from_the_drafter_give_the_same_verdicts_without_reading_q(monkeypatch, min_rows):
    """Blocks that bring each draft's q(x) (what the drafting logit service sends, computed by
    token_probs from the same rows) get the verdicts they get when q(x) is read from their rows,
    in a batch with blocks that do not; their q rows are then read only at a rejection (NaN in
    every row before it fails nothing)."""
    from eftmesh.core import speculative
    from eftmesh.core.sampling import SamplingConfig, process, token_probs

    monkeypatch.setattr(speculative, "LAZY_MIN_ROWS", min_rows)
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    gen = torch.Generator().manual_seed(5)
    qs, ps, drafts = [], [], []
    for b in range(10):
        k = 1 + b % 4
        q = torch.randn(k + 1, 50, generator=gen)
        qs.append(q)
        ps.append(q + 0.6 * torch.randn(k + 1, 50, generator=gen))
        drafts.append(torch.multinomial(process(q[:k], cfg).exp(), 1, generator=gen).view(-1))
    p_all = torch.cat(ps)
    firsts = [sum(len(d) + 1 for d in drafts[:b]) for b in range(10)]

    def blocks(q_rows, with_probs):
        return [speculative.Block(d.tolist(), f, q, torch.Generator().manual_seed(200 + b),
                                  token_probs(qs[b][:len(d)], d, cfg)[0].tolist() if b in with_probs else None)
                for b, (d, f, q) in enumerate(zip(drafts, firsts, q_rows))]

    read = speculative.verify_blocks(p_all, blocks(qs, set()), cfg)
    given = set(range(0, 10, 2)) | {9}
    poisoned = [q.clone() for q in qs]
    for b in given:
        poisoned[b][:read[b].accepted] = math.nan  # rows of drafts that passed: never read now
    assert speculative.verify_blocks(p_all, blocks(poisoned, given), cfg) == read
    assert {v.accepted for v in read} >= {0} and any(v.accepted == len(d) for v, d in zip(read, drafts))


@pytest.mark.parametrize("min_rows", [1, 10_000])
def test_flat_rows_verified_from_intervals_get_the_verdicts_exact_probabilities_give(monkeypatch, min_rows):
    """Rows whose top-p nucleus holds thousands of tokens are not cut for the ratio test
    (sampling.token_prob_bounds: p(x) bounded, exactly 0 outside the nucleus); the tests the
    intervals leave open are computed exactly. Verdicts equal those of exact probabilities
    everywhere (the same uniforms), for blocks that bring q(x) and blocks whose q is read."""
    from eftmesh.core import cuts, sampling, speculative
    from eftmesh.core.sampling import SamplingConfig, process, token_probs

    monkeypatch.setattr(speculative, "LAZY_MIN_ROWS", min_rows)
    cfg, vocab = SamplingConfig(temperature=1.0, top_p=0.75), 20_000
    gen = torch.Generator().manual_seed(21)
    qs, ps, drafts = [], [], []
    for b in range(12):
        k = 1 + b % 4
        q = torch.randn(k + 1, vocab, generator=gen) * 0.3  # flat: a nucleus of ~15,000 tokens
        qs.append(q)
        ps.append(q + 0.15 * torch.randn(k + 1, vocab, generator=gen))
        drafts.append(torch.multinomial(process(q[:k], cfg).exp(), 1, generator=gen).view(-1))
    p_all = torch.cat(ps)
    firsts = [sum(len(d) + 1 for d in drafts[:b]) for b in range(12)]
    sent = set(range(0, 12, 3))

    def verify() -> list:
        return speculative.verify_blocks(p_all, [
            speculative.Block(d.tolist(), f, q, torch.Generator().manual_seed(300 + b),
                              token_probs(q[:len(d)], d, cfg)[0].tolist() if b in sent else None)
            for b, (d, f, q) in enumerate(zip(drafts, firsts, qs))], cfg)

    opened, bounded = [], []
    real_exact, real_bounds = speculative._exact_tests, cuts.nucleus_bounds
    monkeypatch.setattr(speculative, "_exact_tests", lambda *a: opened.append(len(a[2])) or real_exact(*a))
    monkeypatch.setattr(sampling, "nucleus_bounds", lambda *a: bounded.append(len(a[3])) or real_bounds(*a))
    got = verify()
    assert bounded and opened and sum(opened) < sum(bounded) / 3  # intervals decide most tests

    def exact(rows, tokens, cfg, overwrite=False):
        lo, ok = token_probs(rows, tokens, cfg, overwrite=overwrite)
        return lo, lo, ok

    monkeypatch.setattr(speculative, "token_prob_bounds", exact)
    assert got == verify()
    assert any(v.accepted < len(d) for v, d in zip(got, drafts)) and any(v.accepted == len(d) for v, d in zip(got, drafts))


def test_seeded_verification_is_deterministic():
    lp = torch.log_softmax(torch.randn(5, 9, generator=torch.Generator().manual_seed(3)), -1)
    q = torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(4)), -1)
    drafts = torch.tensor([1, 2, 3, 4])
    a = [verify_sampled(drafts, q, lp, torch.Generator().manual_seed(s)) for s in range(10)]
    b = [verify_sampled(drafts, q, lp, torch.Generator().manual_seed(s)) for s in range(10)]
    assert a == b


def test_the_ceiling_formula():
    assert expected_tokens_per_block(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens_per_block(1.0, 4) == pytest.approx(5.0)
    assert expected_tokens_per_block(0.5, 2) == pytest.approx(1.75)
    assert ideal_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / 0.2 / 1.4)


def test_adaptive_block_size_grows_with_acceptance_and_shrinks_without():
    a = AdaptiveBlockSize(max_k=16, cost_ratio=0.1, initial_acceptance=0.5)
    k0 = a.k
    for _ in range(20):
        a.update(a.k, a.k)  # everything accepted
    assert a.k > k0 and a.k <= 16
    for _ in range(20):
        a.update(0, a.k)  # nothing accepted
    assert a.k == 1


def test_adaptive_block_size_picks_the_best_k_for_its_estimate():
    a = AdaptiveBlockSize(max_k=16, cost_ratio=0.2, initial_acceptance=0.8)
    best = max(range(1, 17), key=lambda k: ideal_speedup(0.8, k, 0.2))
    assert a.k == best


@pytest.mark.parametrize("a,k", [(0.3, 4), (0.56, 4), (0.9, 8), (0.5, 1)])
def test_per_draft_acceptance_inverts_the_expected_block(a, k):
    mean_kept = expected_tokens_per_block(a, k) - 1.0
    assert per_draft_acceptance(mean_kept, k) == pytest.approx(a, abs=1e-6)


def test_adaptive_estimate_counts_only_tested_drafts():
    a = AdaptiveBlockSize(max_k=8, cost_ratio=0.1, initial_acceptance=0.5, smoothing=1.0)
    a.update(accepted=1, drafted=4)  # kept 1, tested 2 (the rejected one), never tested 2
    assert a.acceptance == pytest.approx(0.5)
    a.update(accepted=4, drafted=4)  # all 4 tested and kept
    assert a.acceptance == pytest.approx(1.0)


def test_draft_cuts_from_the_drafter_give_the_same_tokens_and_spare_the_residual_its_cut(monkeypatch):
    """Blocks that bring each draft row's top-p cut (what the drafting logit service sends with
    q(x): `sample_with_probs`' cuts) get the verdicts they get without them, and a rejection's
    residual then cuts only p's row; cuts that are not the rows' own change its token (the
    residual reads them: this test could fail)."""
    import numpy as np

    from eftmesh.core import fusedrows, speculative
    from eftmesh.core.sampling import SamplingConfig, per_row_uniforms, sample_with_probs

    cfg, vocab = SamplingConfig(temperature=float(np.float32(0.7)), top_p=float(np.float32(0.9))), 3_000
    gen = torch.Generator().manual_seed(8)
    qs, ps, drafts, probs, made = [], [], [], [], []
    for b in range(12):
        k = 1 + b % 4
        q = torch.randn(k + 1, vocab, generator=gen) * 2
        qs.append(q)
        ps.append(q + 1.5 * torch.randn(k + 1, vocab, generator=gen))  # apart: most blocks reject a draft
        u, more = per_row_uniforms([torch.Generator().manual_seed(50 + b)] * k)
        d, ok, qx, cut = sample_with_probs(q[:k].clone(), cfg, u, more=more)
        assert ok.all() and cut is not None
        drafts.append(d.tolist())
        probs.append(qx.tolist())
        made.append(list(zip(cut[0].tolist(), cut[1].tolist())))
    p_all = torch.cat(ps)
    firsts = [sum(len(d) + 1 for d in drafts[:b]) for b in range(12)]

    def verify(cuts):
        return speculative.verify_blocks(p_all, [
            speculative.Block(d, f, q, torch.Generator().manual_seed(400 + b), probs[b], cuts[b])
            for b, (d, f, q) in enumerate(zip(drafts, firsts, qs))], cfg)

    made_here = []
    real = fusedrows.nucleus_cut
    monkeypatch.setattr(fusedrows, "nucleus_cut", lambda *a: made_here.append(1) or real(*a))
    without = verify([None] * 12)
    cuts_without = len(made_here)
    rejected = sum(v.accepted < len(d) for v, d in zip(without, drafts))
    assert rejected >= 6 and cuts_without >= 2 * rejected  # each rejection: p's cut and q's (and any exact test's)
    made_here.clear()
    # q's cut given: p's alone (and fewer exact tests: q's boundary, as a level, narrows p's intervals)
    assert verify(made) == without and len(made_here) <= cuts_without - rejected
    shifted = [[(z - 0.5, m) for z, m in c] for c in made]  # another threshold, the same mass
    wrong = verify(shifted)
    assert [v.accepted for v in wrong] == [v.accepted for v in without] and wrong != without
    # settings the wire cannot carry exactly (float32): the drafter cut its rows with other numbers
    # (another scale for z), so its cuts are not used and the residual cuts q's rows itself
    cfg = SamplingConfig(temperature=0.7000001, top_p=0.9)
    assert float(np.float32(cfg.temperature)) != cfg.temperature
    made_here.clear()
    verify(made)
    assert len(made_here) >= 2 * rejected


# --- AcceptanceShape: what a block of k yields, pooled over a drafter's blocks ---------------

# The demo family's conditional pass rates at k = 4 and 16 streams (speculative.py): the first
# draft is the gate, the rest mostly follow.
GATE = [0.48, 0.87, 0.94, 0.82]


def blocks_from(rates: list[float], k: int, n: int, seed: int = 0) -> list[int]:
    """`n` blocks of k drafts, draft j passing with rates[j] once those before it have: each
    block's kept drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = 0
        while m < k and rng.random() < rates[m]:
            m += 1
        out.append(m)
    return out


def test_the_shape_recovers_each_positions_pass_rate_and_each_ks_yield():
    shape = AcceptanceShape(horizon=1e9)  # no forgetting: an estimate over every block
    kept = blocks_from(GATE, 4, 20_000)
    for m in kept:
        shape.update(m, 4)
    assert shape.rates(4) == pytest.approx(GATE, abs=0.02)
    firsts = sum(m > 0 for m in kept)
    for k in range(1, 5):
        observed = 1 + sum(min(m, k) for m in kept) / len(kept)  # a block of k keeps min(m, k)
        # for a generation whose own blocks were these
        assert shape.expected_tokens(k, len(kept), firsts) == pytest.approx(observed, rel=0.02)


def test_on_gated_acceptance_the_one_rate_formula_misjudges_small_blocks_and_the_shape_does_not():
    kept = blocks_from(GATE, 4, 20_000, seed=1)
    one_rate = sum(kept) / sum(min(m + 1, 4) for m in kept)  # kept over tested drafts: about 0.70
    shape = AcceptanceShape(horizon=1e9)
    for m in kept:
        shape.update(m, 4)
    one = 1 + sum(min(m, 1) for m in kept) / len(kept)
    assert expected_tokens_per_block(one_rate, 1) > 1.1 * one  # overstates a block of 1 by over a tenth
    assert shape.expected_tokens(1, len(kept), sum(m > 0 for m in kept)) == pytest.approx(one, rel=0.02)


def test_a_position_never_reached_takes_its_neighbours_rate_and_a_fresh_shape_its_prior():
    fresh = AcceptanceShape(initial=0.7)
    assert fresh.rates(3) == pytest.approx([0.7] * 3)
    assert fresh.expected_tokens(2) == pytest.approx(1 + 0.7 + 0.7**2)
    assert fresh.expected_tokens(0) == 1.0
    shape = AcceptanceShape()
    for m in blocks_from([0.5, 0.9], 2, 500):
        shape.update(m, 2)
    c = shape.rates(5)
    assert c[2:] == pytest.approx([c[1]] * 3)


def test_a_position_rarely_reached_keeps_what_it_saw_while_the_first_moves_on():
    shape = AcceptanceShape(horizon=64)
    for m in blocks_from([0.9, 0.9, 0.3], 3, 2_000):
        shape.update(m, 3)
    third = shape.rates(3)[2]
    for _ in range(2_000):  # blocks of 1 that all fail: only the first position is tested
        shape.update(0, 1)
    c = shape.rates(3)
    assert c[0] < 0.15 and c[1] > 0.8  # forgotten per test of a position, not per block
    assert c[2] == pytest.approx(third, abs=0.05)


def test_a_generations_own_first_drafts_set_its_level():
    shape = AcceptanceShape()
    for m in blocks_from(GATE, 4, 2_000):
        shape.update(m, 4)
    pool = shape.expected_tokens(4)
    assert shape.expected_tokens(4, blocks=0, first_kept=0) == pool  # a new generation: the pool's
    agrees, refuses = shape.expected_tokens(4, 80, 80), shape.expected_tokens(4, 80, 0)
    assert refuses < pool < agrees
    assert refuses == pytest.approx(1.0, abs=0.35) and agrees > 3.0
