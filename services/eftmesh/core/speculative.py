"""Speculative draft-then-verify: the acceptance rule and the adaptive block size.

Terms, defined once (Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding", ICML 2023; Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling", 2023; applied to EFT in Mitchell et al. 2024, section 4.3):

- q_i: the draft model's processed distribution at block position i, the one draft x_i was
  actually drawn from (temperature, top-k, top-p applied);
- p_i: the target distribution at position i, here the processed EFT mixture;
- k: drafts per block; p has k + 1 rows, the last one following x_k.

The rule keeps the output distributed exactly as sampling from p token by token. Greedy
decoding keeps the longest prefix of drafts equal to argmax p, then emits argmax p, so its
output is identical token for token.

Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eftmesh.core.draws import LOG2E, draw_probs
from eftmesh.core.fusedrows import residual_draw_fused
from eftmesh.core.sampling import (
    NoFiniteMass,
    SamplingConfig,
    argmax_rows,
    fusable_rows,
    more_uniforms,
    no_finite_mass,
    processed_probs,
    sample_rows,
    token_prob_bounds,
    token_probs,
    token_probs_at,
    uniforms,
)


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one block."""

    accepted: int  # drafts kept, 0..k
    next_token: int  # the correction (accepted < k) or the bonus token (accepted == k)


def verify_greedy(drafts: torch.Tensor, p: torch.Tensor) -> Verdict:
    """Greedy verification.

    Args:
        drafts: [k] int64 drafted token ids.
        p: [k + 1, vocab] target log-probabilities (any monotone transform of them works).
    """
    k = drafts.shape[0]
    assert p.dim() == 2 and p.shape[0] == k + 1, f"p must be [k + 1, vocab], got {tuple(p.shape)}"
    return accept_greedy(drafts, argmax_rows(p))


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> Verdict:
    """Greedy verification from the target's argmax: drafts: [k] int64; target: [k + 1] int64,
    argmax p of each row."""
    k = drafts.shape[0]
    assert target.shape == (k + 1,), f"target must be [k + 1], got {tuple(target.shape)}"
    match = (target[:k] == drafts).to(torch.int64)  # [k]
    accepted = int(torch.cumprod(match, dim=0).sum())
    return Verdict(accepted, int(target[accepted]))


def verify_sampled(
    drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None,
    cfg: SamplingConfig = SamplingConfig(), q_probs: Sequence[float] | None = None,
) -> Verdict:
    """Stochastic verification (the speculative sampling rule) of one block: `verify_blocks`
    with a block of one, so a generation verified alone and in a batch takes the same tokens.

    Args:
        drafts: [k] int64 drafted token ids, x_i ~ process(q_i, cfg).
        q: [k, vocab] the raw draft rows the drafts were processed and drawn from.
        p: [k + 1, vocab] the raw target rows (log-probabilities up to a per-row shift).
        generator: seeded generator; each call draws k float32 uniforms for the tests, then one
            float64 uniform for the last token (more for a bonus token's redraws: `verify_blocks`).
        cfg: the sampling settings both p and q are processed with (default: the rows as they
            are, softmax-normalised).
        q_probs: [k] each draft's probability under process(q_i, cfg), when the drafter sent
            them (`Block.q_probs`); None: computed here from q.

    Raises:
        NoFiniteMass: a row the rule reads has no finite mass.
    """
    k = drafts.shape[0]
    assert q.dim() == 2 and q.shape[0] >= k, f"q must be [k, vocab], got {tuple(q.shape)}"
    assert p.dim() == 2 and p.shape[0] == k + 1 and q.shape[1] >= p.shape[1], f"p must be [k + 1, vocab], got {tuple(p.shape)}"
    verdict = verify_blocks(p, [Block(drafts.tolist(), 0, q, generator, q_probs)], cfg)[0]
    if isinstance(verdict, NoFiniteMass):
        raise verdict
    return verdict


