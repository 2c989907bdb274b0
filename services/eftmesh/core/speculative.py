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
from dataclasses import dataclass

import torch

from eftmesh.core.draws import draw_probs
from eftmesh.core.sampling import argmax_rows, uniforms


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
    drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
) -> Verdict:
    """Stochastic verification (the speculative sampling rule).

    Args:
        drafts: [k] int64 drafted token ids, x_i ~ q_i.
        q: [k, vocab] log-probabilities the drafts were drawn from.
        p: [k + 1, vocab] target log-probabilities.
        generator: seeded generator; each call draws k float32 uniforms for the tests, then one
            float64 uniform for the last token (`core.draws.draw_probs`).
    """
    k = drafts.shape[0]
    assert q.dim() == 2 and q.shape[0] == k, f"q must be [k, vocab], got {tuple(q.shape)}"
    assert p.dim() == 2 and p.shape == (k + 1, q.shape[1]), f"p must be [k + 1, {q.shape[1]}], got {tuple(p.shape)}"
    idx = drafts.view(k, 1)
    # only the drafts' own probabilities for the test; a whole row's only for the last token
    p_x = p[:k].gather(1, idx).squeeze(1).exp()  # [k]
    q_x = q.gather(1, idx).squeeze(1).exp()  # [k]
    u = torch.rand(k, generator=generator, dtype=torch.float32)  # [k]
    # Keep draft i with probability min(1, p_i(x_i) / q_i(x_i)); stop at the first rejection.
    # At a rejection, sample from normalise(max(0, p_i - q_i)); if all k pass, sample the
    # bonus token from p_k. (u * q < p is the ratio test without dividing by q.)
    keep = (u * q_x < p_x).to(torch.int64)  # [k]
    accepted = int(torch.cumprod(keep, dim=0).sum())
    last = uniforms(generator)  # [1]
    target = p[accepted].exp()  # [vocab]
    if accepted == k:
        token, _ = draw_probs(target[None], last)
    else:
        token, ok = draw_probs((target - q[accepted].exp()).clamp_min(0.0)[None], last)
        if not bool(ok):  # p_i == q_i in float: a rejection had probability 0
            token, _ = draw_probs(target[None], last)
    return Verdict(accepted, int(token))


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
