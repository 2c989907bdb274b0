"""The compiled kernels (core/fused.py) over torch rows, read where they lie: the usual draw
(`draw_fused`), verification's token probabilities (`token_probs_fused`) and a speculative
rejection's token (`residual_draw_fused`).

Every function works row by row, so a row's result does not depend on the rows beside it, nor
on how many threads share the rows (`set_threads`: the kernels release the GIL, and each thread
takes a contiguous share of the rows with scratch buffers of its own). Rows are float32 CPU
scores with any per-row shift; z = (x - the row's maximum) * scale, in log2 units as in
draws.py and cuts.py. Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from eftmesh.core.cuts import HIST_BINS, REDRAWS, draw_cut
from eftmesh.core.draws import DRAW_BLOCK, exp2

_NEG_INF = np.float32(-np.inf)

# The threads the kernels' rows are shared among (`set_threads`); 1: the caller's thread alone.
_threads = 1
_pool: ThreadPoolExecutor | None = None


def set_threads(n: int) -> None:
    """Share each call's rows among n threads (the combiner's --threads). Threads in a pool
    that wait on a queue, not OpenMP's, which spin on cores the logit services may share."""
    global _threads, _pool
    if _pool is not None:
        _pool.shutdown()
    # (n - 1 pool threads: the calling thread takes the first share itself)
    _threads, _pool = max(1, n), ThreadPoolExecutor(n - 1, thread_name_prefix="eftmesh-rows") if n > 1 else None