# Fewer rows than this in a verification call (p's, and q's where a block brought no q_probs,
# at one position of every block still testing): the blocks' remaining positions go in one
# call instead. A call's fixed cost
# (~0.5 ms on this project's CPU, the cut's small numpy passes) is that of ~4 rows of 49,152.
LAZY_MIN_ROWS = 16


# How far below the drafter's top-p boundary (z, log2 units) verification puts a target row's
# level (`fused.token_bounds`): a flat row's nucleus mass sits within float32 rounding of p T at
# its boundary, too close for the level's bound to apply; 1/16 lower takes in the entries within
# 4.4% of the boundary entry's mass (a flat 128k row: ~0.2% of its mass).
LEVEL_BELOW = 2.0 ** -4


@dataclass(frozen=True)
class Block:
    """One generation's block in `verify_blocks`."""

    drafts: Sequence[int]  # [k], k >= 1
    first: int  # its rows in p: first .. first + k (p_0 .. p_k)
    q: torch.Tensor  # [>= k, >= vocab] raw draft rows; row i is what draft i was drawn from
    generator: torch.Generator | None
    # [k] draft i's probability under process(q_i, cfg), as `sampling.token_probs` gives it (the
    # drafting logit service sends them: ItemResult.draft_probs); None: read from q. With them
    # a q row is read only at a rejection, for the residual.
    q_probs: Sequence[float] | None = None
    # [k] draft i's row's top-p cut (threshold, kept mass: `fusedrows.nucleus_cut`), as the
    # drafting logit service made it (ItemResult.draft_cut_z); None: cut here at a rejection.
    # The thresholds also narrow p's intervals (a level LEVEL_BELOW under each: `token_bounds`)
    q_cuts: Sequence[tuple[float, float]] | None = None


