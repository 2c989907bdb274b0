"""The combiner's usual mix, compiled: `mix3`, three roles' rows into the step's scores in one
pass, with each row's maximum and argmax taken on the way (`batchmix._mix3` calls it; `fused.warm`
compiles it). The roles' rows are float32, or bfloat16 as their bits (uint16), widened exactly as
they are read (`_f32`). Pure array code: no grpc, no transformers, no torch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from eftmesh.core.fused import _CACHE, _bits_as_float


def _f32(v):  # type: ignore[no-untyped-def]
    """A row entry as float32: itself, or a bfloat16's bits (uint16) widened, exactly (bfloat16
    is float32's upper half). Compiled code gets `_f32_typed`'s version for its entry type."""
    if isinstance(v, (int, np.integer)):
        return np.array([int(v) << 16], np.uint32).view(np.float32)[0]
    return np.float32(v)


@overload(_f32, inline="always")
def _f32_typed(v):  # type: ignore[no-untyped-def]
    if isinstance(v, types.Float):
        return lambda v: v
    if isinstance(v, types.Integer):
        return lambda v: _bits_as_float(np.int32(v) << np.int32(16))
    return None


@njit(fastmath={"contract"}, nogil=True, boundscheck=False, cache=_CACHE)
def mix3(out, out_at, a, a_at, b, b_at, cb, c, c_at, cc, vocab, maxima, tops, lanes, at_lane):  # type: ignore[no-untyped-def]
    """EFT's usual mix, three roles in one pass: out row i = a_i + cb * b_i + cc * c_i (float32),
    row i of each at flat[at[i]:at[i] + vocab] ([n] int64 starts), maxima[i] its maximum (NaN
    where it holds a NaN: what the draws' max gives) and tops[i] where it first lies (numpy's
    argmax, the greedy token, wherever the maximum is finite). Bitwise what torch gives role by
    role (`batchmix.mix_step`: a + cb * b in one torch.add, then += cc * c): each add is one
    fused multiply-add, as torch's vectorised add with alpha is. One read of each role's rows
    and one write, where the two torch passes read and wrote the scores twice (1.5 against 2.0
    ms over 16 rows of 128k on this project's CPU, the rows fresh from the wire), and the
    maximum the draw needs and the argmax greedy decoding needs taken on the way, not by more
    passes over the rows (an argmax pass cost greedy steps 12-40 us per 128k row, the mix's
    loop nothing measurable). `lanes` ([16] float32) and `at_lane` ([16] int64): scratch,
    sixteen running maxima and where each was first reached (one would make the loop wait on
    each compare); the first of the lanes holding the row's maximum is the argmax.

    The roles' rows are float32, or all three bfloat16 as their bits (uint16: a GPU model's rows
    as the wire brings them), widened here, exactly: the same sums as widening them first, with
    half the bytes read and no float32 copy of them made (80 rows of 128k: 7.8 ms, against 11-15
    for the float32 mix after 26-33 ms of torch's conversions)."""
    whole = vocab - vocab % 16
    for i in range(out_at.shape[0]):
        o, x, y, z = out[out_at[i]:], a[a_at[i]:], b[b_at[i]:], c[c_at[i]:]  # (slices: indices known >= 0)
        lanes[:] = -np.inf
        for k in range(16):
            at_lane[k] = k
        for j in range(0, whole, 16):
            for k in range(16):
                v = (_f32(x[j + k]) + cb * _f32(y[j + k])) + cc * _f32(z[j + k])
                o[j + k] = v
                at_lane[k] = j + k if v > lanes[k] else at_lane[k]
                lanes[k] = np.maximum(lanes[k], v)
        top = np.float32(-np.inf)
        for k in range(16):
            top = np.maximum(top, lanes[k])
        t = vocab
        for k in range(16):  # (the first index among the lanes holding the maximum)
            if lanes[k] == top and at_lane[k] < t:
                t = at_lane[k]
        t = t if t < vocab else 0  # (no lane holds a NaN maximum: tops[i] is then only in range)
        for j in range(whole, vocab):
            v = (_f32(x[j]) + cb * _f32(y[j])) + cc * _f32(z[j])
            o[j] = v
            t = j if v > top else t
            top = np.maximum(top, v)
        maxima[i] = top
        tops[i] = t
