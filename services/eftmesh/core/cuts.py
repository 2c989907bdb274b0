"""Top-k and top-p on a CPU: where a row's kept set ends, found without sorting the vocabulary
(`cut`), and a top-p nucleus drawn from (`draw_nucleus`) or bounded (`nucleus_bounds`) without
finding where it ends.

Rows are in log2 units, as in draws.py: z = log2 of the probabilities up to a per-row shift,
each row's maximum 0. Every function works row by row, so a row's result does not depend on the
rows beside it. Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from eftmesh.core.draws import draw_probs, draw_target, exp2, inverse_cdf, running_sums


# A nucleus (top-p without top-k) need not be cut to be drawn from: a token drawn from the
# whole row lies in the nucleus exactly when the mass strictly above it is below p of the row's
# (top-p keeps a token while the mass before it is below p, and keeps the ties of its last), and
# a draw kept only then is distributed as the nucleus (rejection sampling). Each try is accepted
# with probability at least p and costs one compare and one dot product over the row: ~0.05 ms
# per row of 128k here, where a histogram cut costs ~0.9 ms and a cut among candidates (a
# handful of tokens) ~0.04 ms of passes plus ~0.3 ms of small calls per batch. So a sampler that
# can give a row more uniforms draws every top-p row so when p >= `sampling.NUCLEUS_MIN_P`.
REDRAWS = 4  # rows rejected this many more times are cut from their histogram, then drawn


def draw_nucleus(z: torch.Tensor, e: torch.Tensor, running: torch.Tensor, rows: torch.Tensor, p: float,
                 u: torch.Tensor, more: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One token per row of z's `rows` ([g] int64) from each row's top-p nucleus, without
    finding where it ends.

    Args:
        z: [rows, vocab] float32 (CPU) in log2 units, each row's maximum 0; e: exp2(z);
            running: e's `running_sums`. Every row in `rows` has finite mass.
        p: top-p, < 1.
        u: [g] float64 uniforms, one per row for the first draw.
        more: the uniforms for rows that draw again: given their indices in z ([m] int64), one
            float64 uniform each, from each row's own generator.

    Returns:
        [g] int64 tokens.
    """
    a, ea, run = z.numpy(), e.numpy(), running.numpy()
    rows_np = rows.numpy()
    total = run[rows_np, -1]  # [g]
    tokens = np.full(len(rows_np), -1)
    pending, uu = np.arange(len(rows_np)), u.numpy()
    for _ in range(REDRAWS + 1):
        r = rows_np[pending]
        t = inverse_cdf(ea, run, r, draw_target(uu, total[pending], np.ones(len(r), bool)))
        above = np.empty(len(r))
        for j, (i, v) in enumerate(zip(r, a[r, t])):  # a row at a time: numpy's compare is
            # vectorised (torch's took 7x as long here), and a float32 dot product with the mask
            # (relative error ~1e-7, as the row's block sums) beats a masked copy and a sum 2:1
            # (and a masked sum, `where=`, which is 30x slower where half a row is above v)
            above[j] = np.dot(ea[i], a[i] > v)
        keep = above < p * total[pending]
        tokens[pending[keep]] = t[keep]
        pending = pending[~keep]
        if pending.size == 0:
            return torch.from_numpy(tokens)
        uu = more(torch.from_numpy(rows_np[pending])).numpy()
    # still rejected (p is small for so flat a row): cut those rows, then draw within the cut
    r = torch.from_numpy(rows_np[pending])
    tokens[pending] = draw_cut(z[r], e[r], p, uu)
    return torch.from_numpy(tokens)


def draw_cut(z: torch.Tensor, e: torch.Tensor, p: float, u: np.ndarray) -> np.ndarray:
    """[g] int64: one token per row of z ([g, vocab] log2 units, e = exp2(z), written over)
    from its top-p nucleus, cut from its histogram (`_cut_wide`), with uniforms u ([g])."""
    e.masked_fill_(z < _cut_wide(z, e, 0, p)[:, None], 0.0)
    return draw_probs(e, torch.from_numpy(u))[0].numpy()