def verify_blocks(p: torch.Tensor, blocks: Sequence[Block], cfg: SamplingConfig,
                  scratch: Callable[[int, int], torch.Tensor] | None = None,
                  row_max: torch.Tensor | None = None) -> list[Verdict | NoFiniteMass]:
    """The speculative sampling rule for many blocks at once, lazily: p_i and q_i are read
    only at draft i (its probability under each, `sampling.token_prob_bounds`: exact, or an
    interval for a flat row, which decides the test unless the uniform falls inside it, when
    that test is computed exactly) and only while the drafts before it pass; at a rejection the
    token comes from the residual max(0, p_i - q_i) (on rows the compiled kernels read, drawn
    from two nucleus cuts, q's the drafter's where it sent it (`Block.q_cuts`), and one pass over
    the pair, `fusedrows.residual_draw_fused`; else from
    whole processed rows), and the bonus token is drawn from p_k as a plain step's is
    (`sampling.sample_rows`).
    A block of k drafts that all pass costs 2k token probabilities and one draw; one rejected
    at draft i costs 2(i + 1) and a residual draw over two rows (half the token probabilities
    where the block brings its drafts' own, `Block.q_probs`). The blocks' rows at one position are done
    in one call (with fewer than LAZY_MIN_ROWS, all their remaining positions are: rows past a
    rejection are then read and ignored), row by row, so a block's verdict does not depend on
    the blocks beside it.

    Args:
        p: [rows, vocab] raw target rows (any per-row shift); not written.
        blocks: the blocks; each draws k float32 uniforms from its generator for the tests,
            then one float64 uniform for its last token, whatever happens (and a bonus token
            drawn from a top-p nucleus by rejection, `cuts.draw_nucleus`, takes one more
            float64 uniform per redraw).
        cfg: the sampling settings (sampled, not greedy) every block's p and q are processed with.
        scratch: gives a [rows, vocab] float32 tensor to copy rows into (its contents garbage),
            a buffer the caller keeps from step to step; None: a new one per call.
        row_max: [rows] float32, p's row maxima when the caller has them (the step's mix took
            them); the compiled passes then skip theirs.

    Returns:
        Per block, its Verdict, or NoFiniteMass when a row it read has no finite mass.
    """
    assert not cfg.greedy and all(len(b.drafts) > 0 for b in blocks), "sampled blocks of k >= 1 drafts"
    if not blocks:
        return []
    p, vocab = p.float(), p.shape[1]  # (the combiner's scores are float32 already: no copy)
    fused = fusable_rows(p, cfg)
    drafts = [b.drafts for b in blocks]
    tests = [torch.rand(len(d), generator=b.generator, dtype=torch.float32).tolist() for d, b in zip(drafts, blocks)]
    last = torch.cat([uniforms(b.generator) for b in blocks])
    out: list[Verdict | NoFiniteMass | None] = [None] * len(blocks)
    accepted = [0] * len(blocks)
    # the rows a call reads, p's then q's, float32: one buffer for every call, the caller's
    # (fresh pages fault on first write, and a [16, 128k] copy's faults cost as much as its pass)
    take = scratch or (lambda n, width: torch.empty(n, width))
    buf = take(2 * len(blocks), vocab)
    testing, i = list(range(len(blocks))), 0
    while testing:
        # one position per call while the calls are wide; few blocks left (e.g. one stream):
        # all their remaining positions in one call, as a call's fixed cost outweighs the rows
        # that reading lazily would skip
        width = sum(1 if blocks[j].q_probs is not None else 2 for j in testing)  # rows per position
        span = 1 if width >= LAZY_MIN_ROWS else max(len(drafts[j]) - i for j in testing)
        at = [(j, t) for j in testing for t in range(i, min(i + span, len(drafts[j])))]
        read = [r for r, (j, _) in enumerate(at) if blocks[j].q_probs is None]  # q rows to read
        g = len(at)
        x = torch.tensor([drafts[j][t] for j, t in at])
        where = torch.tensor([blocks[j].first + t for j, t in at])
        if fused and not read:  # p_t(x_t) as intervals, read where the rows lie (core/fused.py)
            # (q_t's top-p boundary, where the drafter sent it, a little lower, as a level: where p_t
            # is like q_t it lies just below p_t's own and narrows p_t(x_t)'s interval to about
            # the exact value; any level leaves the interval valid)
            levels = np.array([-np.inf if blocks[j].q_cuts is None else blocks[j].q_cuts[t][0] - LEVEL_BELOW
                               for j, t in at], np.float32)
            lo, hi, ok = token_probs_at(p, where, x, cfg, exact=False, row_max=row_max, levels=levels)
        else:
            if buf.shape[0] < g + len(read):
                buf = take(g + len(read), vocab)
            rows = buf[:g + len(read)]
            torch.index_select(p, 0, where, out=rows[:g])
            for r, a in enumerate(read, g):
                rows[r].copy_(blocks[at[a][0]].q[at[a][1], :vocab])  # (any dtype: rows travel in the model's)
            # p_t(x_t), then the q_t(x_t) read, as intervals: a flat row's is not cut (below)
            lo, hi, ok = token_prob_bounds(rows, torch.cat((x, x[read])), cfg, overwrite=True)
        sent = torch.tensor([math.nan if blocks[j].q_probs is None else blocks[j].q_probs[t] for j, t in at],
                            dtype=torch.float64)
        q_lo, q_hi, q_ok = sent.clone(), sent, torch.ones(g, dtype=torch.bool)
        q_lo[read], q_hi[read], q_ok[read] = lo[g:], hi[g:], ok[g:]
        # keep draft t with probability min(1, p_t(x_t) / q_t(x_t)) (u * q < p: no division by
        # q); stop at the first rejection (rows read past it are ignored). The intervals decide
        # almost every test; the few they leave open are computed exactly.
        u = torch.tensor([tests[j][t] for j, t in at], dtype=torch.float64)
        keep = u * q_hi < lo[:g]
        if bool((open_ := ~keep & (u * q_lo < hi[:g]) & ok[:g] & q_ok).any()):
            which, mine = open_.nonzero().flatten().tolist(), set(read)
            keep[open_] = _exact_tests(p, blocks, [at[r] for r in which], x[which], q_hi[which],
                                       [i for i, r in enumerate(which) if r in mine], u[open_], cfg, fused, row_max)
        keep = keep.tolist()
        good = (ok[:g] & q_ok).tolist()
        still, n = [], 0
        for j in testing:
            here = min(i + span, len(drafts[j])) - i
            for t, kp, gd in zip(range(i, i + here), keep[n:n + here], good[n:n + here]):
                if not gd:
                    out[j] = no_finite_mass([t])
                    break
                if not kp:
                    break
                accepted[j] = t + 1
            else:
                if accepted[j] < len(drafts[j]):
                    still.append(j)
            n += here
        testing, i = still, i + span
    done = [j for j in range(len(blocks)) if out[j] is None]
    bonus = [j for j in done if accepted[j] == len(drafts[j])]
    if bonus:  # every draft passed: the bonus token, from p_k
        at = [blocks[j].first + accepted[j] for j in bonus]
        step = at[1] - at[0] if len(at) > 1 else 1
        if step > 0 and at == list(range(at[0], at[0] + step * len(at), step)):  # evenly spaced (equal k):
            rows, mine = p[at[0]::step][:len(at)], False  # a view (a fused draw reads it where it lies)
        else:
            rows, mine = torch.index_select(p, 0, torch.tensor(at), out=buf[:len(bonus)]), True
        more = more_uniforms([blocks[j].generator for j in bonus])  # (top-p's nucleus, drawn by rejection)
        tokens, ok = sample_rows(rows, cfg, last[bonus], overwrite=mine, more=more,
                                 row_max=None if row_max is None else row_max[torch.tensor(at)])
        for j, t, good in zip(bonus, tokens.tolist(), ok.tolist()):
            out[j] = Verdict(accepted[j], t) if good else no_finite_mass([accepted[j]])
    if rejected := [j for j in done if accepted[j] < len(drafts[j])]:
        # at a rejection the token comes from normalise(max(0, p_i - q_i))
        at = torch.tensor([blocks[j].first + accepted[j] for j in rejected])
        q_rows = [blocks[j].q[accepted[j], :vocab] for j in rejected]  # (views: read in place)
        if fused and all(r.device.type == "cpu" for r in q_rows):  # cuts and one pass per pair, the processed rows never formed
            # (q's cut where the drafter sent it: it is in the drafter's z, from the settings as the wire
            # carries them, float32, so it is used only where ours are those numbers; a caller's 0.7 is not)
            wire = float(np.float32(cfg.temperature)) == cfg.temperature and float(np.float32(cfg.top_p)) == cfg.top_p
            q_cuts = [None if blocks[j].q_cuts is None or not wire else blocks[j].q_cuts[accepted[j]] for j in rejected]
            tokens = torch.from_numpy(residual_draw_fused(p, at.numpy(), q_rows, LOG2E / cfg.temperature, cfg.top_p,
                                                          last[rejected].numpy(), None if row_max is None else row_max[at].numpy(),
                                                          q_cuts))
        else:
            target = processed_probs(p.index_select(0, at), cfg, overwrite=True)  # [g, vocab]
            tokens, ok = draw_probs(processed_probs(torch.stack(q_rows), cfg, overwrite=True).neg_().add_(target).clamp_min_(0.0),
                                    last[rejected])
            if not bool(ok.all()):  # p_i == q_i in float there: that rejection had probability 0
                bad = ~ok
                tokens[bad] = draw_probs(target[bad], last[rejected][bad])[0]
        for j, t in zip(rejected, tokens.tolist()):
            out[j] = Verdict(accepted[j], t)
    return out  # type: ignore[return-value]


