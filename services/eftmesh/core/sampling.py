"""Temperature, top-k and top-p processing, and seeded sampling.

The same functions process the combined EFT distribution in the combiner and the draft
model's distribution in a logit service, so a speculative draft's q is exactly the
distribution the draft token was drawn from.

Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Temperatures below this are greedy decoding: at such a temperature the distribution is a
# point mass on the argmax in every float format anyway (a gap of 1e-3 in log-probability
# becomes 100 in the exponent), and dividing by a tiny temperature would only risk overflow.
GREEDY_TEMPERATURE = 1e-5


class NoFiniteMass(ValueError):
    """A row to sample from has no finite probability mass (all -inf, or NaN somewhere).

    Pure tensor code raises this; a service turns it into a status for that request alone.
    """


@dataclass(frozen=True)
class SamplingConfig:
    """How to turn a next-token distribution into a token.

    temperature == 0 (or any temperature below `GREEDY_TEMPERATURE`) is greedy decoding;
    top_k == 0 and top_p == 1 disable those filters. Any finite temperature >= 0 works: a
    large one flattens the distribution towards uniform, computed without overflow.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        # The one place these rules live; messages name the request field (protobuf spelling).
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"sampling.temperature must be a finite number >= 0 (0, or anything below {GREEDY_TEMPERATURE:g}, "
                f"is greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def process(logprobs: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p, and renormalise.

    Args:
        logprobs: [rows, vocab] log-probabilities (or logits).
        cfg: the sampling configuration. Greedy configurations return the input
            renormalised: the argmax is taken by `sample`, and filters cannot change it.

    Returns:
        [rows, vocab] float32 log-probabilities of the processed distribution; filtered
        tokens are -inf.
    """
    assert logprobs.dim() == 2, f"expected [rows, vocab], got {tuple(logprobs.shape)}"
    x = logprobs.float()
    if cfg.greedy:
        return torch.log_softmax(x, dim=-1)
    if cfg.temperature != 1.0:
        x = _scale(x, cfg.temperature)
    if 0 < cfg.top_k < x.shape[-1]:
        # Ties with the k-th value are kept: which of equal tokens to drop is arbitrary.
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]  # [rows, 1]
        x = x.masked_fill(x < kth, -math.inf)
    if cfg.top_p < 1.0:
        x = _top_p(x, cfg.top_p)
    return torch.log_softmax(x, dim=-1)


def _scale(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x / temperature, shifted so each row's maximum is 0 first: the quotient is <= 0, so it
    cannot overflow to +inf (it may underflow to -inf, which is the right limit), and -inf
    entries stay -inf whatever the temperature (no -inf / inf = NaN)."""
    m = x.amax(dim=-1, keepdim=True)  # [rows, 1]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.where(x == -math.inf, x, (x - m) / temperature)


def _top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of tokens, by falling probability, whose mass reaches top_p."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [rows, vocab]
    probs = torch.softmax(sorted_x, dim=-1)
    # Mass strictly before each token: a token is kept while that mass is still below top_p,
    # so the first token is always kept and the kept set is the smallest that reaches top_p.
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return x.masked_fill(drop, -math.inf)