def nucleus_bounds(z: torch.Tensor, e: torch.Tensor, running: torch.Tensor, rows: torch.Tensor,
                   tokens: torch.Tensor, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on each of z's `rows`' probability of its token under top-p (without top-k),
    without finding where its nucleus ends: the test `draw_nucleus` makes (the token is in the
    nucleus exactly when the mass strictly above it is below p of the row's mass T; else its
    probability is 0), and, for a token inside, the nucleus mass M lies between
    max(pT, the mass at or above the token) and T. A compare and a dot product per row, where
    cutting a flat row of 128k from its histogram costs ~0.7 ms here.

    Args:
        z, e, running: as `draw_nucleus`'s (log2 units, each row's maximum 0; every row in
            `rows` has finite mass).
        rows: [g] int64 row indices; tokens: [g] int64, one token per row.
        p: top-p, < 1.

    Returns:
        ([g] float64 lower bounds, [g] float64 upper bounds), equal (0) for a token outside.
    """
    a, ea, run = z.numpy(), e.numpy(), running.numpy()
    r, t = rows.numpy(), tokens.numpy()
    total = run[r, -1]  # [g]
    v = a[r, t]  # [g] float32: each token's value
    et = np.exp2(v.astype(np.float64))  # (as `sampling.token_probs` reads a token's mass)
    above = np.array([np.dot(ea[i], a[i] > x) for i, x in zip(r, v)], dtype=np.float64)  # (as draw_nucleus)
    need = p * total
    inside = above < need
    lo = np.where(inside, et / total, 0.0)
    hi = np.where(inside, et / np.maximum(need, above + et), 0.0)
    return lo, hi


# A row's kept tokens are its largest entries, so they lie in the blocks of CUT_BLOCK entries
# with the largest maxima: the entries of its n best blocks that exceed the (n + 1)-th block
# maximum are exactly the row's entries above that value, sorted by one small sort. A cut found
# among them (its value above that maximum) is exact. A trained model's nucleus is a handful to
# a few hundred tokens, found so. A row whose cut lies lower (a nucleus of thousands) is cut
# from a histogram of its mass instead (`_cut_wide`), or, for a draw, not cut at all
# (`draw_nucleus`).
#
# A block is a stripe, not a run: with s = vocab // CUT_BLOCK, block j holds columns j, j + s,
# j + 2s, ... (and the last vocab % CUT_BLOCK columns form one more block). Its maxima are then
# an elementwise max over CUT_BLOCK contiguous slices, vectorised (0.08 ms over 16 rows of
# 49,152 here, against 0.21 ms for maxima over runs of 32). The search itself works on small
# arrays, where numpy's per-call cost is a fifth of torch's.
CUT_BLOCK = 32
CUT_TRIES = (32, 256)  # blocks searched (at least top_k + 1) before a row is cut from its histogram
# histogram bins over z in [-HIST_SPAN, 0] (log2 units: 40 nats, 0.04 nats a bin); one bin below
HIST_BINS, HIST_SPAN = 1024, 57.7


@dataclass
class Cut:
    """Where top-k then top-p cut each row of z: a row keeps its entries >= tau.

    `lists` holds, for rows cut among candidates: (row indices [g], candidate values [g, K],
    falling, equal values in column order, their columns [g, K]); every kept entry of those
    rows is among their candidates. `wide` lists the rows cut from their whole row; `uncut` the
    wide rows left uncut (`cut(wide=False)`: their tau is -inf). `e` is exp2(z) and `running`
    its `running_sums`, when the cut had to compute them (top-p without top-k)."""

    tau: torch.Tensor  # [rows] float32; -inf: keeps every entry (and rows without finite mass)
    lists: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    wide: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    uncut: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    e: torch.Tensor | None = None
    running: torch.Tensor | None = None

    def kept(self, z: torch.Tensor, *, wide: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The kept entries' probabilities, exp2(z) where z >= tau and 0 elsewhere, group by
        group: (row indices [g], probabilities [g, K], their columns [g, K]) for rows cut among
        candidates (kept entries lead each list), (rows, [g, vocab], None) for the wide rows.
        Written in place over `e` where the cut computed it. (Not the uncut rows; not the wide
        ones either when `wide` is False.)"""
        for rows, values, cols in self.lists:
            yield rows, torch.where(values >= self.tau[rows, None], values.exp2(), 0.0), cols
        if wide and self.wide.numel():
            every = self.wide.numel() == z.shape[0]  # (then no copy of the rows)
            zr = z if every else z[self.wide]
            e = exp2(zr) if self.e is None else self.e if every else self.e[self.wide]
            yield self.wide, e.masked_fill_(zr < self.tau[self.wide, None], 0.0), None

    def log_mass(self, z: torch.Tensor) -> torch.Tensor:
        """[rows] float32: log2 of each row's kept mass (`mass`); -inf for rows without mass."""
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log2(self.mass(z)).astype(np.float32))

    def mass(self, z: torch.Tensor) -> np.ndarray:
        """[rows] float64: each row's kept mass, sum(exp2(z) over z >= tau): from the candidate
        lists where a row has one (no pass over the row), else from the row (a compare and a
        float32 dot product, as `draw_nucleus`). 0 for rows without mass."""
        mass = np.zeros(z.shape[0])
        for rows, probs, _ in self.kept(z, wide=False):
            mass[rows.numpy()] = probs.double().sum(-1).numpy()  # (float64: exact for most kept sets, so in any batch)
        a, tau = z.numpy(), self.tau.numpy()
        for i in self.wide.tolist():
            e = exp2(z[i]) if self.e is None else self.e[i]
            mass[i] = np.dot(e.numpy(), a[i] >= tau[i])
        return mass

    def log_probs_(self, z: torch.Tensor) -> torch.Tensor:
        """z as the processed log2-probabilities, in place: each kept entry less the log2 of its
        row's kept mass, the rest -inf; rows without finite mass come out non-finite (callers
        flag them). A row cut among candidates is filled with -inf and its kept entries written
        back (no compare or mask over it); a wide row is done alone, in cache."""
        lm, a, tau = self.log_mass(z).numpy(), z.numpy(), self.tau.numpy()
        done = np.zeros(len(a), bool)
        for rows, values, cols in self.lists:
            r, v = rows.numpy(), values.numpy()
            a[r] = -np.inf
            a[r[:, None], cols.numpy()] = np.where(v >= tau[r, None], v - lm[r, None], -np.inf)
            done[r] = True
        wide = np.zeros(len(a), bool)
        wide[self.wide.numpy()] = True
        for i in np.flatnonzero(~done):
            dropped = a[i] < tau[i] if wide[i] else None
            with np.errstate(invalid="ignore"):  # a row without mass: -inf - -inf is NaN, flagged
                np.subtract(a[i], lm[i], out=a[i])
            if dropped is not None:
                a[i][dropped] = -np.inf
        return z


