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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Log-probabilities more than this below the row's best are clamped before mixing. A model in
# float16 may return -inf for a token it deems impossible; with a negative weight, -inf would
# become +inf and the sum NaN. exp(-1e4) is zero in every float format, so the clamp changes no
# probability.
LOGPROB_FLOOR = -1.0e4

# The largest |weight| a delta may have. With log-probabilities floored at LOGPROB_FLOOR below
# each row's best, every mixed value is bounded by (number of deltas) * MAX_WEIGHT * 1e4, far
# inside float32's range, so the mix can never overflow to inf or NaN. Weights beyond ~10 are
# already a point mass in practice; 1e4 leaves room for any experiment.
MAX_WEIGHT = 1.0e4

# Role names are configured names like "base-large"; a longer one is refused before any lookup.
MAX_ROLE_NAME_BYTES = 128


def check_role_name(name: str, field: str) -> None:
    """ValueError when `name` (UTF-8) is longer than MAX_ROLE_NAME_BYTES."""
    n = len(name.encode("utf-8", "surrogatepass"))
    if n > MAX_ROLE_NAME_BYTES:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise ValueError(f"{field} is {n} bytes long; role names are at most {MAX_ROLE_NAME_BYTES} bytes: {shown!r}")


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
        # The one place these rules live; messages name the request field (protobuf spelling).
        if not self.base:
            raise ValueError("composition.base is empty but deltas are set: name the base role")
        check_role_name(self.base, "composition.base")
        for i, d in enumerate(self.deltas):
            if not d.tuned or not d.reference:
                raise ValueError(f"composition.deltas[{i}] needs both tuned and reference roles")
            check_role_name(d.tuned, f"composition.deltas[{i}].tuned")
            check_role_name(d.reference, f"composition.deltas[{i}].reference")
            if not math.isfinite(d.weight) or abs(d.weight) > MAX_WEIGHT:
                raise ValueError(
                    f"composition.deltas[{i}].weight must be finite and in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {d.weight:g}"
                )

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
    """Combine one request's per-role log-probabilities into the normalised EFT distribution.

    Args:
        logprobs: role -> [rows, vocab_r] log-probabilities (or logits: any per-row constant
            shift cancels in the final normalisation). vocab_r >= vocab_size; columns past
            vocab_size are padding rows of the output layer and are dropped.
        coefficients: role -> weight, as from `Composition.coefficients()`.
        vocab_size: the shared tokenizer's vocabulary size.

    Returns:
        [rows, vocab_size] float32 log-probabilities, each row normalised (logsumexp == 0).
    """
    if not coefficients:
        raise ValueError("no coefficients to mix")
    rows = logprobs[next(iter(coefficients))].shape[0]
    index = torch.arange(rows)
    terms = []
    for role, weight in coefficients.items():
        lp = logprobs[role]
        assert lp.dim() == 2 and lp.shape[0] == rows, f"{role}: expected [{rows} rows, vocab], got {tuple(lp.shape)}"
        if weight != 0.0:
            terms.append(Term(index, lp, torch.full((rows,), weight)))
    return mix_batch(terms, rows, vocab_size)


@dataclass(frozen=True)
class Term:
    """One role's rows in a batched mix: row i of `rows` adds weight[i] * rows[i] to output row index[i]."""

    index: torch.Tensor  # [n] int64 output rows
    rows: torch.Tensor  # [n, vocab_r] log-probabilities or logits, any float dtype
    weight: torch.Tensor  # [n] float32 EFT coefficient of this role for each row's request