def by_rows(n: int, work: Callable[[int, int], None]) -> None:
    """work(lo, hi) over rows [0, n), in `set_threads` contiguous shares (at most one per row;
    the first in this thread), or at once with one thread or one row."""
    if _pool is None or n < 2:
        work(0, n)
        return
    k = min(_threads, n)
    cuts = [n * i // k for i in range(k + 1)]
    rest = [_pool.submit(work, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
    work(cuts[0], cuts[1])
    for f in rest:
        f.result()


def draw_fused(x: torch.Tensor, scale: float, p: float, u: torch.Tensor,
               more: Callable[[torch.Tensor], torch.Tensor] | None,
               row_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`cuts.draw_nucleus` from unscaled rows, each try one compiled pass per row
    (`fused.nucleus_try`: the scale, exp2 and block sums into a one-row buffer, the draw, the
    nucleus test); x is only read. Same rule and the same uniforms: one per try, `more` for the
    rows that draw again (p >= 1: one try, always kept, `more` unused).

    Args:
        x: [rows, vocab] float32 CPU scores, any per-row shift; z = (x - max) * scale.
        scale: log2(e) / temperature (a normal float32).
        p: top-p (>= 1: none). u: [rows] float64 uniforms, one per row.
        row_max: [rows] float32, x's row maxima when the caller has them; None: taken here.

    Returns:
        ([rows] int64 tokens, [rows] bool: the row has finite mass; its token is meaningless
        otherwise), as `draws.draw_probs`.
    """
    rows, vocab = x.shape
    x, flat, stride = flat_rows(x)
    m = x.numpy().max(1) if row_max is None else row_max.numpy()  # [rows]; NaN or +inf: no finite mass
    ok = np.isfinite(m)
    tokens = np.zeros(rows, np.int64)
    pending = np.flatnonzero(ok)
    uu, s = u.numpy()[pending], np.float32(scale)
    for _ in range(REDRAWS + 1):
        t, kept = _nucleus_tries(flat, pending * stride, vocab, m[pending], s, p, uu)
        tokens[pending[kept]] = t[kept]
        pending = pending[~kept]
        if pending.size == 0:
            return torch.from_numpy(tokens), torch.from_numpy(ok)
        assert more is not None, "a nucleus draw (p < 1) needs more uniforms"
        uu = more(torch.from_numpy(pending)).numpy()
    r = torch.from_numpy(pending)  # as draw_nucleus: cut those rows, then draw within the cut
    z = (x[r] - torch.from_numpy(m[pending])[:, None]).mul_(s)
    tokens[pending] = draw_cut(z, exp2(z), p, uu)
    return torch.from_numpy(tokens), torch.from_numpy(ok)


def _nucleus_tries(flat: np.ndarray, at: np.ndarray, vocab: int, m: np.ndarray, s: np.float32, p: float,
                   u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One `fused.nucleus_try` per row (rows at `at` in flat): ([g] tokens, [g] kept)."""
    from eftmesh.core import fused  # (numba: compiled on first use; services `fused.warm()` at start)

    t, kept = np.empty(len(at), np.int64), np.empty(len(at), np.bool_)

    def tries(lo: int, hi: int) -> None:
        scratch = _Scratch(vocab, cut=False)
        fused.nucleus_try(flat, at[lo:hi], vocab, m[lo:hi], s, p, u[lo:hi], t[lo:hi], kept[lo:hi], scratch.e, scratch.sums)

    by_rows(len(at), tries)
    return t, kept


def token_probs_fused(x: torch.Tensor, rows: np.ndarray, tokens: np.ndarray, scale: float, p: float, *,
                      exact: bool, m: np.ndarray | None = None, cuts: tuple[np.ndarray, np.ndarray] | None = None,
                      levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probabilities of `tokens` ([g] int64) under top-p (without top-k; p >= 1: none) in
    x's `rows` ([g] int64 indices; x [n, vocab] float32 CPU scores, only read) after the
    temperature, one compiled pass per row: `cuts.nucleus_bounds`' interval
    (`fused.token_bounds`), or with `exact` the cut's value (`nucleus_cut`).
    m: [g] float32, the rows' maxima when the caller has them; None: taken here.
    cuts: with `exact` and p < 1, ([g] float32, [g] float64) written with each row's
    `nucleus_cut` (threshold, kept mass; -inf and 0 where the row has no finite mass), what a
    rejection's residual needs of that row (`residual_draw_fused`'s q_cuts).
    levels: [g] float32 z levels that may tighten the intervals (`fused.token_bounds`: a row's
    nucleus boundary or a guess at it; -inf or None: none); any levels leave them valid.

    Returns:
        ([g] float64 lower bounds, [g] float64 upper bounds (equal when exact), [g] bool: the
        row has finite mass; 0, 0 where it has not).
    """
    from eftmesh.core import fused

    x, flat, stride = flat_rows(x)
    m = _row_maxima(x.numpy(), rows) if m is None else m
    ok = np.isfinite(m)
    good = np.flatnonzero(ok)
    lo, hi = np.zeros(len(rows)), np.zeros(len(rows))
    at, toks, s, vocab, mg = rows[good] * stride, tokens[good], np.float32(scale), x.shape[1], m[good]
    lv = np.full(len(good), _NEG_INF) if levels is None else levels[good].astype(np.float32)
    glo, ghi = np.empty(len(good)), np.empty(len(good))
    taus, kepts = np.full(len(good), _NEG_INF), np.zeros(len(good))
    cut = exact and p < 1.0

    def probs(a: int, b: int) -> None:
        if cut:
            scratch = _Scratch(vocab)
            for i in range(a, b):
                row = flat[at[i]:at[i] + vocab]
                tau, kept = nucleus_cut(row, mg[i], s, p, scratch)
                v = (row[toks[i]] - mg[i]) * s
                glo[i] = ghi[i] = np.exp2(np.float64(v)) / kept if v >= tau else 0.0
                taus[i], kepts[i] = tau, kept
        else:  # (p >= 1: the bounds are exact; no scratch: the pass writes nothing)
            fused.token_bounds(flat, at[a:b], vocab, mg[a:b], s, p, toks[a:b], lv[a:b], glo[a:b], ghi[a:b])

    by_rows(len(good), probs)
    lo[good], hi[good] = glo, ghi
    if cuts is not None and cut:
        cuts[0][:], cuts[1][:] = _NEG_INF, 0.0
        cuts[0][good], cuts[1][good] = taus, kepts
    return lo, hi, ok


def nucleus_cut(row: np.ndarray, m: np.float32, s: np.float32, p: float, scratch: _Scratch) -> tuple[np.float32, float]:
    """Where one row's top-p nucleus ends, as `cuts._cut_wide` cuts it (a float64 histogram of
    the row's mass over z, `fused.nucleus_bin`, then its boundary bin sorted), and the mass it
    keeps: (tau: z >= tau is kept; the float32 sum of 2 ** z there). p >= 1: (-inf, the row's
    float64 total, as `fused.exp2_scaled` sums it). row: [vocab] float32, m its finite maximum."""
    from eftmesh.core import fused

    if p >= 1.0:
        return _NEG_INF, fused.exp2_scaled(row, m, s, scratch.e, scratch.sums)
    vals = scratch.vals
    n, before, need = fused.nucleus_bin(row, m, s, p, scratch.e, scratch.sums, scratch.hist, scratch.bins, vals)
    tau = _NEG_INF
    if n:
        kept = -np.sort(-vals[:n])  # falling
        pe = np.exp2(kept.astype(np.float64))
        tau = kept[max(int(((before + pe.cumsum() - pe) < need).sum()), 1) - 1]
    return tau, float(fused.mass_above(row, m, s, scratch.e, np.nextafter(tau, _NEG_INF)))  # z >= tau


def residual_draw_fused(p: torch.Tensor, rows: np.ndarray, q: torch.Tensor | Sequence[torch.Tensor], scale: float,
                        top_p: float, u: np.ndarray, p_max: np.ndarray | None = None,
                        q_cuts: Sequence[tuple[float, float] | None] | None = None) -> np.ndarray:
    """The tokens speculative rejections take: row i from normalise(max(0, P_i - Q_i)), P_i p's
    row rows[i] and Q_i q's row i, each processed (temperature, then top-p without top-k:
    `nucleus_cut`), the processed rows never formed: two cuts (Q's given, `q_cuts`, or made
    here), then one compiled pass over the
    pair that takes the residual, its block sums and the draw (`fused.residual_draw`). Where the
    residual has no mass (P_i == Q_i in float32, or q's row has no finite mass), the token is
    drawn from P_i with the same uniform, as the torch path (`processed_probs`, `draw_probs`).

    Args:
        p: [n, vocab] float32 CPU target scores (read in place); rows: [g] int64, each with
            finite mass. q: the g draft rows ([>= vocab] each, any float dtype: a float32 copy
            of a row is made when it is not float32 with adjacent columns), as a [g, >= vocab]
            tensor or a sequence of rows (read where they lie: the draft role's response).
        scale: log2(e) / temperature; top_p: top-p (>= 1: none). u: [g] float64 uniforms.
        p_max: [g] float32, p's rows' maxima when the caller has them.
        q_cuts: per q row, its `nucleus_cut` (threshold, kept mass) when the caller has it (the
            drafting logit service cut the row to send its draft's q(x): `ItemResult.draft_cut_z`),
            else None: cut here. The same values either way, one cut fewer per rejection.

    Returns:
        [g] int64 tokens.
    """
    from eftmesh.core import fused

    p, flat, stride = flat_rows(p)
    vocab = p.shape[1]
    mp = _row_maxima(p.numpy(), rows) if p_max is None else p_max
    s, tokens, starts = np.float32(scale), np.empty(len(rows), np.int64), rows * stride

    def draws(lo: int, hi: int) -> None:
        scratch = _Scratch(vocab)
        for i in range(lo, hi):
            x, mx = flat[starts[i]:starts[i] + vocab], mp[i]
            y = q[i][:vocab].float().contiguous().numpy()
            my = y.max()
            tx, kx = nucleus_cut(x, mx, s, top_p, scratch)
            wx = np.float32(1.0 / kx)
            t = -1
            if np.isfinite(my):
                given = None if q_cuts is None else q_cuts[i]
                ty, ky = nucleus_cut(y, my, s, top_p, scratch) if given is None else (np.float32(given[0]), given[1])
                t = fused.residual_draw(x, mx, tx, wx, y, my, ty, np.float32(1.0 / ky), s, u[i], scratch.e, scratch.sums)
            if t < 0:  # (Q's weight 0: P alone)
                t = fused.residual_draw(x, mx, tx, wx, x, mx, tx, np.float32(0.0), s, u[i], scratch.e, scratch.sums)
            tokens[i] = t

    by_rows(len(rows), draws)
    return tokens


def flat_rows(x: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, np.ndarray, int]:
    """x ([rows, >= width] float32 CPU, or bfloat16: `kernel_array`; copied only when its
    columns are not adjacent), the first `width` (default: all) columns of its rows as one flat
    array (no copy; row i at i * stride), and the row stride (0: rows broadcast from one): how
    the compiled kernels (core/fused.py, core/fusedmix.py) read rows where they lie."""
    rows, vocab = x.shape[0], x.shape[1] if width is None else width
    x = x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()
    stride = x.stride(0) if rows > 1 else vocab
    return x, kernel_array(x.as_strided(((rows - 1) * stride + vocab,), (1,))), stride


# The row dtypes the compiled kernels read as `kernel_array` gives them (`fusedmix.mix3`:
# both; the draws and verification: float32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_array(x: torch.Tensor) -> np.ndarray:
    """x's memory as the compiled kernels read it, no copy: float32 as itself, bfloat16 as its
    bits (uint16: numpy has no bfloat16; `fusedmix.mix3` widens them)."""
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _row_maxima(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[g] float32: the maxima of a's `rows` (NaN or +inf: no finite mass); evenly spaced rows
    through a view, not a gathered copy."""
    evenly = len(rows) > 1 and rows[1] > rows[0] and (np.diff(rows) == rows[1] - rows[0]).all()
    return a[rows[0]:rows[-1] + 1:rows[1] - rows[0]].max(1) if evenly else a[rows].max(1)


class _Scratch:
    """One row's buffers for the kernels, made once per call (np.empty: a page is mapped only
    when a kernel first writes it): its exp2 and their block sums (stay in L2), and for a cut
    the histograms, each entry's bin and the boundary bin's values."""

    def __init__(self, vocab: int, *, cut: bool = True) -> None:
        self.e, self.sums = apart(vocab, np.float32), np.empty(-(-vocab // DRAW_BLOCK), np.float32)
        if cut:
            self.hist, self.bins, self.vals = np.empty((4, HIST_BINS + 1)), apart(vocab, np.int32), apart(vocab, np.float32)


# Bytes kept free on each side of a kernel's output buffer (`apart`).
APART_BYTES = 4096


def apart(n: int, dtype: type) -> np.ndarray:
    """np.empty(n, dtype) with APART_BYTES of its own allocation on each side, so that no other
    array lies within them. The compiled loops that read a row and write a buffer check at run
    time that the two cannot overlap, and LLVM's check is conservative: a buffer that starts
    within ~64 entries after the row's end (or ends just before its start), as consecutive heap
    allocations do, fails it, and the loop runs scalar: 3.5x slower over 128k entries on an
    AVX-512 Xeon, and its float32 block sums come out in another order."""
    pad = APART_BYTES // np.dtype(dtype).itemsize
    return np.empty(n + 2 * pad, dtype)[pad:pad + n]