def cut(z: torch.Tensor, top_k: int, top_p: float, *, wide: bool = True, e: torch.Tensor | None = None,
        running: torch.Tensor | None = None) -> Cut:
    """Top-k (0: none; ties with the k-th kept), then top-p (1: none; the smallest set of the
    largest entries whose mass reaches top_p of what top-k left, ties with its last entry kept).

    Args:
        z: [rows, vocab] float32 CPU tensor in log2 units, each row's maximum 0 (rows without
            finite mass: skipped).
        wide: cut the rows whose cut is not among candidates from their histogram; False
            leaves them in `uncut` (for `draw_nucleus`, which needs no cut).
        e, running: exp2(z) and its `running_sums`, when the caller has them (top-p without
            top-k needs them; not written).
    """
    rows_all, vocab = z.shape
    bs, k, p = CUT_BLOCK, top_k if 0 < top_k < vocab else 0, top_p
    a = z.contiguous().numpy()  # [rows, vocab] float32
    stride = vocab // bs  # blocks that are stripes; the tail (vocab % bs columns) is one more
    bmax = a[:, :stride * bs].reshape(rows_all, bs, stride).max(1) if stride else np.empty((rows_all, 0), np.float32)
    if stride * bs < vocab:
        bmax = np.concatenate((bmax, a[:, stride * bs:].max(1, keepdims=True)), 1)
    nb = bmax.shape[1]
    out = Cut(torch.full((rows_all,), -math.inf))
    todo = np.flatnonzero(np.isfinite(bmax.max(1)))  # rows with finite mass
    total = None
    if p < 1.0 and not k:  # top-p's share is of the whole row's mass
        out.e = exp2(z) if e is None else e
        out.running = running_sums(out.e) if running is None else running
        total = out.running[:, -1].numpy()  # [rows] float64
    tau_all = out.tau.numpy()
    hopeless: list[np.ndarray] = []
    for n in sorted({max(c, k + 1) for c in CUT_TRIES}):
        if todo.size == 0 or n >= nb:
            break
        b = bmax[todo]  # [g, nb]
        best = np.argpartition(b, nb - n - 1, axis=1)[:, nb - n - 1:]  # [g, n + 1]: the (n+1)-th largest first
        floor = np.take_along_axis(b, best[:, :1], 1)[:, 0]  # [g]
        blocks = best[:, 1:]  # [g, n]
        if total is not None:  # rows whose n best blocks cannot hold p of the mass (nor can any
            # n blocks: CUT_BLOCK entries each, none above its max) go straight on
            hope = np.exp2(np.take_along_axis(b, blocks, 1).astype(np.float64)).sum(1) * bs >= p * total[todo]
            hopeless.append(todo[~hope])
            todo, floor, blocks = todo[hope], floor[hope], blocks[hope]
            if todo.size == 0:
                break
        g = todo.size
        i = np.arange(bs)
        if stride * bs == vocab:  # (no tail block)
            cols = (blocks[:, :, None] + i * stride).reshape(g, -1)  # [g, n * bs]
            vals = np.take(a, todo[:, None] * vocab + cols)  # (flat: a fifth of a 2-d gather's time)
        else:
            cols = np.where(blocks[:, :, None] < stride, blocks[:, :, None] + i * stride, stride * bs + i)
            cols = cols.reshape(g, -1)
            vals = np.take(a, todo[:, None] * vocab + np.minimum(cols, vocab - 1))
            vals[cols >= vocab] = -np.inf  # (past the tail)
        count = (vals > floor[:, None]).sum(1)  # [g]: the row's entries above floor, all here
        width = min(max(int(count.max()), k, 1), vals.shape[1])
        if width < vals.shape[1]:
            top = np.argpartition(vals, vals.shape[1] - width, axis=1)[:, vals.shape[1] - width:]
            vals, cols = np.take_along_axis(vals, top, 1), np.take_along_axis(cols, top, 1)
        # falling, equal values in column order: a row's draw must not depend on the rows beside
        # it (bf16 rows tie often)
        order = np.lexsort((cols, -vals), axis=1)
        tv, tc = np.take_along_axis(vals, order, 1), np.take_along_axis(cols, order, 1)  # [g, width]
        here = np.arange(width) < count[:, None]  # entries known to be the row's largest
        tau, found = np.full(g, -np.inf, np.float32), np.ones(g, bool)
        if k:  # every entry tied with the k-th is above floor too, so here
            tau, found = tv[:, k - 1], count >= k
        if p < 1.0:
            pe = np.where(here & (tv >= tau[:, None]), np.exp2(tv).astype(np.float64), 0.0)  # [g, width]
            mass = pe.sum(1) if k else total[todo]  # [g]: what top-p's share is of
            cum = pe.cumsum(1)
            # a token is kept while the mass before it is below p: the first always is
            keep = ((cum - pe) < p * mass[:, None]) & (pe > 0)
            keep[:, 0] = True
            tau = np.maximum(tau, tv[np.arange(g), keep.sum(1) - 1])
            if not k:  # found once the entries here hold p of the mass
                found = (cum >= p * mass[:, None]).any(1)
        done = found & (tau > floor)
        if done.any():
            rows = todo[done]
            tau_all[rows] = tau[done]
            out.lists.append((torch.from_numpy(rows), torch.from_numpy(tv[done]), torch.from_numpy(tc[done])))
        todo = todo[~done]
    rest = torch.from_numpy(np.sort(np.concatenate((*hopeless, todo))))
    if rest.numel() and not wide:
        out.uncut = rest
    elif rest.numel():
        out.wide = rest
        every = rest.numel() == rows_all  # (then no copy of the rows)
        e = None if out.e is None else out.e if every else out.e[rest]
        out.tau[rest] = _cut_wide(z if every else z[rest], e, k, p)
    return out


