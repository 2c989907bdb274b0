"""The combiner's hot passes fused, one per row: numba kernels for the usual draw and mix.

`sampling.sample_rows` over whole rows (no top-k; top-p drawn by rejection, `cuts.draw_nucleus`,
or none) made five passes over a step's rows in torch and numpy: scale, exp2, block sums, then
per row a compare and a dot product for the nucleus test. At 16 rows of 128,256 entries those
rows are 8 MiB each pass, past this project's CPU's caches (an L2 of 512 KiB per core), and the
step's draw cost 4.6 ms. Here one compiled loop per row does the scale, the exp2 and the block
sums into a one-row scratch buffer that stays in L2, draws by inverse CDF and runs the nucleus
test over that buffer; the rows themselves are only read (callers need no copy). 16 rows of
128k: ~1.2 ms in the kernel (session 25: ~0.5 ms on a Xeon, the block loops below). The GPU anchors do the same with fused sampling kernels
(FlashInfer's top-p sampling is this rejection loop in one CUDA kernel, which vLLM uses).

The exp2 is a polynomial (Cephes' exp2f: a degree-6 polynomial on [-1/2, 1/2] and the power
of two put in the exponent bits), within 1.2e-7 relative of float64's (torch's exp2: 6e-8);
the compiler vectorises it, where a call to the C library's exp2 per entry would be 5 ns.
The vectorised loop and its scalar tail come from the same code with the same flags (fused
multiply-adds in both), and each row is computed alone, so a row's values and token do not
depend on where it lies in the batch (tests/core/test_fused.py checks it). The block loops run
their whole blocks with the constant trip count DRAW_BLOCK and the last, partial block apart
(`_exp2_block`, `_residual_block`): with a bound the compiler cannot see, each 256-entry block
paid a vectorised loop's set-up and remainder, and a 128k row's exp2 took 150-170 us, not 55. Entries 2**-127 and
more below the row's maximum count as 0 (float32's subnormals start at 2**-126).

The others: `token_bounds` (verification's p(x) interval: the row's mass and the mass above
the token, in one pass), `nucleus_bin` and `mass_above` (the exact cut for the tests an
interval leaves open, and for a rejection's rows), and `residual_draw` (a rejection's token from
max(0, p - q) over two processed rows, never formed as tensors). The step's mix, whose
row maxima the draws read, is `fusedmix.mix3`; `warm` compiles it too.

Pure array code: no grpc, no transformers, no torch. The kernels compile on first use (1.2 s
for the draw, ~3.5 s for all of them); services call `warm` at start so that no request pays it.
They are cached on disk only where NUMBA_CACHE_DIR is set (below).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from llvmlite import ir
from numba import njit, typeof, types
from numba.extending import intrinsic

from eftmesh.core.draws import DRAW_BLOCK

_HIST_SPAN = np.float32(57.7)  # `cuts.HIST_SPAN`: the widest z range of a histogram

log = logging.getLogger("eftmesh.core.fused")

# Compiled kernels are cached on disk only where NUMBA_CACHE_DIR names a directory (numba's
# cache beside the source needs a writable package directory, which an image's is not): the
# test suite's (hundreds of services started: each would compile for 1-3.6 s) and the image's
# (/tmp/numba-cache, the pod's emptyDir: a restarted container loads them). Where it cannot
# be written, numba compiles as if it were unset.
_CACHE = bool(os.environ.get("NUMBA_CACHE_DIR"))

# reassociation lets the compiler vectorise the block sums (a fixed order for a given row
# length, so still one result per row), contraction makes the polynomial fused multiply-adds
# (in the vectorised loop and its tail alike); no "nnan" or "ninf": NaN and inf stay IEEE
_FAST = {"reassoc", "nsz", "contract"}
# ... except where a difference must be exactly 0 for equal inputs: in max(0, P - Q), P's product
# contracted into the subtraction (fma(e, w, -Q), skipping P's rounding) leaves rounding noise
# where P == Q, and the token is drawn from that noise. LLVM does that where the `zx >= tx` select
# folds into a masked FMA (AVX-512, not AVX2), so the residual is compiled without contraction
_FAST_EXACT_SUB = {"reassoc", "nsz"}

# Cephes' exp2f coefficients: 2**f = 1 + f * P(f) on [-1/2, 1/2]
_P0, _P1, _P2 = np.float32(1.535336188319500e-4), np.float32(1.339887440266574e-3), np.float32(9.618437357674640e-3)
_P3, _P4, _P5 = np.float32(5.550332471162809e-2), np.float32(2.402264791363012e-1), np.float32(6.931472028550421e-1)
_LOW = np.float32(-127.0)  # 2**-127 and below: 0 (float32's normal range ends at 2**-126)


@intrinsic
def _bits_as_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the int32 `bits` (how 2**n is built, vectorisably)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=_FAST)
def _exp2(z):  # type: ignore[no-untyped-def]
    """2**z for float32 z <= 0 (or -inf); 0 below 2**-126.5 (n = -127 is the float +0's bits)."""
    z = max(z, _LOW)
    n = np.floor(z + np.float32(0.5))
    f = z - n  # [-1/2, 1/2], exact
    poly = ((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5
    return (np.float32(1.0) + f * poly) * _bits_as_float((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=_FAST)
def _exp2_block(x, m, scale, out, lo, n):  # type: ignore[no-untyped-def]
    """out[lo:lo + n] = 2 ** ((x - m) * scale) there; returns their float32 sum."""
    acc = np.float32(0.0)
    for k in range(n):
        e = _exp2((x[lo + k] - m) * scale)
        out[lo + k] = e
        acc += e
    return acc


@njit(fastmath=_FAST, nogil=True, boundscheck=False, cache=_CACHE)
def exp2_scaled(x, m, scale, out, sums):  # type: ignore[no-untyped-def]
    """out = 2 ** ((x - m) * scale) for one row ([vocab] float32, m its maximum) and
    sums[b] = float32 sum of out's block b of DRAW_BLOCK entries; returns the float64 total
    (as `draws.running_sums`: float32 block sums accumulated in float64).

    The whole blocks run with the constant trip count DRAW_BLOCK, the last (partial) one apart:
    a trip count the compiler knows vectorises without a remainder loop per block, 2.8x faster
    (a 128k row: 161 -> 58 us here), with the same values and sums."""
    vocab = x.shape[0]
    whole = vocab // DRAW_BLOCK
    total = 0.0
    for b in range(whole):
        acc = _exp2_block(x, m, scale, out, b * DRAW_BLOCK, DRAW_BLOCK)
        sums[b] = acc
        total += acc
    if whole < sums.shape[0]:
        acc = _exp2_block(x, m, scale, out, whole * DRAW_BLOCK, vocab - whole * DRAW_BLOCK)
        sums[whole] = acc
        total += acc
    return total


@njit(nogil=True, boundscheck=False, cache=_CACHE)
def _inverse_cdf(e, sums, target):  # type: ignore[no-untyped-def]
    """The entry of e where its running sum passes `target` (< the float64 sum of `sums`): the
    block from the block sums, then the entry from the running sum of that one block;
    `draws.inverse_cdf` row by row (its rounding rule: the block's last entry with mass when
    rounding leaves nothing to pass)."""
    vocab, nb = e.shape[0], sums.shape[0]
    before = 0.0
    b = 0
    while b < nb - 1 and before + sums[b] <= target:
        before += sums[b]
        b += 1
    left = target - before
    cum = 0.0
    last = -1
    for j in range(b * DRAW_BLOCK, min((b + 1) * DRAW_BLOCK, vocab)):
        if e[j] > 0:
            last = j
            cum += e[j]
            if cum > left:
                return j
    return last


@njit(fastmath=_FAST, nogil=True, boundscheck=False, cache=_CACHE)
def mass_above(x, m, scale, e, v):  # type: ignore[no-untyped-def]
    """float32 sum of e where (x - m) * scale > v (each entry's z computed as exp2_scaled did)."""
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += e[j] if (x[j] - m) * scale > v else np.float32(0.0)
    return acc


@njit(nogil=True, boundscheck=False, cache=_CACHE)
def nucleus_try(flat, starts, vocab, m, scale, p, u, tokens, accepted, e, sums):  # type: ignore[no-untyped-def]
    """One draw for each of `starts`' rows, from the whole row, kept when it lies in the row's
    top-p nucleus: the mass strictly above its z is below p of the row's (`cuts.draw_nucleus`'s
    rule; p >= 1: always kept).

    Args:
        flat: float32 scores, read only; row i is flat[starts[i]:starts[i] + vocab] ([g] int64
            starts: any row stride, 0 for rows broadcast from one).
        m: [g] float32 the rows' maxima (finite).
        scale: log2(e) / temperature (float32: z = (x - m) * scale, as `sampling._scaled`).
        p: top-p; u: [g] float64 uniforms in [0, 1), one per row.
        tokens: [g] int64 out; accepted: [g] bool out (the token is in the nucleus).
        e: [vocab] float32 scratch; sums: [ceil(vocab / DRAW_BLOCK)] float32 scratch.
    """
    for i in range(starts.shape[0]):
        row = flat[starts[i]:starts[i] + vocab]
        total = exp2_scaled(row, m[i], scale, e, sums)
        target = min(u[i] * total, np.nextafter(total, 0.0))  # below total, as `draws.draw_target`
        t = _inverse_cdf(e, sums, target)
        tokens[i] = t
        accepted[i] = p >= 1.0 or mass_above(row, m[i], scale, e, (row[t] - m[i]) * scale) < p * total


@njit(inline="always", fastmath=_FAST)
def _bounds_block(x, m, scale, v, w, lo, n):  # type: ignore[no-untyped-def]
    """The float32 sums of 2 ** z over x[lo:lo + n], of those with z > v, and of those with
    z >= w (`token_bounds`)."""
    acc, above, band = np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for k in range(n):
        z = (x[lo + k] - m) * scale
        e = _exp2(z)
        acc += e
        above += e if z > v else np.float32(0.0)
        band += e if z >= w else np.float32(0.0)
    return acc, above, band


# How much the nucleus bound a level gives (`_bounds_row`) is loosened, and its condition
# tightened: the sums it compares are float32 block sums, the exact cut's kept mass another
# float32 sum of the same entries in another order (they differ by rounding), and the interval
# must hold the exact value.
_LEVEL_SLACK = 1.0 + 2.0 ** -14


@njit(fastmath=_FAST, nogil=True, boundscheck=False, cache=_CACHE)
def _bounds_row(row, m, scale, p, token, level):  # type: ignore[no-untyped-def]
    """`token_bounds` of one row ([vocab] float32, m its finite maximum): (lo, hi)."""
    vocab = row.shape[0]
    whole = vocab // DRAW_BLOCK
    v = (row[token] - m) * scale
    total, above, band = 0.0, 0.0, 0.0
    for b in range(whole):
        acc, up, at = _bounds_block(row, m, scale, v, level, b * DRAW_BLOCK, DRAW_BLOCK)
        total += acc
        above += up
        band += at
    if whole * DRAW_BLOCK < vocab:
        acc, up, at = _bounds_block(row, m, scale, v, level, whole * DRAW_BLOCK, vocab - whole * DRAW_BLOCK)
        total += acc
        above += up
        band += at
    et = np.exp2(np.float64(v))  # (as `sampling.token_probs` reads a token's mass)
    if p >= 1.0:
        return et / total, et / total
    if above < p * total:
        # the nucleus mass N lies in [max(p T, above + et), T]; and where the mass at or above
        # the level reaches p T, every entry below it has at least that much above it, so lies
        # outside the nucleus: N <= that mass
        cap = min(total, band * _LEVEL_SLACK) if band >= p * total * _LEVEL_SLACK else total
        return et / cap, et / max(p * total, above + et)
    return 0.0, 0.0


@njit(nogil=True, boundscheck=False, cache=_CACHE)
def token_bounds(flat, starts, vocab, m, scale, p, tokens, levels, lo, hi):  # type: ignore[no-untyped-def]
    """Bounds on each row's probability of its token under top-p (without top-k) after the
    temperature: `cuts.nucleus_bounds`' interval, in one pass per row that writes nothing: the
    row's mass T (float32 block sums added in float64, as `exp2_scaled`'s) and the mass strictly
    above the token's z, summed side by side (two passes, the exp2 written and then re-read for
    the second sum, took 55 us per 128k row, this one 45; 47 with the level's sum). Exact (lo = hi) at p >= 1 and for a
    token outside the nucleus (0); inside, the nucleus mass N lies between max(p T, the mass at
    or above the token) and T, and below the mass at or above the row's `level` where that
    reaches p T (with a float32 sum's slack, `_LEVEL_SLACK`): a level just below the row's own
    nucleus boundary brings lo near the exact value (the drafter's boundary for its row, when
    the target row is like it: `verify_blocks`); any level leaves the interval valid.

    Args: flat, starts, vocab, m, scale, p as `nucleus_try`'s; tokens: [g] int64, one per row;
    levels: [g] float32 z levels (-inf: none); lo, hi: [g] float64 out.
    """
    for i in range(starts.shape[0]):
        lo[i], hi[i] = _bounds_row(flat[starts[i]:starts[i] + vocab], m[i], scale, p, tokens[i], levels[i])


@njit(inline="always", fastmath=_FAST_EXACT_SUB)
def _residual_block(x, mx, tx, wx, y, my, ty, wy, scale, e, lo, n):  # type: ignore[no-untyped-def]
    """e[lo:lo + n] = max(0, P - Q) there (`_residual_blocks`); returns their float32 sum."""
    acc = np.float32(0.0)
    for k in range(n):
        j = lo + k
        zx, zy = (x[j] - mx) * scale, (y[j] - my) * scale
        a = _exp2(zx) * wx if zx >= tx else np.float32(0.0)
        c = _exp2(zy) * wy if zy >= ty else np.float32(0.0)
        r = a - c
        r = r if r > np.float32(0.0) else np.float32(0.0)
        e[j] = r
        acc += r
    return acc


@njit(fastmath=_FAST_EXACT_SUB, nogil=True, boundscheck=False, cache=_CACHE)
def _residual_blocks(x, mx, tx, wx, y, my, ty, wy, scale, e, sums):  # type: ignore[no-untyped-def]
    """e = max(0, P - Q) for one pair of rows, P = 2 ** zx * wx where zx >= tx (else 0),
    zx = (x - mx) * scale, and Q likewise from y; sums as `exp2_scaled`'s (whole blocks with
    the constant trip count, as there). Returns the float64 total. Rows finite or -inf (a
    finite maximum): no NaN arises."""
    vocab = x.shape[0]
    whole = vocab // DRAW_BLOCK
    total = 0.0
    for b in range(whole):
        acc = _residual_block(x, mx, tx, wx, y, my, ty, wy, scale, e, b * DRAW_BLOCK, DRAW_BLOCK)
        sums[b] = acc
        total += acc
    if whole < sums.shape[0]:
        acc = _residual_block(x, mx, tx, wx, y, my, ty, wy, scale, e, whole * DRAW_BLOCK, vocab - whole * DRAW_BLOCK)
        sums[whole] = acc
        total += acc
    return total


@njit(nogil=True, boundscheck=False, cache=_CACHE)
def residual_draw(x, mx, tx, wx, y, my, ty, wy, scale, u, e, sums):  # type: ignore[no-untyped-def]
    """The token a speculative rejection takes, for one row: drawn with uniform u from
    normalise(max(0, P - Q)) (P from target row x, Q from draft row y, each processed:
    `_residual_blocks`), by inverse CDF as `draws.draw_probs` draws; -1 where that has no mass
    (P == Q in float32; the caller then draws from P). e, sums: scratch as `nucleus_try`'s."""
    total = _residual_blocks(x, mx, tx, wx, y, my, ty, wy, scale, e, sums)
    if not 0.0 < total < np.inf:
        return -1
    return _inverse_cdf(e, sums, min(u * total, np.nextafter(total, 0.0)))


@njit(fastmath=_FAST, nogil=True, boundscheck=False, cache=_CACHE)
def _bins(row, m, scale, per, last, at):  # type: ignore[no-untyped-def]
    """at[j] = the histogram bin of entry j: z * per (z <= 0, per < 0) truncated, at most `last`.
    Returns how many entries fall in the last bin."""
    for j in range(row.shape[0]):
        at[j] = np.int32(min((row[j] - m) * scale * per, last))
    low, top = 0, np.int32(last)
    for j in range(row.shape[0]):  # (a loop of its own: counted in the one above, a 128k row took ~25 us more)
        low += at[j] == top
    return low


@njit(nogil=True, boundscheck=False, cache=_CACHE)
def _scatter(at, e, hist, low):  # type: ignore[no-untyped-def]
    """hist[k, at[j]] += e[j] over the four interleaved histograms (k = j % 4; a vocabulary's
    tail of fewer than four entries into the first). `low`: how many entries fall in the last
    bin. When they are most of the row (a peaked row: most of it lies below the range the cut
    can be in), their adds go to four registers, not to the last bin in memory, where each add
    would wait for the one before to be stored; the sums are the same, added in the same order."""
    bins, vocab = hist.shape[1] - 1, at.shape[0]
    whole = vocab - vocab % 4
    if 2 * low > vocab:
        l0 = l1 = l2 = l3 = 0.0
        for j in range(0, whole, 4):
            a0, a1, a2, a3 = at[j], at[j + 1], at[j + 2], at[j + 3]
            if a0 < bins:
                hist[0, a0] += e[j]
            else:
                l0 += e[j]
            if a1 < bins:
                hist[1, a1] += e[j + 1]
            else:
                l1 += e[j + 1]
            if a2 < bins:
                hist[2, a2] += e[j + 2]
            else:
                l2 += e[j + 2]
            if a3 < bins:
                hist[3, a3] += e[j + 3]
            else:
                l3 += e[j + 3]
        hist[0, bins] += l0
        hist[1, bins] += l1
        hist[2, bins] += l2
        hist[3, bins] += l3
    else:
        for j in range(0, whole, 4):
            hist[0, at[j]] += e[j]
            hist[1, at[j + 1]] += e[j + 1]
            hist[2, at[j + 2]] += e[j + 2]
            hist[3, at[j + 3]] += e[j + 3]
    for j in range(whole, vocab):
        hist[0, at[j]] += e[j]


@njit(nogil=True, boundscheck=False, cache=_CACHE)
def nucleus_bin(row, m, scale, p, e, sums, hist, at, vals):  # type: ignore[no-untyped-def]
    """Where one row's top-p nucleus ends, to a bin: `cuts._cut_wide`'s float64 histogram of the
    row's mass over z (hist: [4, bins + 1] scratch, `cuts.HIST_BINS`, over the z range the cut
    can lie in, at most [-57.7, 0]; the last takes everything below), the bin where the mass
    passes p, and that bin's entries.
    Four interleaved histograms, summed after: a flat row's entries fall in a few bins, and one
    histogram's adds would wait on each other. Leaves e = 2 ** z for `mass_above`.

    Args: row [vocab] float32 scores; m its maximum; scale, p as `nucleus_try`'s; e [vocab] and
    sums float32 scratch as there; at [vocab] int32 and vals [vocab] float32 scratch.

    Returns:
        (n: the bin's finite entries, their z in vals[:n] (in row order); the float64 mass of
        the bins above it; the mass the nucleus needs, p times the histogram's total).
    """
    bins, vocab = hist.shape[1] - 1, row.shape[0]
    mass = exp2_scaled(row, m, scale, e, sums)  # (T below; the histogram's own total is summed after)
    # the nucleus ends above z_low = log2((1 - p) T / vocab) (the entries below it, fewer than
    # vocab, hold less than (1 - p) of the mass T), so the bins need only span [z_low - 1, 0]: a
    # flat row's entries then spread over hundreds of bins, not the few dozen [-57.7, 0] gives
    # them (4,000 entries in the boundary bin of a flat 128k row; the adds wait on each other)
    span = min(_HIST_SPAN, np.float32(1.0 - np.log2((1.0 - p) * mass / vocab)))
    per = np.float32(-bins / span)
    low = _bins(row, m, scale, per, np.float32(bins), at)
    hist[:, :] = 0.0
    _scatter(at, e, hist, low)
    total = 0.0
    for b in range(bins + 1):
        hist[0, b] += hist[1, b] + hist[2, b] + hist[3, b]
        total += hist[0, b]
    need = p * total
    b, before = 0, 0.0
    while b < bins and before + hist[0, b] < need:
        before += hist[0, b]
        b += 1
    n = 0
    # (a vectorised count first: most 64-entry chunks hold none of the bin's; whole chunks with
    # the constant trip count, as exp2_scaled's blocks, then the tail)
    whole = vocab - vocab % 64
    for c in range(0, whole, 64):
        hits = 0
        for k in range(64):
            hits += at[c + k] == b
        if hits:
            n = _gather_bin(row, m, scale, at, b, vals, n, c, c + 64)
    return _gather_bin(row, m, scale, at, b, vals, n, whole, vocab), before, need


@njit(inline="always")
def _gather_bin(row, m, scale, at, b, vals, n, lo, hi):  # type: ignore[no-untyped-def]
    """Append to vals[n:] the finite z of row[lo:hi]'s entries in bin b; returns the new n."""
    for j in range(lo, hi):
        if at[j] == b:
            z = (row[j] - m) * scale
            if z > -np.inf:
                vals[n] = z
                n += 1
    return n


def warm(*, draws_only: bool = False) -> None:
    """Compile the kernels now, once per process, not in the first request that needs them: ~1 s
    for the draw (a logit service drafting on the CPU: `draws_only`), ~3.5 s for all of them (the
    combiner's: the mix for float32 and bfloat16 rows, `fusedmix.mix3`, and verification)."""
    vocab = DRAW_BLOCK + 3
    one, at, f, m = np.zeros(vocab, np.float32), np.zeros(1, np.int64), np.float32(1.0), np.zeros(1, np.float32)
    lanes, sums = np.empty(16, np.float32), np.empty(2, np.float32)
    calls = [(nucleus_try, (one, at, vocab, m, f, 0.9, np.full(1, 0.5), np.empty(1, np.int64), np.empty(1, np.bool_),
                            one.copy(), sums))]
    if not draws_only:
        from eftmesh.core.fusedmix import mix3

        half = np.zeros(vocab, np.uint16)  # (bfloat16 rows' bits: mix3's second specialisation)
        tops, at_lane = np.empty(1, np.int64), np.empty(16, np.int64)
        calls += [(mix3, (one.copy(), at, one, at, one, at, f, one, at, f, vocab, m.copy(), tops, lanes, at_lane)),
                  (mix3, (one.copy(), at, half, at, half, at, f, half, at, f, vocab, m.copy(), tops, lanes, at_lane)),
                  (token_bounds, (one, at, vocab, m, f, 0.9, at, m, np.empty(1), np.empty(1))),
                  (nucleus_bin, (one, f, f, 0.9, one.copy(), sums, np.empty((4, 9)), np.empty(vocab, np.int32), one.copy())),
                  (mass_above, (one, f, f, one, f)),
                  # (called from Python too, `fusedrows.nucleus_cut` at top-p 1: with its callers loaded
                  # from NUMBA_CACHE_DIR it would have no specialisation of its own yet)
                  (exp2_scaled, (one, f, f, one.copy(), sums)),
                  (residual_draw, (one, f, f, f, one, f, f, f, f, 0.5, one.copy(), sums))]
    start = time.perf_counter()
    # (each specialisation not compiled yet in this process: its argument types not among the kernel's signatures)
    todo = [(kernel, args) for kernel, args in calls if tuple(typeof(a) for a in args) not in kernel.signatures]
    for kernel, args in todo:
        kernel(*args)
    if todo:
        log.info("%d sampler kernels compiled (or loaded from NUMBA_CACHE_DIR) in %.2f s", len(todo),
                 time.perf_counter() - start)
