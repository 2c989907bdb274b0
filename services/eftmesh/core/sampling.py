"""Temperature, top-k and top-p processing, and seeded sampling.

The same functions process the combined EFT distribution in the combiner and the draft
model's distribution in a logit service, so a speculative draft's q is exactly the
distribution the draft token was drawn from. `process` forms that distribution (verification
needs it); `sample_rows` draws from it without forming it (a plain step needs only a token),
by the CPU sampler in draws.py and cuts.py.

Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eftmesh.core.cuts import cut, draw_nucleus, nucleus_bounds
from eftmesh.core.fusedrows import draw_fused, token_probs_fused
from eftmesh.core.draws import LN2, LOG2E, draw, draw_probs, exp2, running_sums

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


def process(logprobs: torch.Tensor, cfg: SamplingConfig, *, overwrite: bool = False) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p, and renormalise.

    Args:
        logprobs: [rows, vocab] log-probabilities (or logits).
        cfg: the sampling configuration. Greedy configurations return the input
            renormalised: the argmax is taken by `sample`, and filters cannot change it.
        overwrite: the rows may be written over (the caller's own float32 copy): no new
            [rows, vocab] tensor, whose fresh pages cost more than the pass at 128k entries.

    Returns:
        [rows, vocab] float32 log-probabilities of the processed distribution; filtered
        tokens are -inf. Top-k keeps every token tied with the k-th, top-p every token tied
        with the last one it keeps (which of equal tokens to drop would be arbitrary).
    """
    assert logprobs.dim() == 2, f"expected [rows, vocab], got {tuple(logprobs.shape)}"
    x = logprobs.float()
    if cfg.greedy:
        return torch.log_softmax(x, dim=-1)
    if not _filters(cfg, x.shape[1]):
        return torch.log_softmax(x if cfg.temperature == 1.0 else _scaled(x, cfg.temperature, overwrite, log2=False), dim=-1)
    z = _scaled(x, cfg.temperature, overwrite)
    # the kept entries less the log2 of their mass, the rest -inf, in place (where a mask and a
    # log_softmax took five passes and two new tensors), then in nats
    return cut(z, cfg.top_k, cfg.top_p).log_probs_(z).mul_(LN2)


def processed_probs(scores: torch.Tensor, cfg: SamplingConfig, *, overwrite: bool = False) -> torch.Tensor:
    """process(scores, cfg).exp(), without the pass to nats and with the faster exp2: the
    processed distribution's probabilities, [rows, vocab] float32, 0 where filtered out (a
    speculative rejection's residual needs them). Sampled configurations only."""
    assert scores.dim() == 2 and not cfg.greedy, "sampled rows: [rows, vocab]"
    z = _scaled(scores.float(), cfg.temperature, overwrite)
    if _filters(cfg, z.shape[1]):
        return cut(z, cfg.top_k, cfg.top_p).log_probs_(z).exp2_()
    e = exp2(z, overwrite=True)
    return e.div_(e.sum(-1, keepdim=True, dtype=torch.float64).float())


def token_probs(scores: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig, *,
                overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's probability of one token under `process(scores, cfg)` (up to float
    rounding), without forming the processed rows: what speculative verification's ratio test
    reads of p and q. A row costs what a draw's cut does (temperature, the exp2 top-p's total
    needs, the cut) and no write of the row.

    Args:
        scores: [rows, vocab] log-probabilities or logits, any per-row shift (CPU).
        tokens: [rows] int64, one token per row.
        cfg: a sampled (not greedy) configuration.
        overwrite: as `process`'s.

    Returns:
        ([rows] float64 probabilities, 0 where the token is filtered out; [rows] bool: the row
        has finite mass, its probability is meaningless otherwise).
    """
    lo, _, ok = _token_probs_z(_scaled_for(scores, tokens, cfg, overwrite), tokens, cfg, bounds=False)
    return lo, ok


def token_prob_bounds(scores: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig, *,
                      overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_probs` as an interval, for a test that the interval may decide: a row whose
    top-p nucleus (top-p without top-k) is too wide to find among candidates (thousands of
    tokens: a flat row) is not cut; its token's probability is bounded instead
    (`cuts.nucleus_bounds`: exact 0 outside the nucleus; inside, the nucleus mass lies
    between p and 1 of the row's). Every other row's interval is its exact value.

    Returns:
        ([rows] float64 lower bounds, [rows] float64 upper bounds, [rows] bool: the row has
        finite mass, as `token_probs`').
    """
    return _token_probs_z(_scaled_for(scores, tokens, cfg, overwrite), tokens, cfg, bounds=True)