def _cut_wide(z: torch.Tensor, e: torch.Tensor | None, k: int, p: float) -> torch.Tensor:
    """`cut` for rows whose kept set is large ([g, vocab]; e: exp2(z) when known, not written):
    top-k by topk; top-p from a float64 histogram of each row's mass over z: every bin above the
    one where the mass passes p is kept, and only that bin's entries are sorted. Returns tau [g].

    A row at a time through numpy (its 512 KiB at 128k stay in cache between the passes):
    0.7 ms per row of 128k here, where whole-batch torch passes with float64 copies took 3 ms."""
    g = z.shape[0]
    tau = torch.topk(z, k, dim=-1).values[:, -1].contiguous() if k else torch.full((g,), -math.inf)
    if p >= 1.0:
        return tau
    e = exp2(z) if e is None else e
    a, ea, t = z.numpy(), e.numpy(), tau.numpy()
    span = HIST_BINS + 1
    for i in range(g):
        zi = a[i]
        w = np.where(zi >= t[i], ea[i], 0.0) if k else ea[i]  # top-p's share is of what top-k kept
        # bin of each entry (0: the top one; below -HIST_SPAN and -inf: the last)
        bins = np.minimum(zi * np.float32(-HIST_BINS / HIST_SPAN), np.float32(HIST_BINS)).astype(np.intp)
        hist = np.bincount(bins, weights=w, minlength=span).cumsum()  # float64
        need = p * hist[-1]
        # the bin where the mass passes p (the last one when rounding leaves need just above the total)
        b = min(int((hist < need).sum()), span - 1)
        before = float(hist[b - 1]) if b > 0 else 0.0
        vals = zi[bins == b]  # that bin's entries: a few hundred
        vals = -np.sort(-vals[vals >= t[i]])  # falling (top-k's cut; -inf never kept)
        if vals.size and vals[0] > -np.inf:
            pe = np.exp2(vals.astype(np.float64))
            kept = int(((before + pe.cumsum() - pe) < need).sum())  # >= 1: before < need
            t[i] = max(t[i], vals[max(kept, 1) - 1])
    return tau
