"""Drawing tokens fast on a CPU: inverse-CDF draws over whole rows (the top-k / top-p cuts
and the nucleus draws built on them are in cuts.py).

At a real vocabulary (128k entries) the combiner samples 16 rows of 8 MiB each per step. With
torch.multinomial and a sort per row that cost 58 ms (plain sampling) to 190 ms (top-p) per
step on this project's machine; here it is a few passes over the rows: an exp2, block sums and
maxima, and small sorts over the few entries that matter.

Rows here are in log2 units: z = log2 of the probabilities up to a per-row shift, and a
probability is exp2(z). `sampling` scales the scores so ((x - max) * log2(e) / temperature, in
the pass that divided by the temperature before), because torch's exp2 costs about half its
exp: 1.2 against 2.2 ms over 16 rows of 128k on one core of this project's AVX2 EPYC (torch
2.13; both within 1 ulp here, checked against float64), and the exp is the
sampler's largest pass. (`draw` alone takes natural log-probabilities, as `process` gives.)

Every function works row by row, so a row's result does not depend on the rows beside it
(batching changes no generation's output). Pure tensor code: no grpc, no transformers.
"""

from __future__ import annotations

import numpy as np
import torch


LOG2E = 1.4426950408889634  # log2(e): z = log-probability * LOG2E
LN2 = 0.6931471805599453  # ln(2): a log-probability = z * LN2


# torch's CPU kernels take the last entries of a buffer (fewer than two vectors) by a scalar
# exp2, which can differ from the vectorised one in the last bit: over a contiguous [rows, vocab]
# buffer those are the last row's last entries only, so a row's values would depend on where it
# lies in a batch. `exp2` runs the rows' first EXP2_SPLIT-aligned columns and their tails as two
# 2-d calls instead: each row's entries then go the way they go alone (bitwise, checked, on one
# intra-op thread: with several, torch splits the buffer between them wherever it falls).
EXP2_SPLIT = 64


def exp2(z: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """2 ** z (in place with `overwrite`): the sampler's largest pass, each row's values those
    it gets alone (above). (numpy's exp2 was slower than torch's here: 2.8 ms per 1M entries;
    an AVX-512 numpy's exp was the faster exp, 0.9 against torch's 1.7 ms over 16 rows of
    128k, but torch's exp2 is as fast as that.)"""
    w = z.shape[-1] - z.shape[-1] % EXP2_SPLIT
    if z.dim() != 2 or z.shape[0] < 2 or w in (0, z.shape[-1]):
        return z.exp2_() if overwrite else z.exp2()
    out = z if overwrite else torch.empty_like(z)
    torch.exp2(z[:, :w], out=out[:, :w])
    torch.exp2(z[:, w:], out=out[:, w:])
    return out


# Inverse-CDF sampling in two levels. torch.multinomial draws one row at a time and checks its
# input in several passes: 2.7 ms per row of a 128k vocabulary on this project's CPU, so a
# 16-stream sampled step spent 58 ms choosing tokens. `draw` does every row of a step at once in
# about two passes over the rows: exp2, then sums of blocks of DRAW_BLOCK entries (vectorised);
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
    return draw_probs(logprobs.exp_() if overwrite else logprobs.exp(), u)


def draw_probs(probs: torch.Tensor, u: torch.Tensor, running: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` from probabilities: probs [rows, vocab] >= 0 (CPU), any per-row scale; `running`:
    their `running_sums`, when the caller has them."""
    assert probs.dim() == 2 and u.shape == probs.shape[:1], f"probs [rows, vocab], u [rows]: {probs.shape}, {u.shape}"
    rows, vocab = probs.shape
    bs = DRAW_BLOCK
    probs = probs if probs.dtype in (torch.float32, torch.float64) else probs.float()  # (numpy has no bf16)
    uu = u.numpy()
    if vocab <= bs:  # one block (a cut's candidate list): no block level
        pr = probs.numpy()
        cum = pr.astype(np.float64).cumsum(1)  # [rows, vocab]
        total = cum[:, -1]  # [rows]; NaN or inf when a row has NaN or +inf
        ok = np.isfinite(total) & (total > 0)
        return torch.from_numpy(_pick(pr, cum, draw_target(uu, total, ok))), torch.from_numpy(ok)
    running = (running_sums(probs) if running is None else running).numpy()  # [rows, blocks]
    total = running[:, -1]  # [rows]; NaN or inf when a row has NaN or +inf
    ok = np.isfinite(total) & (total > 0)
    at = inverse_cdf(probs.numpy(), running, np.arange(rows), draw_target(uu, total, ok))
    return torch.from_numpy(at), torch.from_numpy(ok)


def inverse_cdf(probs: np.ndarray, running: np.ndarray, rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[len(rows)] int64: for each of probs' `rows`, the entry where its running sum passes
    `target` ([len(rows)] float64): the block from the rows' `running_sums`, then the entry
    from the running sum of that one block."""
    vocab, bs = probs.shape[1], DRAW_BLOCK
    r = running[rows]  # [g, blocks]
    block = np.minimum((r <= target[:, None]).sum(1), r.shape[1] - 1)  # [g]: searchsorted, right=True
    before = np.where(block > 0, r[np.arange(len(rows)), np.maximum(block - 1, 0)], 0.0)  # [g]
    cols = block[:, None] * bs + np.arange(bs)  # [g, bs]
    inside = probs[rows[:, None], np.minimum(cols, vocab - 1)]  # [g, bs]
    inside[cols >= vocab] = 0.0
    return block * bs + _pick(inside, inside.astype(np.float64).cumsum(1), target - before)


def running_sums(probs: torch.Tensor) -> torch.Tensor:
    """[rows, blocks] float64 running sums of the rows' DRAW_BLOCK-entry blocks: float32 sums of
    256 entries (relative error ~1e-7; a token's chance moves by that much of its block's mass),
    accumulated over blocks in float64. The last column is each row's mass (NaN or inf when a
    row has NaN or +inf)."""
    rows, vocab = probs.shape
    whole = vocab - vocab % DRAW_BLOCK
    sums = probs[:, :whole].reshape(rows, whole // DRAW_BLOCK, DRAW_BLOCK).sum(-1, dtype=torch.float32)
    if whole < vocab:
        sums = torch.cat((sums, probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float32)), 1)
    return sums.double().cumsum(-1)


def draw_target(u: np.ndarray, total: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """u * total, below total (nextafter guards the product rounding up), so the entry found
    holds mass; rows without mass get a harmless stand-in."""
    total = np.where(ok, total, 1.0)
    return np.minimum(u * total, np.nextafter(total, 0.0))


def _pick(probs: np.ndarray, cum: np.ndarray, left: np.ndarray) -> np.ndarray:
    """[rows] int64: the first entry of each row of probs ([rows, n], running sums `cum`) whose
    running sum passes `left` ([rows]): searchsorted with right=True, which skips
    zero-probability entries; rounding between a block's sum and its running sum can leave
    nothing to pass: then the row's last entry with mass."""
    at = (cum <= left[:, None]).sum(1)
    last = np.where(probs > 0, np.arange(probs.shape[1]), -1).max(1)
    return np.minimum(at, last)