def sample(
    processed: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row from processed log-probabilities.

    Args:
        processed: [rows, vocab] output of `process`.
        cfg: the same configuration given to `process`.
        generator: seeded torch generator (on the tensor's device); unused when greedy.
            A sampled draw takes one float64 uniform per row from it (`uniforms`).

    Returns:
        [rows] int64 token ids.
    """
    assert processed.dim() == 2, f"expected [rows, vocab], got {tuple(processed.shape)}"
    if cfg.greedy:
        top = argmax_rows(processed)
        check_argmax_finite(processed, top)
        return top
    tokens, ok = draw(processed, uniforms(generator, processed.shape[0]))
    if not bool(ok.all()):
        raise no_finite_mass((~ok).nonzero().flatten().tolist())
    return tokens


def uniforms(generator: torch.Generator | None, n: int = 1) -> torch.Tensor:
    """[n] float64 uniforms in [0, 1) from `generator`: what one `draw` of n rows consumes."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


# Inverse-CDF sampling in two levels. torch.multinomial draws one row at a time and checks its
# input in several passes: 2.7 ms per row of a 128k vocabulary on this project's CPU, so a
# 16-stream sampled step spent 58 ms choosing tokens. `draw` does every row of a step at once in
# about two passes over the rows: exp, then sums of blocks of DRAW_BLOCK entries (vectorised);
# the token's block comes from the blocks' running sums (float64) and the token from the running
# sum of that one block. Each row consumes one uniform from its own generator, so a row's token
# does not depend on the rows beside it. (On a GPU vLLM draws exponential noise per entry and
# takes argmax(p / noise); on a CPU that costs a random number per entry, ~40 ms per 16 rows of
# 128k, where one uniform per row is free.)
DRAW_BLOCK = 256


def draw(logprobs: torch.Tensor, u: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, drawn with probability proportional to exp(logprobs), by inverse CDF.

    Args:
        logprobs: [rows, vocab] float log-probabilities, any per-row shift (-inf: never drawn).
        u: [rows] float64 uniforms in [0, 1), one per row (`uniforms`).
        overwrite: write the probabilities into `logprobs` (no new [rows, vocab] tensor) when
            the caller is done with them.

    Returns:
        ([rows] int64 tokens, [rows] bool: the row has finite probability mass). A row without
        (all -inf, a NaN, +inf or a sum that overflows) gets a meaningless token and False.
    """
    probs = logprobs.exp_() if overwrite else logprobs.exp()
    return draw_probs(probs, u)


def draw_probs(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` from probabilities: probs [rows, vocab] >= 0, any per-row scale."""
    assert probs.dim() == 2 and u.shape == probs.shape[:1], f"probs [rows, vocab], u [rows]: {probs.shape}, {u.shape}"
    rows, vocab = probs.shape
    bs = DRAW_BLOCK
    whole = vocab - vocab % bs
    # float32 sums of 256 entries (relative error ~1e-7; a token's chance moves by that much of
    # its block's mass), accumulated over blocks in float64
    sums = probs[:, :whole].reshape(rows, whole // bs, bs).sum(-1, dtype=torch.float32)  # [rows, blocks]
    if whole < vocab:
        sums = torch.cat((sums, probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float32)), 1)
    running = sums.double().cumsum(-1)  # [rows, blocks]
    total = running[:, -1]  # [rows]; NaN or inf when a row has NaN or +inf
    ok = torch.isfinite(total) & (total > 0)
    total = torch.where(ok, total, 1.0)
    # u * total < total, so the block found holds mass; nextafter guards u * total rounding up
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [rows]
    block = torch.searchsorted(running, target[:, None], right=True).clamp_max(running.shape[1] - 1)  # [rows, 1]
    before = torch.where(block > 0, running.gather(1, (block - 1).clamp_min(0)), 0.0)  # [rows, 1]
    cols = block * bs + torch.arange(bs, device=probs.device)  # [rows, bs]
    inside = torch.where(cols < vocab, probs.gather(1, cols.clamp_max(vocab - 1)), 0.0)  # [rows, bs]
    # first entry whose running sum passes what is left: right=True skips zero-probability entries;
    # rounding between the block's sum and its running sum can leave nothing to pass: then its
    # last entry with mass
    at = torch.searchsorted(inside.double().cumsum(-1), target[:, None] - before, right=True)  # [rows, 1]
    last = torch.where(inside > 0, torch.arange(bs, device=probs.device), -1).amax(-1, keepdim=True)
    return (block * bs + torch.minimum(at, last)).view(rows), ok


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for [rows, vocab] x: the first maximum of each row (a NaN counts
    as the maximum, as in torch).

    On the CPU numpy's argmax is vectorised and torch's is not: over 16 rows of a 128k
    vocabulary, 0.15 ms against 2.5-3.5 ms on this project's machine, and the combiner takes an
    argmax of every row it mixes. Same first-index tie rule, same NaN rule.

    Returns:
        [rows] int64 token ids.
    """
    assert x.dim() == 2, f"expected [rows, vocab], got {tuple(x.shape)}"
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(x.numpy().argmax(axis=-1).astype("int64", copy=False))
    return torch.argmax(x, dim=-1)


def argmax_finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax_rows(x), whether x[i, argmax] is finite): [rows] int64 and [rows] bool. With the
    argmax, finiteness there holds exactly when a row has no NaN, no +inf and some finite
    entry: one gather instead of passes over every entry."""
    top = argmax_rows(x)
    return top, torch.isfinite(x.gather(1, top.view(-1, 1))).view(-1)


def check_argmax_finite(x: torch.Tensor, top: torch.Tensor) -> None:
    """Raise `NoFiniteMass` unless x[i, top[i]] is finite for every row: with `top` the rows'
    argmax, that holds exactly when a row has no NaN, no +inf and some finite entry. One
    gather, instead of `check_finite_mass`'s passes over every entry."""
    bad = ~torch.isfinite(x.gather(1, top.view(-1, 1))).view(-1)  # [rows]
    if bool(bad.any()):
        raise no_finite_mass(bad.nonzero().flatten().tolist())


def check_finite_mass(logprobs: torch.Tensor) -> None:
    """Raise `NoFiniteMass` unless every row has no NaN, no +inf and at least one finite entry:
    exactly when its maximum is finite (max propagates NaN), one pass."""
    bad = ~torch.isfinite(logprobs.amax(dim=-1))  # [rows]
    if bool(bad.any()):
        raise no_finite_mass(bad.nonzero().flatten().tolist())


def no_finite_mass(rows: list[int]) -> NoFiniteMass:
    """The error for `rows` (their indices) without finite probability mass."""
    return NoFiniteMass(
        f"the distribution to sample from has no finite probability mass in row(s) {rows[:8]}: "
        "the weights or sampling settings make it degenerate"
    )


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded for one request: the same seed gives the same samples."""
    g = torch.Generator(device=device)
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g