def _exact_tests(p: torch.Tensor, blocks: Sequence[Block], at: list[tuple[int, int]], x: torch.Tensor,
                 q: torch.Tensor, read: list[int], u: torch.Tensor, cfg: SamplingConfig, fused: bool,
                 row_max: torch.Tensor | None) -> torch.Tensor:
    """The ratio tests u * q_t(x_t) < p_t(x_t) that `token_prob_bounds`' intervals left open
    ((block, position) pairs `at`, drafts x), from exact token probabilities (whole rows cut;
    `fused`: by `token_probs_at`, the rows read where they lie): q as the blocks sent it (a new
    tensor, written), computed from the rows at the indices `read`."""
    where = torch.tensor([blocks[j].first + t for j, t in at])
    if fused:
        pt = token_probs_at(p, where, x, cfg, exact=True, row_max=row_max)[0]
    else:
        pt, _ = token_probs(p.index_select(0, where), x, cfg, overwrite=True)
    if read:
        rows = torch.stack([blocks[at[i][0]].q[at[i][1], :p.shape[1]].float() for i in read])
        q[read] = token_probs(rows, x[read], cfg, overwrite=True)[0]
    return u * q < pt


def expected_tokens_per_block(acceptance: float, k: int) -> float:
    """(1 - a^(k+1)) / (1 - a): tokens one block yields when each draft passes with rate a."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def per_draft_acceptance(mean_accepted: float, k: int) -> float:
    """The per-draft acceptance probability a that gives `mean_accepted` drafts kept per
    block of k: E[accepted] = a (1 - a^k) / (1 - a), solved by bisection.

    accepted / drafted understates a: drafts after the first rejection are never tested.
    """
    target = min(max(mean_accepted, 0.0), float(k))
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens_per_block(mid, k) - 1.0 < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def ideal_speedup(acceptance: float, k: int, cost_ratio: float) -> float:
    """Ceiling over plain decoding: tokens per block over block cost, k * c + 1 verify steps."""
    return expected_tokens_per_block(acceptance, k) / (k * cost_ratio + 1.0)


class AdaptiveBlockSize:
    """Chooses k per block from the running acceptance rate.

    Rule: estimate the per-draft acceptance probability a as kept drafts over tested drafts
    (a block of k that keeps m tested m + 1 drafts, or k when all passed), both as
    exponential moving averages with weight `smoothing` per block; then pick the k in
    [1, max_k] that maximises the ideal speed-up (1 - a^(k+1)) / ((1 - a)(k c + 1)), where
    c is the configured cost of one draft token relative to one verify step. High
    acceptance grows the block; low acceptance shrinks it to 1. The choice depends only on
    accept/reject outcomes, never on timings, so a seeded request is reproducible.
    """

    def __init__(self, max_k: int, cost_ratio: float, initial_acceptance: float = 0.7, smoothing: float = 0.3) -> None:
        if max_k < 1:
            raise ValueError("max_k must be >= 1")
        if not (cost_ratio > 0 and math.isfinite(cost_ratio)):
            raise ValueError("cost_ratio must be > 0")
        self.max_k = max_k
        self.cost_ratio = cost_ratio
        self.smoothing = smoothing
        self._kept = initial_acceptance  # moving averages; their ratio estimates a
        self._tested = 1.0
        self.k = self._best()

    @property
    def acceptance(self) -> float:
        return self._kept / self._tested

    def _best(self) -> int:
        return max(range(1, self.max_k + 1), key=lambda k: ideal_speedup(self.acceptance, k, self.cost_ratio))

    def update(self, accepted: int, drafted: int) -> int:
        """Record a block's outcome; return the block size for the next block."""
        if drafted > 0:
            tested = accepted + (1 if accepted < drafted else 0)
            self._kept += self.smoothing * (accepted - self._kept)
            self._tested += self.smoothing * (tested - self._tested)
            self.k = self._best()
        return self.k


