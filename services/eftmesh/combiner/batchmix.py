"""One step's EFT mixture for every generation in the batch, in as few passes as it can.

The per-token hot loop of the combiner: at a real vocabulary (128k entries) every role's rows
of a 16-generation step are 8 MiB of float32, and each pass over them costs a few tenths of a
millisecond on one core. So the step's rows are mixed role by role, not generation by
generation: a role's rows for consecutive generations with equal coefficients form one run,
added to the scores in one in-place call (`core.mixing.accumulate`), and when the run's rows
are adjacent slices of one response tensor (the usual case: one ScoreBatch per role and
step) they are read where they lie, never concatenated first. The scores are left
unnormalised: greedy decoding and greedy verification need only their argmax, so only the
rows a generation samples from or reports log-probabilities for are normalised.

No gRPC here; the scheduler calls `mix_step`, `verify_groups` and `draw_plain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from eftmesh.core.fusedrows import KERNEL_DTYPES, by_rows, flat_rows, kernel_array
from eftmesh.core.mixing import accumulate
from eftmesh.core.sampling import (
    NoFiniteMass,
    SamplingConfig,
    argmax_finite,
    argmax_rows,
    per_row_uniforms,
    sample_rows,
)
from eftmesh.core.speculative import Block, Verdict, verify_blocks


class Mixable(Protocol):
    """What the mixer reads of a generation."""

    coef: Mapping[str, float]  # role -> EFT coefficient (non-zero)

    def rows_per_role(self) -> int: ...


class Drawable(Mixable, Protocol):
    """A generation that samples: its own seeded generator."""

    gen: torch.Generator

    @property
    def keeps_scores(self) -> bool: ...  # its rows are read after its token is drawn (log-probabilities)


class Verifying(Drawable, Protocol):
    """A generation verifying a block: its k drafts, and their rows from the draft role."""

    k: int
    drafts: list[int]  # [k]
    draft_rows: torch.Tensor  # [k + 1, draft vocab]
    draft_probs: list[float]  # [k] each draft's q(x) from the draft role, or [] (not sent)
    draft_cuts: list[tuple[float, float]]  # [k] each draft row's top-p cut from the draft role, or []


Run = tuple[int, int, float, list[torch.Tensor]]  # (first row, end row, coefficient, row tensors)


def joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The row-wise concatenation of `parts` ([n_i, width] each), as a view when they are
    adjacent row slices of one contiguous tensor (no copy), else as a new tensor."""
    view = _adjacent(parts)
    return torch.cat(list(parts)) if view is None else view


def _adjacent(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """`joined`'s view of `parts`, or None where they are not adjacent slices of one tensor."""
    first = parts[0]
    if len(parts) == 1:
        return first
    width, end = first.shape[1], first.storage_offset()
    base = first.untyped_storage().data_ptr()
    for p in parts:
        if (not p.is_contiguous() or p.dtype != first.dtype or p.shape[1] != width
                or p.untyped_storage().data_ptr() != base or p.storage_offset() != end):
            return None
        end += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, width), (width, 1), first.storage_offset())