def floor_rows_(x: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """In place: raise every entry of x[..., :limit] that lies more than |LOGPROB_FLOOR| below
    its row's maximum (there) to that bound; -inf becomes finite, and a row with no finite
    maximum is floored at LOGPROB_FLOOR (uniform when all -inf). No probability changes
    (exp(-1e4) is 0 in every float format); afterwards any weighted sum of such rows is finite
    and bounded, so they can be mixed as they are (`accumulate(..., floored=True)`). NaN stays.

    Logit services floor their rows on their device before sending them (ScoreBatchResponse.
    floored), where it costs two small kernels, instead of the combiner paying two passes over
    every role's rows on its one CPU. Returns x.
    """
    v = x[..., :limit] if limit is not None else x
    hi = v.amax(dim=-1, keepdim=True)
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    v.clamp_min_(hi + LOGPROB_FLOOR)
    return x


def accumulate(acc: torch.Tensor, rows: torch.Tensor, weight: float, *, floored: bool = False,
               init: bool = False, scratch: torch.Tensor | None = None) -> None:
    """acc += weight * rows (acc = weight * rows with `init`), each row of `rows` taken up to a
    per-row constant and floored at `LOGPROB_FLOOR` below its maximum.

    The hot path of the combiner (one call per role and run of requests per step, over
    [rows, 128k] at real vocabularies), so it makes as few passes as it can: rows the sender
    floored (`floored`, see `floor_rows_`) and rows whose every entry lies within
    |LOGPROB_FLOOR| of its maximum (any real model's logits: they span tens of nats) need no
    floor, and a per-row shift cancels in the final normalisation, so they are added as they
    came, with no copy. Only unfloored rows holding -inf (a float16 model's impossible token),
    NaN or a huge spread pay for the shift and the clamp.

    Args:
        acc: [n, vocab] float32 accumulator, written in place (with `init`, its old contents
            are ignored: it may come from torch.empty).
        rows: [n, vocab_r] logits or log-probabilities (vocab_r >= vocab; padding columns of
            the output layer past `vocab` are dropped), any float dtype, not modified.
        weight: the role's EFT coefficient for these rows.
        scratch: a float32 buffer of at least acc's size (garbage, reused) that half-precision
            rows are converted into before they are added (below).
    """
    vocab = acc.shape[1]
    assert rows.dim() == 2 and rows.shape[0] == acc.shape[0] and rows.shape[1] >= vocab, (
        f"expected [{acc.shape[0]}, >= {vocab}] rows, got {tuple(rows.shape)}"
    )
    x = rows[:, :vocab]  # [n, vocab], a view
    if not floored:
        hi = x.amax(dim=-1, keepdim=True)  # [n, 1]
        lo = x.amin(dim=-1, keepdim=True)  # [n, 1]
        if not bool(((lo - hi) >= LOGPROB_FLOOR).all()):  # NaN or +-inf somewhere, or a huge spread
            hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
            x = (x.float() - hi).clamp_min_(LOGPROB_FLOOR)
    wide = x.dtype in (torch.float32, torch.float64)
    if init:
        if wide:
            torch.mul(x, weight, out=acc)
        else:  # torch.mul computes in its inputs' dtype: bf16 rows times 1.5 would be rounded
            # to bf16's 8 bits (0.06 nats on a logit of 20) before landing in float32; and the
            # conversion alone is the faster pass
            acc.copy_(x)
            if weight != 1.0:
                acc.mul_(weight)
    elif wide or scratch is None:
        acc.add_(x, alpha=weight)
    else:  # a float32 += bf16 add takes torch's slow mixed-dtype path (1.44 ms over 16 rows of
        # 128k on this CPU); converting first (0.35 ms, into a buffer kept warm) and adding in
        # float32 (0.55 ms) is faster, and the same sums (the conversion is exact)
        half = scratch.view(-1)[:x.numel()].view(x.shape)
        acc.add_(half.copy_(x), alpha=weight)


def mix_batch(terms: Sequence[Term], rows: int, vocab_size: int) -> torch.Tensor:
    """The EFT mixture for many requests at once, each with its own roles and weights.

    Every output row is one request's position; each role contributes its rows, taken up to a
    per-row constant and floored at `LOGPROB_FLOOR` below the row's maximum (`accumulate`),
    times that request's coefficient. Shifts are per-row constants and cancel in the final
    log-softmax, so raw logits and log-probabilities mix alike; columns past `vocab_size`
    (padding rows of an output layer) are dropped, and their missing mass is a per-row
    constant too.

    Returns:
        [rows, vocab_size] float32 log-probabilities, each row normalised.
    """
    return torch.log_softmax(mix_scores(terms, rows, vocab_size), dim=-1)  # [rows, vocab]


def mix_scores(terms: Sequence[Term], rows: int, vocab_size: int) -> torch.Tensor:
    """`mix_batch` before its normalisation: [rows, vocab_size] float32 scores that equal the
    EFT log-probabilities up to a per-row constant. Argmax (greedy decoding and its
    verification) needs nothing more; a caller normalises only the rows it reports or samples."""
    acc = torch.zeros((rows, vocab_size), dtype=torch.float32)  # [rows, vocab]
    touched = torch.zeros(rows, dtype=torch.bool)
    for t in terms:
        assert t.rows.dim() == 2 and t.rows.shape[1] >= vocab_size, (
            f"expected [n, >= {vocab_size}] rows, got {tuple(t.rows.shape)}"
        )
        assert t.index.shape == t.weight.shape == (t.rows.shape[0],), "index, rows and weight must agree"
        n = t.index.shape[0]
        if n and torch.equal(t.index, torch.arange(int(t.index[0]), int(t.index[0]) + n)) and bool(
            (t.weight == t.weight[0]).all()
        ):  # one run of rows with one weight: accumulate in place
            at = int(t.index[0])
            accumulate(acc[at:at + n], t.rows, float(t.weight[0]))
        elif n:
            part = torch.zeros((n, vocab_size), dtype=torch.float32)
            accumulate(part, t.rows, 1.0)
            acc.index_add_(0, t.index, part.mul_(t.weight[:, None]))
        touched[t.index] = True
    if not bool(touched.all()):
        raise ValueError("every coefficient of some row is zero: nothing to mix")
    return acc