class AcceptanceShape:
    """What a block of k drafts yields, from every block a drafter's generations verified: per
    position j, c_j, the chance draft j passes once those before it have.

    The one-rate model, each draft passing alone with chance a for (1 - a^(k+1)) / (1 - a)
    tokens, misreads how acceptance runs. On the demo family, of 1,451 blocks of 4 at 16
    streams 752 kept no draft and 466 kept all four: a draft passed 48, 87, 94 and 82% of the
    time once those before it had. The first draft is the gate, the rest mostly follow. At the
    blocks' one rate, 0.70, the formula overstates a block of 1 by 15% and one of 4 by 7%, and a
    rate measured under small caps, which test mostly first drafts, reads low (0.5-0.65): the
    load-aware controller walked down to caps 0-2 and stayed, as a cap of 0 tests nothing and
    leaves a low estimate in place. Nor do a generation's last few blocks say much of its
    next: after a block that kept all four, 64% of next blocks kept none; after one that kept
    none, 42% kept all four.

    So the pool keeps, per position, tests (blocks that reached it) and passes, forgetting with
    weight 1 - 1/`horizon` per test of that position (a position rarely reached keeps what it
    saw instead of fading), and c_j is shrunk toward c_(j-1) by `prior` pseudo-tests (c_1
    toward `initial`), so a position never reached takes its neighbour's rate. A generation
    brings its own first-draft rate over all its blocks, shrunk toward `initial` by `prior`
    pseudo-blocks (assumed: generations differ most at the gate, and the later drafts follow
    alike). Not toward the pool's c_1: generations of other compositions share a drafter, and
    where the pool's c_1 made no drafting the best cap a new generation never drafted, so never
    showed its own rate (tiny models, 7% acceptance: adaptive generations of 16 tokens kept no
    block). Only the controller reads it, so it moves which cap is drafted, never what a seeded
    request draws.
    """

    def __init__(self, horizon: float = 512.0, prior: float = 8.0, initial: float = 0.7) -> None:
        self._keep = 1.0 - 1.0 / horizon
        self.prior = prior
        self.initial = initial
        self._passed: list[float] = []  # per position, forgotten per test of it
        self._tested: list[float] = []
        self._tails: list[float] | None = None  # per k: 1 + sum_(j=2..k) prod_(i=2..j) c_i

    def update(self, accepted: int, drafted: int) -> None:
        """A block of `drafted` drafts kept the first `accepted`."""
        reached = min(accepted + 1, drafted)  # drafts tested: the kept ones and the first rejection
        while len(self._tested) < reached:
            self._passed.append(0.0)
            self._tested.append(0.0)
        for j in range(reached):
            self._tested[j] = self._tested[j] * self._keep + 1.0
            self._passed[j] = self._passed[j] * self._keep + (1.0 if j < accepted else 0.0)
        self._tails = None

    def rates(self, k: int) -> list[float]:
        """c_1..c_k."""
        out, prev = [], self.initial
        for j in range(k):
            passed, tested = (self._passed[j], self._tested[j]) if j < len(self._tested) else (0.0, 0.0)
            prev = (passed + self.prior * prev) / (tested + self.prior)
            out.append(prev)
        return out

    def expected_tokens(self, k: int, blocks: int = 0, first_kept: int = 0) -> float:
        """Tokens a block of k yields on average (the drafts kept and the target's token after
        them), for a generation whose `blocks` blocks so far kept their first draft
        `first_kept` times."""
        if k <= 0:
            return 1.0
        if self._tails is None or len(self._tails) <= k:
            rates = self.rates(max(k, len(self._tested), 16))
            self._tails, reach = [0.0, 1.0], 1.0
            for c in rates[1:]:
                reach *= c
                self._tails.append(self._tails[-1] + reach)
        first = (first_kept + self.prior * self.initial) / (blocks + self.prior)
        return 1.0 + first * self._tails[k]
