"""The EFT formula: per-step logit arithmetic across models that share a tokenizer.

Emulated fine-tuning (Mitchell et al., "An Emulator for Fine-Tuning Large Language Models
using Small Language Models", ICLR 2024, eq. 3 and 4) samples from

    log p(x | x_<t) = log pi_base(x | x_<t)
                      + sum_i w_i * (log pi_tuned_i(x | x_<t) - log pi_ref_i(x | x_<t))
                      - log Z_t

where Z_t normalises over the vocabulary at this step alone (the paper's per-timestep
approximation of the sequence-level partition function). Up-scaling is base = large
pre-trained, delta = (small fine-tuned - small pre-trained); every other use (down-scaling,
interpolation between behaviours, amplified scale deltas) is the same sum with other roles and
weights, so a composition reduces to one coefficient per role.

Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Log-probabilities below this are clamped before mixing. A model in float16 may return -inf
# for a token it deems impossible; with a negative weight, -inf would become +inf and the sum
# NaN. exp(-1e4) is zero in every float format, so the clamp changes no probability.
LOGPROB_FLOOR = -1.0e4


@dataclass(frozen=True)
class Delta:
    """One behaviour delta: weight * (log pi_tuned - log pi_reference)."""

    tuned: str
    reference: str
    weight: float


@dataclass(frozen=True)
class Composition:
    """A base role plus any number of weighted behaviour deltas."""

    base: str
    deltas: tuple[Delta, ...] = ()

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("a composition needs a base role")
        for d in self.deltas:
            if not d.tuned or not d.reference:
                raise ValueError("every delta needs a tuned role and a reference role")
            if not math.isfinite(d.weight):
                raise ValueError(f"delta weight must be finite, got {d.weight}")

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the composition reads, base first, each once, in a stable order."""
        seen = dict.fromkeys([self.base])
        for d in self.deltas:
            seen.setdefault(d.tuned)
            seen.setdefault(d.reference)
        return tuple(seen)

    def coefficients(self) -> dict[str, float]:
        """One weight per role: the formula above, with like terms collected.

        Roles whose weights cancel (a delta whose tuned and reference roles are the same)
        keep a zero coefficient rather than disappearing, so callers still know them.
        """
        coef = {self.base: 1.0}
        for d in self.deltas:
            coef[d.tuned] = coef.get(d.tuned, 0.0) + d.weight
            coef[d.reference] = coef.get(d.reference, 0.0) - d.weight
        return coef

    def describe(self) -> str:
        """Human-readable formula, e.g. 'base-large + 1.0*(ft-small - base-small)'."""
        parts = [self.base] + [f"{d.weight:g}*({d.tuned} - {d.reference})" for d in self.deltas]
        return " + ".join(parts)


def mix(
    logprobs: Mapping[str, torch.Tensor],
    coefficients: Mapping[str, float],
    vocab_size: int,
) -> torch.Tensor:
    """Combine per-role log-probabilities into the normalised EFT distribution.

    Args:
        logprobs: role -> [rows, vocab_r] log-probabilities (or logits: any per-row constant
            shift cancels in the final normalisation). vocab_r >= vocab_size; columns past
            vocab_size are padding rows of the output layer and are dropped.
        coefficients: role -> weight, as from `Composition.coefficients()`.
        vocab_size: the shared tokenizer's vocabulary size.

    Returns:
        [rows, vocab_size] float32 log-probabilities, each row normalised (logsumexp == 0).

    Truncating before the sum needs no per-term renormalisation: each term's missing mass is
    a per-row constant, and constants cancel in the final log-softmax.
    """
    if not coefficients:
        raise ValueError("no coefficients to mix")
    acc: torch.Tensor | None = None
    rows: int | None = None
    for role, weight in coefficients.items():
        lp = logprobs[role]
        assert lp.dim() == 2, f"{role}: expected [rows, vocab], got {tuple(lp.shape)}"
        assert lp.shape[1] >= vocab_size, f"{role}: {lp.shape[1]} columns < vocab {vocab_size}"
        if rows is None:
            rows = lp.shape[0]
        assert lp.shape[0] == rows, f"{role}: {lp.shape[0]} rows, expected {rows}"
        if weight == 0.0:
            continue
        term = lp[:, :vocab_size].float().clamp_min(LOGPROB_FLOOR)  # [rows, vocab]
        acc = term * weight if acc is None else acc.add_(term, alpha=weight)
    if acc is None:
        raise ValueError("every coefficient is zero: nothing to mix")
    return torch.log_softmax(acc, dim=-1)  # [rows, vocab]