class Workspace:
    """The step's score buffer, and a scratch buffer for the rows sampling copies (`scratch`),
    kept from step to step and grown when a step needs more.

    A fresh [rows, 128k] float32 tensor is megabytes that the allocator maps anew each step,
    and first writes to new pages fault: at 80 rows (16 verifies of 4 drafts) writing a
    fresh buffer took 26 ms where writing a reused one takes 3. The scores live only within
    one step (the scheduler's thread), so one buffer serves every step. `maxima` and `tops`:
    the scores' row maxima and where each first lies, when the step's mix took them on the way
    (`fusedmix.mix3`), else None; the fused draws and verification then skip their own pass for
    the maxima, and greedy decoding for the argmax (`argmax_step`)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0)
        self._scratch = torch.empty(0)
        self.maxima: torch.Tensor | None = None  # [rows] float32, this step's
        self.tops: torch.Tensor | None = None  # [rows] int64, each row's argmax, with `maxima`

    def take(self, rows: int, vocab_size: int) -> torch.Tensor:
        """A [rows, vocab_size] float32 view of the score buffer; its contents are garbage."""
        n = rows * vocab_size
        if self._buf.numel() < n:
            self._buf = torch.empty(n)
        return self._buf[:n].view(rows, vocab_size)

    def scratch(self, rows: int, vocab_size: int) -> torch.Tensor:
        """A [rows, vocab_size] float32 view of the scratch buffer (not the scores'); garbage.
        A new one at 32 rows of 128k cost verification 3 ms of page faults per step."""
        n = rows * vocab_size
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n)
        return self._scratch[:n].view(rows, vocab_size)


def mix_step(
    gens: Sequence[Mixable], rows: Mapping[Mixable, Mapping[str, torch.Tensor]], vocab_size: int,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, dict[Mixable, int]]:
    """Mix every generation's rows of this step.

    Args:
        gens: the generations, in output order; generation g owns rows_per_role() rows.
        rows: g -> role -> [rows_per_role, vocab_r] logits of that role (any per-row shift),
            floored (`core.mixing.floor_rows_`: the logit services send them so).
        vocab_size: the shared tokenizer's size (padding columns past it are dropped).
        workspace: where the scores are written (a new one when None); they stay valid until
            the workspace's next use.

    Returns:
        ([total rows, vocab_size] float32 scores, equal to each generation's EFT
        log-probabilities up to a per-row constant; g -> its first row).
    """
    offsets: dict[Mixable, int] = {}
    n = 0
    for g in gens:
        offsets[g] = n
        n += g.rows_per_role()
    runs: dict[str, list[Run]] = {}  # role -> its runs
    for g in gens:
        o, m = offsets[g], g.rows_per_role()
        for role, c in g.coef.items():
            x = rows[g][role]
            assert x.shape[0] == m, f"{role}: expected {m} rows, got {tuple(x.shape)}"
            rs = runs.setdefault(role, [])
            if rs and rs[-1][1] == o and rs[-1][2] == c:
                first, _, _, parts = rs[-1]
                parts.append(x)
                rs[-1] = (first, o + m, c, parts)
            else:
                rs.append((o, o + m, c, [x]))
    workspace = workspace or Workspace()
    # The first role whose runs cover every row writes the scores (no zero-fill pass first).
    order = sorted(runs, key=lambda r: sum(e - f for f, e, _, _ in runs[r]) != n)
    init = bool(order) and sum(e - f for f, e, _, _ in runs[order[0]]) == n
    scores = workspace.take(n, vocab_size)  # [n, vocab] float32
    workspace.maxima, workspace.tops = (_mix3(scores, [runs[r] for r in order]) if init else None) or (None, None)
    if workspace.maxima is not None:
        return scores, offsets
    if not init:
        scores.zero_()
    fused = _init_fused(scores, runs[order[0]], runs[order[1]] if len(order) > 1 else [], vocab_size) if init else set()
    for i, role in enumerate(order):
        for first, end, c, parts in runs[role]:
            if (i == 0 and init) or (i == 1 and (first, end) in fused):
                continue
            # rows are floored where they enter the combiner (upstream.py, inprocess.LocalScorer)
            x = joined(parts)
            accumulate(scores[first:end], x, c, floored=True,
                       scratch=None if x.dtype == torch.float32 else workspace.scratch(end - first, vocab_size))
    return scores, offsets


# Below this many entries a role's rows stay in L2 between torch's passes, and the kernel's call
# (~15 us more than torch's two) costs more than the pass it saves: float32, one row of 128k mixed
# in 94 us against 80, 16 rows of 49,152 in 453 against 503 (this project's CPU); bfloat16 (torch
# widening each role into the scratch buffer first), one row of 49,152 in 59 against 52, 80 rows
# of 2,048 in 204 against 142, 32 rows of 49,152 in 1,013 against 1,157.
MIX3_MIN_ENTRIES = 1 << 18


def _mix3(scores: torch.Tensor, roles: list[list[Run]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The usual step (three roles, each one run over every row, the first with coefficient 1:
    EFT's large + w * (ft - small) over a batch of one composition; every role's rows float32,
    or every role's bfloat16, as a GPU model sends them) mixed in one pass (`core.fusedmix.mix3`:
    bitwise the sums of the passes below), when it gains by it. Returns the rows' maxima ([n]
    float32) and where each first lies ([n] int64: the argmax, where the maximum is finite), or
    None: not that step."""
    n, vocab = scores.shape
    if len(roles) != 3 or any(len(r) != 1 or r[0][:2] != (0, n) for r in roles) or roles[0][0][2] != 1.0:
        return None
    if n * vocab < MIX3_MIN_ENTRIES or len({x.dtype for r in roles for x in r[0][3]}) != 1:
        return None
    if (segments := _segments([r[0][3] for r in roles], n, vocab)) is None:
        return None
    from eftmesh.core import fusedmix  # (numba: compiled at the combiner's start, `fused.warm`)

    out, o = _rows_at(scores, vocab)
    maxima, tops, cb, cc = np.empty(n, np.float32), np.empty(n, np.int64), np.float32(roles[1][0][2]), np.float32(roles[2][0][2])
    ends = np.array([hi for _, hi, _ in segments])

    def share(s: int, e: int) -> None:
        # the share's rows, one kernel call per segment they cross: the rows are shared among
        # the threads once, not segment by segment (a step of generations drafting and not has a
        # segment per run of them, and one call per segment left each thread a row or two, and
        # the process's other Python threads a GIL hand-over per call to delay it by)
        lanes, at_lane = np.empty(16, np.float32), np.empty(16, np.int64)
        for k in range(int(np.searchsorted(ends, s, side="right")), len(segments)):
            lo, hi, ((a, x), (b, y), (c, z)) = segments[k]
            if lo >= e:
                break
            f, t = max(s, lo), min(e, hi)
            fusedmix.mix3(out, o[f:t], a, x[f - lo:t - lo], b, y[f - lo:t - lo], cb, c, z[f - lo:t - lo], cc, vocab,
                       maxima[f:t], tops[f:t], lanes, at_lane)

    by_rows(n, share)
    return torch.from_numpy(maxima), torch.from_numpy(tops)


Rows = tuple[np.ndarray, np.ndarray]  # (a flat float32 array, or uint16 for bfloat16 bits; each row's start in it)


def _segments(parts: list[list[torch.Tensor]], n: int, vocab: int) -> list[tuple[int, int, list[Rows]]] | None:
    """The step's rows [0, n) in as few runs as the kernel can read in place: [(first row, end
    row, each role's Rows for those rows)]. One run where every role's parts are adjacent slices
    of one response (the usual step); else one per stretch of rows whose parts share a storage
    in every role, never a copy: the rows of a step that mixes generations drafting and not, or
    answers from two calls, were a 40 MB concatenation at 80 rows of 128k (3.4 ms). None: some
    rows are not float32 or bfloat16 with adjacent columns (the kernel's)."""
    views = [_adjacent(p) for p in parts]
    if all(v is not None for v in views):  # (a view's parts share its dtype and column stride)
        if any(v.dtype not in KERNEL_DTYPES or v.stride(1) != 1 for v in views):
            return None
        return [(0, n, [_rows_at(v, vocab) for v in views])]
    if any(x.dtype not in KERNEL_DTYPES or x.stride(1) != 1 for p in parts for x in p):
        return None
    keys, starts, refs = [], [], []  # per role: each row's storage, start in it, and a tensor on it
    for ps in parts:
        k = [(p.untyped_storage().data_ptr(), p.shape[0]) for p in ps]
        keys.append(np.repeat([key for key, _ in k], [r for _, r in k]))
        starts.append(np.concatenate([p.storage_offset() + np.arange(p.shape[0]) * p.stride(0) for p in ps]))
        refs.append({key: p for (key, _), p in zip(k, ps)})
    cuts = np.flatnonzero(np.any([ks[1:] != ks[:-1] for ks in keys], axis=0)) + 1
    out = []
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
        rows = []
        for ks, st, ref in zip(keys, starts, refs):
            base = int(st[lo:hi].min())
            flat = ref[int(ks[lo])].as_strided((int(st[lo:hi].max()) + vocab - base,), (1,), base)
            rows.append((kernel_array(flat), st[lo:hi] - base))
        out.append((lo, hi, rows))
    return out


def _rows_at(x: torch.Tensor, vocab: int) -> Rows:
    """x's rows (float32 or bfloat16) as one flat array (`fusedrows.flat_rows`: no copy) and
    each row's start in it."""
    _, flat, stride = flat_rows(x, vocab)
    return flat, np.arange(x.shape[0], dtype=np.int64) * stride


def _init_fused(scores: torch.Tensor, first_role: list[Run], second_role: list[Run], vocab: int) -> set[tuple[int, int]]:
    """Write the first role's runs into the scores (it covers every row). Where its coefficient
    is 1, the second role's runs inside are added in the same pass, x + c * y (one torch.add
    into the scores, bitwise the sum the two passes give): at 128k that saves the first role's
    copy, a fifth of the mix. Returns the second role's runs so written."""
    fused = set()
    for first, end, c, parts in first_role:
        x, at = joined(parts), first
        # (float32 rows only: torch.add computes in its inputs' dtype, so bf16 rows would be
        # summed in bf16)
        one_pass = c == 1.0 and x.dtype == torch.float32
        for f, e, c2, parts2 in second_role if one_pass else ():
            if first <= f and e <= end and parts2[0].dtype == torch.float32:  # (a role's rows share one dtype)
                if at < f:
                    accumulate(scores[at:f], x[at - first:f - first], c, floored=True, init=True)
                torch.add(x[f - first:e - first, :vocab], joined(parts2)[:, :vocab], alpha=c2, out=scores[f:e])
                fused.add((f, e))
                at = e
        if at < end:
            accumulate(scores[at:end], x[at - first:], c, floored=True, init=True)
    return fused


def argmax_step(scores: torch.Tensor, workspace: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling.argmax_finite(scores)` (each row's argmax, and whether the row's maximum is
    finite: no NaN, no +inf, some finite entry), from what the step's mix took on the way
    (`Workspace.tops`, `maxima`) where it did: no pass over the rows. A row whose maximum is not
    finite gets numpy's argmax (its first NaN or +inf), as `check_argmax_finite` then reads."""
    if workspace.tops is None or workspace.maxima is None:
        return argmax_finite(scores)
    top, finite = workspace.tops, torch.isfinite(workspace.maxima)
    if not bool(finite.all()):
        top, bad = top.clone(), (~finite).nonzero().flatten()
        top[bad] = argmax_rows(scores.index_select(0, bad))
    return top, finite


def verify_groups(
    gens: Sequence[Verifying], sampling: Mapping[Verifying, SamplingConfig], offsets: Mapping[Verifying, int],
    scores: torch.Tensor, workspace: Workspace | None = None,
) -> dict[Verifying, Verdict | NoFiniteMass]:
    """Every sampled block's verdict (k + 1 rows: a verification), one `verify_blocks` per
    group of equal settings, each block with its own generator: batching changes no verdict.
    Greedy generations need only the argmax of their scores; a sampled plain step only its
    token (`draw_plain`). The rows verification copies go to `workspace`'s scratch buffer."""
    groups: dict[SamplingConfig, list[Verifying]] = {}
    for g in gens:
        if not sampling[g].greedy and g.rows_per_role() > 1:
            groups.setdefault(sampling[g], []).append(g)
    out: dict[Verifying, Verdict | NoFiniteMass] = {}
    workspace = workspace or Workspace()
    for cfg, members in groups.items():
        blocks = [Block(g.drafts, offsets[g], g.draft_rows, g.gen, g.draft_probs or None, g.draft_cuts or None)
                  for g in members]
        out.update(zip(members, verify_blocks(scores, blocks, cfg, workspace.scratch, row_max=workspace.maxima)))
    return out


def draw_plain(
    gens: Sequence[Drawable], sampling: Mapping[Drawable, SamplingConfig], offsets: Mapping[Drawable, int],
    scores: torch.Tensor, workspace: Workspace | None = None,
) -> dict[Drawable, int]:
    """Every sampled plain step's token, one `sample_rows` per group of equal settings over its
    stacked rows, each row with uniforms from its own generation's generator (what the
    generation would take alone): batching changes no token. -1: that row has no finite mass.
    The usual draw (no top-k) only reads the rows (`fusedrows.draw_fused`); others scale them: over
    the scores when the rows are adjacent and nothing reads them afterwards, else in a copy in
    the scratch buffer."""
    groups: dict[SamplingConfig, list[Drawable]] = {}
    for g in gens:
        if not sampling[g].greedy and g.rows_per_role() == 1:
            groups.setdefault(sampling[g], []).append(g)
    out: dict[Drawable, int] = {}
    workspace = workspace or Workspace()
    for cfg, members in groups.items():
        u, more = per_row_uniforms([g.gen for g in members])
        first, n = offsets[members[0]], len(members)
        maxima = workspace.maxima
        if all(offsets[g] == first + i for i, g in enumerate(members)) and not any(g.keeps_scores for g in members):
            # in place: writing a scratch buffer whose lines the step's new rows pushed out of the
            # cache cost 0.3 ms per 16 rows of 49,152 more than a pass over the cached scores
            rows, row_max = scores[first:first + n], None if maxima is None else maxima[first:first + n]
        else:  # rows apart, or read afterwards (logprobs): a copy
            at = _rows(members, offsets)
            rows = torch.index_select(scores, 0, at, out=workspace.scratch(n, scores.shape[1]))
            row_max = None if maxima is None else maxima[at]
        tokens, ok = sample_rows(rows, cfg, u, overwrite=True, more=more, row_max=row_max)
        out.update({g: t if good else -1 for g, t, good in zip(members, tokens.tolist(), ok.tolist())})
    return out


def _rows(members: Sequence[Mixable], offsets: Mapping[Mixable, int]) -> torch.Tensor:
    return torch.cat([torch.arange(offsets[g], offsets[g] + g.rows_per_role()) for g in members])