def _scaled_for(scores: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig, overwrite: bool) -> torch.Tensor:
    assert scores.dim() == 2 and tokens.shape == scores.shape[:1] and not cfg.greedy, "[rows, vocab] scores, [rows] tokens"
    return _scaled(scores.float(), cfg.temperature, overwrite)


def _token_probs_z(z: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig, bounds: bool,
                   e: torch.Tensor | None = None, running: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_probs` (`token_prob_bounds` with `bounds`) of scaled rows z (written over without
    filters unless `e` = exp2(z) is given, with its `running` sums: then neither is written)."""
    zt = z.gather(1, tokens.view(-1, 1)).view(-1).double().numpy()  # [rows]
    where = None
    if _filters(cfg, z.shape[1]):
        nucleus = bounds and not 0 < cfg.top_k < z.shape[1]  # (top-k's mass is not the row's)
        where = cut(z, cfg.top_k, cfg.top_p, wide=not nucleus, e=e, running=running)
        mass, kept = where.mass(z), zt >= where.tau.double().numpy()
    else:
        e = exp2(z, overwrite=True) if e is None else e
        mass, kept = e.sum(-1, dtype=torch.float64).numpy(), np.ones(len(zt), bool)
    uncut = where.uncut if where is not None else torch.zeros(0, dtype=torch.int64)
    if uncut.numel():  # (rows with finite mass: mass() left them 0)
        assert where is not None and where.e is not None and where.running is not None  # (top-p alone computes them)
        mass[uncut.numpy()] = where.running[uncut, -1].numpy()  # (for `ok`)
    ok = np.isfinite(mass) & (mass > 0) & ~np.isnan(zt)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # rows not ok: meaningless
        lo = np.where(kept & ok, np.exp2(zt) / mass, 0.0)
    hi = lo.copy()
    if uncut.numel():
        lo[uncut.numpy()], hi[uncut.numpy()] = nucleus_bounds(z, where.e, where.running, uncut, tokens[uncut], cfg.top_p)
    return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(ok)


# Top-p without top-k is drawn without a cut when p is at least this: a draw from the whole row
# is kept when it lies in the nucleus (`cuts.draw_nucleus`), which holds at least p of the mass,
# so a row takes at most 1 / p tries on average, each a compare and a dot product over the row.
# That beats finding the cut among candidates: 0.38 against 0.65 ms for one row of 49,152
# (SmolLM2, temperature 0.6, top-p 0.9) and 2.0 against 2.4 ms for 16 (this project's AVX2
# EPYC); at p = 0.2 the two were level, and a smaller p on a flat row would redraw often.
NUCLEUS_MIN_P = 0.5


def _filters(cfg: SamplingConfig, vocab: int) -> bool:
    return 0 < cfg.top_k < vocab or cfg.top_p < 1.0


def _scaled(x: torch.Tensor, temperature: float, overwrite: bool = False, *, log2: bool = True) -> torch.Tensor:
    """(x - max) * log2(e) / temperature: the rows in log2 units (draws.py), for exp2; with
    `log2=False`, (x - max) / temperature. A new tensor (x itself with `overwrite`): <= 0, so
    it cannot overflow to +inf (it may underflow to -inf, the right limit), and -inf stays
    -inf. A row whose max is not finite is left unshifted (it has no finite mass; callers flag
    it). The one rounding of the product is that of the division before (relative 6e-8)."""
    m = x.amax(dim=-1, keepdim=True)  # [rows, 1]
    m = torch.where(torch.isfinite(m), m, 0.0)
    z = x.sub_(m) if overwrite and x.dtype == torch.float32 else torch.sub(x, m)
    # a temperature past float32's range would be inf here, and -inf / inf is NaN: its limit,
    # every finite entry 0, is what float32's largest gives
    t = min(temperature, torch.finfo(torch.float32).max)
    if not log2:
        return z if t == 1.0 else z.div_(t)
    scale = LOG2E / t
    # (a scale below float32's normal range could be flushed to 0, and -inf * 0 is NaN)
    return z.mul_(scale) if scale > 1e-30 else z.div_(t).mul_(LOG2E)


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


def sample_rows(scores: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor, *, overwrite: bool = False,
                more: Callable[[torch.Tensor], torch.Tensor] | None = None,
                row_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the distribution `process(scores, cfg)` gives (up to float
    rounding), without forming it: temperature, then the kept entries alone when top-k or top-p
    cut (`cuts.cut`), drawn by inverse CDF (`draws.draw_probs`) with a uniform per row. At
    128k entries a row costs one pass to scale, one exp2 and a few small passes.

    Args:
        scores: [rows, vocab] log-probabilities or logits, any per-row shift (CPU).
        cfg: a sampled (not greedy) configuration.
        u: [rows] float64 uniforms in [0, 1) (`uniforms`), one per row.
        overwrite: as `process`'s.
        more: further uniforms for rows that draw again (`cuts.draw_nucleus`: given their
            indices, one uniform each from each row's own generator). With it a top-p nucleus
            of thousands is drawn from without being cut, and such a row may take more than
            one uniform; without it (None) every row takes exactly one.
        row_max: [rows] float32, each row's maximum when the caller has it (the step's mix
            took it: `fusedmix.mix3`), for the fused draw; None: taken here.

    Returns:
        ([rows] int64 tokens, [rows] bool: the row has finite mass; its token is meaningless otherwise).
    """
    assert scores.dim() == 2 and not cfg.greedy, "sample_rows draws sampled rows: [rows, vocab]"
    if _fusable(scores, cfg, more):  # the usual case: one compiled pass per row, the rows only read
        return draw_fused(scores, LOG2E / cfg.temperature, cfg.top_p, u, more, row_max)
    z = _scaled(scores.float(), cfg.temperature, overwrite)  # ours: the draw may overwrite it
    if not _filters(cfg, z.shape[1]):
        return draw_probs(exp2(z, overwrite=True), u)
    return _sample_scaled(z, cfg, u, more)[:2]


def sample_with_probs(scores: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor, *, overwrite: bool = False,
                      more: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[np.ndarray, np.ndarray] | None]:
    """`sample_rows`' tokens and each one's probability, from one scaling of the rows: a
    drafting logit service sends each draft's q(x). Rows the compiled kernels read
    (`_fusable`): drawn by `fusedrows.draw_fused` and the probability from the compiled cut
    (bitwise `token_probs_at(exact=True)`, what verification's exact test computes on the
    combiner's side); 0.4 ms per 128k row, where torch's cut (`token_probs`, equal up to float
    rounding) took 0.75 and was most of a drafting step's sampling (13.5 ms per 16 rows).
    Others: bitwise `sample_rows` then `token_probs`, the second call's temperature, exp2 and
    (top-p) running sums not repeated.

    Returns:
        ([rows] int64 tokens, [rows] bool: the row has finite mass, [rows] float64 each token's
        probability; both meaningless where the row has no finite mass; on the compiled
        kernels' rows with top-p, each row's cut ([rows] float32 thresholds, [rows] float64
        kept masses: `fusedrows.token_probs_fused`'s `cuts`, which a rejection's residual
        reuses), else None).
    """
    assert scores.dim() == 2 and not cfg.greedy, "sample_with_probs draws sampled rows: [rows, vocab]"
    if _fusable(scores, cfg, more):  # (both only read the rows)
        scale, n = LOG2E / cfg.temperature, scores.shape[0]
        m = scores.amax(1)  # (the rows' maxima once, for both: NaN or +inf where a row has no finite mass)
        tokens, ok = draw_fused(scores, scale, cfg.top_p, u, more, row_max=m)
        cuts = (np.empty(n, np.float32), np.empty(n)) if cfg.top_p < 1.0 else None
        probs = token_probs_fused(scores, np.arange(n), tokens.numpy(), scale, cfg.top_p, exact=True, m=m.numpy(),
                                  cuts=cuts)[0]
        return tokens, ok, torch.from_numpy(probs), cuts
    z = _scaled(scores.float(), cfg.temperature, overwrite)  # ours: the draw may overwrite it
    if not _filters(cfg, z.shape[1]):
        e = exp2(z)  # (not over z: the probabilities read it)
        running = running_sums(e)
        tokens, ok = draw_probs(e, u, running)
        return tokens, ok, _token_probs_z(z, tokens, cfg, False, e=e)[0], None
    tokens, ok, e, running = _sample_scaled(z, cfg, u, more)
    return tokens, ok, _token_probs_z(z, tokens, cfg, False, e=e, running=running)[0], None


def _fusable(scores: torch.Tensor, cfg: SamplingConfig, more: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
    """Whether `fusedrows.draw_fused` draws these rows: `fusable_rows`, and top-p either off or
    drawn by rejection (`more` given, p >= NUCLEUS_MIN_P)."""
    return fusable_rows(scores, cfg) and (cfg.top_p >= 1.0 or (more is not None and cfg.top_p >= NUCLEUS_MIN_P))


def fusable_rows(scores: torch.Tensor, cfg: SamplingConfig) -> bool:
    """Whether the fused kernels (core/fused.py) read these rows: float32 on the CPU, no top-k,
    a temperature whose scale log2(e) / t is a normal float32 (`_scaled`'s other case divides
    first)."""
    return (scores.dtype == torch.float32 and scores.device.type == "cpu" and not cfg.greedy
            and LOG2E / cfg.temperature > 1e-30 and not 0 < cfg.top_k < scores.shape[1])


def token_probs_at(scores: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig, *,
                   exact: bool, row_max: torch.Tensor | None = None,
                   levels: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_prob_bounds` (with `exact`, `token_probs` as an interval lo = hi) of scores'
    `rows` ([g] int64 indices) and `tokens` ([g]), read where they lie: no copy, one compiled
    pass per row (`fusedrows.token_probs_fused`); `fusable_rows` scores only. Every row's interval
    holds its exact value (an interval wherever it is in the nucleus, unless exact). row_max:
    [n] float32, every score row's maximum when the caller has them (as `sample_rows`'). levels:
    [g] float32 z levels that may narrow the intervals (`fusedrows.token_probs_fused`)."""
    assert fusable_rows(scores, cfg) and rows.shape == tokens.shape, "fusable [n, vocab] scores, [g] rows and tokens"
    m = None if row_max is None else row_max.numpy()[rows.numpy()]
    lo, hi, ok = token_probs_fused(scores, rows.numpy(), tokens.numpy(), LOG2E / cfg.temperature, cfg.top_p, exact=exact,
                                   m=m, levels=levels)
    return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(ok)


def _sample_scaled(z: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor,
                   more: Callable[[torch.Tensor], torch.Tensor] | None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`sample_rows` with filters, from scaled rows z (not written); also exp2(z) and its
    running sums where the draw computed them and left them unwritten (else None)."""
    tokens = torch.zeros(z.shape[0], dtype=torch.int64)
    nucleus = more is not None and not 0 < cfg.top_k < z.shape[1]  # top-p alone: no cut needed for a draw
    if nucleus and cfg.top_p >= NUCLEUS_MIN_P:  # no cut at all (cuts.draw_nucleus)
        e = exp2(z)
        running = running_sums(e)
        total = running[:, -1]
        ok = torch.isfinite(total) & (total > 0)  # (as `draw`'s)
        rows = ok.nonzero().flatten()
        tokens[rows] = draw_nucleus(z, e, running, rows, cfg.top_p, u[rows], more)
        return tokens, ok, e, running
    ok = torch.zeros(z.shape[0], dtype=torch.bool)
    where = cut(z, cfg.top_k, cfg.top_p, wide=not nucleus)
    for rows, probs, cols in where.kept(z):  # candidate lists, then wide rows
        at, ok[rows] = draw_probs(probs, u[rows])
        tokens[rows] = at if cols is None else cols.gather(1, at[:, None]).squeeze(1)
    if where.uncut.numel():  # (rows with finite mass)
        rows = where.uncut
        tokens[rows] = draw_nucleus(z, where.e, where.running, rows, cfg.top_p, u[rows], more)
        ok[rows] = True
    return tokens, ok, None, None  # (the draw masked the cut's exp2 in place)


def uniforms(generator: torch.Generator | None, n: int = 1) -> torch.Tensor:
    """[n] float64 uniforms in [0, 1) from `generator`: what one `draw` of n rows consumes."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def per_row_uniforms(gens: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """`sample_rows`' uniforms for rows that each sample with their own generator: the first
    uniform of every row ([rows] float64), and `more` (a row that draws again takes its next
    uniform from its own generator), so a row's token never depends on the rows beside it."""
    return torch.cat([uniforms(g) for g in gens]), more_uniforms(gens)


def more_uniforms(gens: Sequence[torch.Generator | None]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`sample_rows`' `more` for rows that each sample with their own generator: given row
    indices, the next float64 uniform of each row's generator."""
    return lambda rows: torch.cat([uniforms(gens[i]) for i in rows.tolist()])


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
