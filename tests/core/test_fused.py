"""The fused sampler (core/fused.py, `fusedrows.draw_fused`): its exp2 against float64, and its draws
against the torch path (`cuts.draw_nucleus`) that it replaces for whole-row draws."""

import math
import threading

import numpy as np
import pytest
import torch

from eftmesh.core import cuts, draws, fused, fusedmix, fusedrows
from eftmesh.core.draws import DRAW_BLOCK, LOG2E, exp2, running_sums
from eftmesh.core.sampling import SamplingConfig, _fusable, _scaled, processed_probs, sample_rows

from tests.core.test_draws import distance_from, row_uniforms, shaped_rows


def scaled_exp2(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """fused.exp2_scaled over one row: (2 ** ((x - max) * scale), block sums, total)."""
    e, sums = np.empty_like(x), np.empty(-(-len(x) // DRAW_BLOCK), np.float32)
    total = fused.exp2_scaled(x, x.max(), np.float32(scale), e, sums)
    return e, sums, total


def test_exp2_is_float32_exact_to_1e7_and_0_below_the_normal_range():
    """2 ** z within 1.2e-7 relative of float64's wherever it is a normal float32 (torch's exp2
    is within 1 ulp, 6e-8): at the polynomial's seams (half-integers), at 0, and deep in the
    tail; 0 at and below 2 ** -127 and at -inf; the block sums and the total are the float32
    and float64 sums of those values."""
    gen = np.random.default_rng(0)
    z = np.concatenate([-gen.random(20_000) * 126.0, -np.arange(0, 126) - 0.5, -np.arange(0, 126.0),
                        np.nextafter(-np.arange(0, 126) - 0.5, 0).astype(np.float64), [-126.49]]).astype(np.float32)
    x = np.concatenate([[np.float32(0.0)], z])  # max 0: z as it is, at scale 1
    e, sums, total = scaled_exp2(x, 1.0)
    want = np.exp2(x.astype(np.float64))
    normal = x >= -126
    rel = np.abs(e[normal] - want[normal]) / want[normal]
    assert rel.max() < 1.2e-7, f"worst relative error {rel.max():.3g} at z = {x[normal][rel.argmax()]}"
    assert (e[~normal] >= 0).all() and (e[~normal] <= 2.0 ** -126).all()

    tail = np.array([0.0, -127.0, -127.5, -150.0, -1e30, -np.inf], np.float32)
    assert scaled_exp2(tail, 1.0)[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]

    blocks = np.pad(e, (0, -len(e) % DRAW_BLOCK)).reshape(-1, DRAW_BLOCK)
    np.testing.assert_allclose(sums, blocks.sum(1, dtype=np.float64), rtol=1e-6)
    assert total == pytest.approx(float(want.sum()), rel=1e-6)


@pytest.mark.parametrize("vocab", [1003, 49_152, 50_257, 128_256])
def test_a_rows_values_are_those_of_torchs_path_and_the_same_in_any_batch(vocab):
    """exp2_scaled gives what `_scaled` then `draws.exp2` give, to float rounding; its block sums
    are `running_sums`' steps. A row's draw is computed by itself (one row at a time, the
    vectorised loop and its scalar tail rounding alike), so its token does not depend on where
    the row lies in a batch or on the rows beside it."""
    gen = torch.Generator().manual_seed(vocab)
    x = shaped_rows(gen, 6, vocab, "zipf")
    z = _scaled(x.clone(), 0.7)
    want = exp2(z)
    for i in range(6):
        e, sums, total = scaled_exp2(x[i].numpy(), LOG2E / 0.7)
        torch.testing.assert_close(torch.from_numpy(e), want[i], rtol=3e-7, atol=0)
        torch.testing.assert_close(torch.from_numpy(sums).double().cumsum(0), running_sums(want[i:i + 1])[0], rtol=1e-6, atol=0)
    cfg = SamplingConfig(0.7, top_p=0.9)
    seeds = [7, 8, 9, 10, 11, 12]
    u, more, taken = row_uniforms([torch.Generator().manual_seed(s) for s in seeds])
    together, ok = sample_rows(x, cfg, u, more=more)
    for i in range(6):
        for lo, hi in ((i, i + 1), (max(i - 2, 0), i + 1)):
            u1, more1, taken1 = row_uniforms([torch.Generator().manual_seed(s) for s in seeds[lo:hi]])
            alone, _ = sample_rows(x[lo:hi].clone(), cfg, u1, more=more1)
            assert int(alone[-1]) == int(together[i]) and taken1[-1] == taken[i]


@pytest.mark.parametrize("shape", ["peaked", "zipf", "flat"])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.6])
def test_the_fused_draw_takes_the_torch_paths_tokens_and_uniforms(shape, top_p):
    """`draw_fused` (one compiled pass per row) and `draw_nucleus` over torch's passes make the
    same draws with the same uniforms: the same rule, so the same tokens wherever no uniform
    falls within float rounding (~1e-7 of a row's mass) of a token's edge (none here), and the
    same number of tries. At top_p 1 every first draw is kept."""
    gen = torch.Generator().manual_seed(31)
    x = shaped_rows(gen, 48, 5_000, shape)
    cfg = SamplingConfig(0.8, top_p=top_p)
    assert _fusable(x, cfg, lambda r: r)
    seeds = range(200, 248)
    u, more, taken = row_uniforms([torch.Generator().manual_seed(s) for s in seeds])
    tokens, ok = fusedrows.draw_fused(x, LOG2E / 0.8, top_p, u, more)
    z = _scaled(x.clone(), 0.8)
    e = exp2(z)
    running = running_sums(e)
    u2, more2, taken2 = row_uniforms([torch.Generator().manual_seed(s) for s in seeds])
    if top_p < 1.0:
        want = cuts.draw_nucleus(z, e, running, torch.arange(48), top_p, u2, more2)
    else:
        want = draws.draw_probs(e, u2, running)[0]
    assert ok.all() and torch.equal(tokens, want) and taken == taken2
    if top_p == 1.0:
        assert taken == [1] * 48
        assert max(distance_from(exp2(z[i]), float(u[i]), int(tokens[i])) for i in range(48)) < 1e-6
    if shape == "flat" and top_p == 0.6:
        assert max(taken) > 1, "flat rows at a small top-p redraw"


def test_rows_without_finite_mass_are_flagged_and_impossible_tokens_never_drawn():
    """A row with a NaN or +inf, or all -inf, is flagged (its token meaningless); -inf entries
    are never drawn; broadcast rows (`expand`, row stride 0) and rows of a strided view are read
    where they lie."""
    gen = torch.Generator().manual_seed(5)
    x = shaped_rows(gen, 7, 3_000, "zipf")
    x[1, 17], x[3, 4], x[5] = math.nan, math.inf, -math.inf
    u = torch.rand(7, generator=gen, dtype=torch.float64)
    tokens, ok = fusedrows.draw_fused(x, LOG2E, 1.0, u, None)
    assert ok.tolist() == [True, False, True, False, True, False, True]
    assert torch.isfinite(x[ok].gather(1, tokens[ok, None])).all()
    many = x[0:1].expand(4_000, -1)
    drawn, ok = fusedrows.draw_fused(many, LOG2E, 1.0, torch.rand(4_000, generator=gen, dtype=torch.float64), None)
    assert ok.all() and torch.isfinite(x[0, drawn]).all() and drawn.unique().numel() > 10
    wide = torch.cat([x, x], 1)[:, 1_000:4_000]  # row stride 6,000, not contiguous
    assert not wide.is_contiguous()
    t1, ok1 = fusedrows.draw_fused(wide, LOG2E, 1.0, u, None)
    t2, ok2 = fusedrows.draw_fused(wide.contiguous(), LOG2E, 1.0, u, None)
    assert torch.equal(ok1, ok2) and torch.equal(t1[ok1], t2[ok2])


def test_only_the_whole_row_draws_are_fused():
    """Top-k, a top-p below NUCLEUS_MIN_P or without more uniforms (each row one uniform), other
    dtypes and a temperature whose scale is not a normal float32 take torch's path."""
    x = torch.zeros(2, 100)
    more = lambda r: r  # noqa: E731
    assert _fusable(x, SamplingConfig(1.0), None) and _fusable(x, SamplingConfig(0.5, top_p=0.9), more)
    assert not _fusable(x, SamplingConfig(1.0, top_p=0.9), None)
    assert not _fusable(x, SamplingConfig(1.0, top_p=0.3), more)
    assert not _fusable(x, SamplingConfig(1.0, top_k=5), more)
    assert not _fusable(x.double(), SamplingConfig(1.0), more)
    assert not _fusable(x, SamplingConfig(1e36), more)


def test_the_inverse_cdf_takes_draws_rules_at_exact_edges():
    """Exact cases of `draws.inverse_cdf`'s rules (searchsorted right): a target equal to a
    running sum goes past it, to the next block or entry with mass; and when rounding leaves
    nothing in the block to pass, the block's last entry with mass is taken."""
    x = np.full(2 * DRAW_BLOCK, -np.inf, np.float32)
    x[[0, 1, DRAW_BLOCK]] = 0.0  # masses 1, 1 (block 0) and 1 (block 1), exact in any sum
    flat, one = torch.from_numpy(x)[None], torch.tensor([0.0], dtype=torch.float64)
    at = {u: int(fusedrows.draw_fused(flat, 1.0, 1.0, one + u, None)[0][0]) for u in (0.0, 1 / 3, 2 / 3 - 1e-9)}
    assert at == {0.0: 0, 1 / 3: 1, 2 / 3 - 1e-9: 1}  # 1/3 of the mass 3: the target is 1, entry 0's end
    e = np.zeros(DRAW_BLOCK, np.float32)
    e[[3, 7]] = 1.0
    assert fused._inverse_cdf(e, np.array([2.0], np.float32), 1.0) == 7
    assert fused._inverse_cdf(e, np.array([2.5], np.float32), 2.2) == 7  # block sum rounded above its entries
    two = np.concatenate([e, e])
    assert fused._inverse_cdf(two, np.array([2.0, 2.0], np.float32), 2.0) == DRAW_BLOCK + 3


def test_warm_compiles_the_kernel_that_draws_use():
    """`warm` (run by the services at start) compiles the very specialisation the draws then
    call: no request compiles (a second specialisation would cost a second or so)."""
    from eftmesh.core.sampling import token_probs_at

    from eftmesh.combiner import batchmix

    fused.warm()
    kernels = (fused.nucleus_try, fused.token_bounds, fused.nucleus_bin, fused.mass_above, fusedmix.mix3, fused.residual_draw,
               fused.exp2_scaled)
    warmed = [1, 1, 1, 1, 2, 1, 1]  # (mix3: float32 rows and bfloat16 rows)
    assert [len(k.signatures) for k in kernels] == warmed
    gen = torch.Generator().manual_seed(2)
    scores = torch.empty(64 * 1_000)[:4 * 1_000].view(4, 1_000).copy_(shaped_rows(gen, 4, 1_000, "flat"))
    for cfg in (SamplingConfig(0.7), SamplingConfig(1.0, top_p=0.9)):
        u, more, _ = row_uniforms([torch.Generator().manual_seed(i) for i in range(4)])
        sample_rows(scores[1:3], cfg, u[:2], more=more)
        sample_rows(scores[0:1].expand(3, -1), cfg, u[:3], more=more)
        for exact in (False, True):
            token_probs_at(scores, torch.tensor([0, 2, 3]), torch.tensor([5, 9, 1]), cfg, exact=exact)
        for q in (scores[:2], scores[:2].bfloat16()):
            fusedrows.residual_draw_fused(scores, np.array([1, 3]), q, LOG2E / cfg.temperature, cfg.top_p, np.full(2, 0.5))
    for dtype in (torch.float32, torch.bfloat16):  # a step's mix, as the wire brings the rows
        roles = [[(0, 4, c, [torch.randn(4, 70_000, generator=gen).to(dtype)])] for c in (1.0, 0.5, -0.5)]
        assert batchmix._mix3(torch.empty(4, 70_000), roles) is not None
    assert [len(k.signatures) for k in kernels] == warmed


@pytest.mark.parametrize("shape", ["peaked", "zipf", "flat"])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
def test_token_probabilities_read_where_the_rows_lie_bound_and_equal_token_probs(shape, top_p):
    """`token_probs_at` (verification's p_t(x_t), the rows read in place): its interval holds
    `token_probs`' value, and is that value, within float rounding, at top_p 1 and outside the
    nucleus (0); exact, it is `token_probs`' value (the cut `cuts._cut_wide` makes, from a
    float64 histogram) for every token, likely or not. Rows at any spacing; a row without
    finite mass is flagged."""
    from eftmesh.core.sampling import token_probs, token_probs_at

    gen = torch.Generator().manual_seed(13)
    x = shaped_rows(gen, 30, 6_000, shape)
    x[7, 3] = math.nan
    cfg = SamplingConfig(0.8, top_p=top_p)
    likely = torch.multinomial(torch.softmax(x.nan_to_num(0.0) / 0.8, -1), 1, generator=gen).view(-1)
    anywhere = torch.randint(6_000, (30,), generator=gen)
    for tokens in (likely, anywhere):
        want, ok = token_probs(x.clone(), tokens, cfg)
        for rows in (torch.arange(30), torch.arange(29, -1, -1), torch.arange(0, 30, 3)):
            lo, hi, fine = token_probs_at(x, rows, tokens[rows], cfg, exact=False)
            w = want[rows]
            assert torch.equal(fine, ok[rows]) and not fine[rows == 7].any()
            w, lo, hi = w[fine], lo[fine], hi[fine]
            assert (lo <= w * (1 + 1e-6)).all() and (w <= hi * (1 + 1e-6)).all()
            assert torch.equal(lo == 0, w == 0) and torch.equal(hi == 0, w == 0)
            if top_p == 1.0:
                torch.testing.assert_close(lo, w, rtol=3e-7, atol=0) and torch.testing.assert_close(hi, w, rtol=3e-7, atol=0)
            exact, same, fine = token_probs_at(x, rows, tokens[rows], cfg, exact=True)
            assert torch.equal(exact, same) and torch.equal(fine, ok[rows])
            torch.testing.assert_close(exact[fine], want[rows][fine], rtol=3e-7, atol=0)


@pytest.mark.parametrize("shape", ["peaked", "zipf", "flat"])
def test_a_level_narrows_the_interval_and_any_level_leaves_it_holding_the_exact_value(shape):
    """`token_probs_at(levels=...)`: a level just below the row's own top-p boundary (what
    verification takes from the drafter's cut of a like row, `speculative.LEVEL_BELOW` under it)
    brings a token's lower bound within 3% of the exact value (from 5-10% below it); levels
    anywhere (above the boundary, far below it, -inf, +inf) leave every interval holding it."""
    from eftmesh.core.sampling import token_probs, token_probs_at
    from eftmesh.core.speculative import LEVEL_BELOW

    gen = torch.Generator().manual_seed(29)
    x = shaped_rows(gen, 24, 6_000, shape)
    cfg = SamplingConfig(0.8, top_p=0.9)
    rows = torch.arange(24)
    tokens = torch.multinomial(torch.softmax(x / 0.8, -1), 1, generator=gen).view(-1)
    tokens = torch.where(token_probs(x.clone(), tokens, cfg)[0] > 0, tokens, x.argmax(1))  # (in the nucleus)
    want, ok = token_probs(x.clone(), tokens, cfg)
    assert ok.all() and (want > 0).all()
    cuts = (np.empty(24, np.float32), np.empty(24))
    fusedrows.token_probs_fused(x, rows.numpy(), tokens.numpy(), LOG2E / 0.8, 0.9, exact=True, cuts=cuts)
    plain = token_probs_at(x, rows, tokens, cfg, exact=False)
    near = token_probs_at(x, rows, tokens, cfg, exact=False, levels=cuts[0] - np.float32(LEVEL_BELOW))
    anywhere = torch.rand(24, generator=gen).numpy().astype(np.float32) * -20
    for lo, hi, _ in (plain, near, token_probs_at(x, rows, tokens, cfg, exact=False, levels=cuts[0] + 1),
                      token_probs_at(x, rows, tokens, cfg, exact=False, levels=anywhere),
                      token_probs_at(x, rows, tokens, cfg, exact=False, levels=np.full(24, np.inf, np.float32)),
                      token_probs_at(x, rows, tokens, cfg, exact=False, levels=np.full(24, -np.inf, np.float32))):
        assert (lo <= want * (1 + 1e-6)).all() and (want <= hi * (1 + 1e-6)).all()
    assert torch.equal(near[1], plain[1])  # (a level bounds the nucleus mass from above: the lower bound's to narrow)
    gap, before = (want - near[0]) / want, (want - plain[0]) / want
    assert (near[0] >= plain[0]).all() and (gap < 0.03).all() and before.max() > 0.05, (gap.max(), before.max())


def test_row_maxima_from_the_caller_change_nothing():
    """The step's mix takes the rows' maxima on the way (`fusedmix.mix3`) and hands them down:
    the draws and token probabilities are those computed without them, bitwise."""
    from eftmesh.core.sampling import token_probs_at

    gen = torch.Generator().manual_seed(17)
    x = shaped_rows(gen, 9, 4_000, "zipf")
    x[4, 0] = math.nan
    maxima = torch.from_numpy(x.numpy().max(1))
    for cfg in (SamplingConfig(0.7), SamplingConfig(0.9, top_p=0.8)):
        u, more, taken = row_uniforms([torch.Generator().manual_seed(i) for i in range(9)])
        u2, more2, taken2 = row_uniforms([torch.Generator().manual_seed(i) for i in range(9)])
        a, ok = sample_rows(x, cfg, u, more=more)
        b, ok2 = sample_rows(x, cfg, u2, more=more2, row_max=maxima)
        assert torch.equal(ok, ok2) and not ok[4] and torch.equal(a[ok], b[ok]) and taken == taken2
        rows, tokens = torch.tensor([8, 4, 1, 0]), torch.tensor([3, 3, 999, 12])
        for exact in (False, True):
            want = token_probs_at(x, rows, tokens, cfg, exact=exact)
            got = token_probs_at(x, rows, tokens, cfg, exact=exact, row_max=maxima)
            assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("shape", ["peaked", "zipf", "flat"])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.4])
def test_a_rejections_token_is_the_torch_paths_residual_draw(shape, top_p):
    """`fusedrows.residual_draw_fused` (a speculative rejection's token from max(0, P - Q), the
    processed rows never formed) takes the token the torch path takes with the same uniform
    (`processed_probs`, the residual, `draw_probs`), for draft rows in float32 and bfloat16 and
    target rows at any spacing; where the residual has no mass (Q == P, or a draft row without
    finite mass), it draws from P as that path does."""
    gen = torch.Generator().manual_seed(29)
    cfg = SamplingConfig(0.7, top_p=top_p)
    p = shaped_rows(gen, 24, 5_000, shape)
    p[6] = p[6].bfloat16().float()  # (a row a bfloat16 draft row can equal)
    for q_dtype in (torch.float32, torch.bfloat16):
        q = (p[1::2] + torch.randn(12, 5_000, generator=gen) * 0.7).to(q_dtype)  # (other rows: other nuclei)
        q[3] = p[6]  # Q == P: no residual
        q[5, 9] = math.nan  # no finite mass
        rows = torch.arange(0, 24, 2)
        u = torch.rand(12, generator=gen, dtype=torch.float64)
        got = fusedrows.residual_draw_fused(p, rows.numpy(), q, LOG2E / 0.7, top_p, u.numpy())
        target = processed_probs(p[rows].clone(), cfg)
        want, ok = draws.draw_probs(processed_probs(q.float(), cfg).neg_().add_(target).clamp_min_(0.0), u)
        assert not ok[3] and not ok[5] and ok.any()  # (peaked rows: nuclei of one token, often the same: no residual either)
        want[~ok] = draws.draw_probs(target[~ok], u[~ok])[0]
        assert got.tolist() == want.tolist()
        assert all(target[i, t] > 0 for i, t in enumerate(got.tolist()))
        alone = [int(fusedrows.residual_draw_fused(p, rows[i:i + 1].numpy(), q[i:i + 1], LOG2E / 0.7, top_p, u[i:i + 1].numpy())[0])
                 for i in (0, 7, 11)]
        assert alone == [got[0], got[7], got[11]]


def test_a_kernels_scratch_lies_apart_from_every_other_array():
    """`fusedrows.apart`: the kernels' output buffers keep APART_BYTES of their own allocation on
    each side, so no row they read can lie right next to them (where LLVM's overlap check sends
    the loop down its scalar path: slower, and block sums in another order)."""
    for dtype in (np.float32, np.int32):
        a = fusedrows.apart(1000, dtype)
        assert a.shape == (1000,) and a.dtype == dtype and a.flags.c_contiguous
        start, end = a.ctypes.data, a.ctypes.data + a.nbytes
        base = a.base
        assert start - base.ctypes.data >= fusedrows.APART_BYTES
        assert base.ctypes.data + base.nbytes - end >= fusedrows.APART_BYTES
    s = fusedrows._Scratch(5000)
    assert all(b.base is not None and b.base.nbytes >= b.nbytes + 2 * fusedrows.APART_BYTES for b in (s.e, s.bins, s.vals))


def test_rows_shared_among_threads_give_the_same_results():
    """`fusedrows.set_threads` (the combiner's --threads) shares each call's rows among a pool
    of threads, each with its own scratch buffers: draws, token probabilities (bounds and
    exact), residual draws and the mix are those of one thread, bitwise."""
    from eftmesh.combiner import batchmix
    from eftmesh.core.sampling import token_probs_at

    gen = torch.Generator().manual_seed(31)
    x = torch.cat([shaped_rows(gen, 5, 4_000, s) for s in ("peaked", "zipf", "flat")])  # [15, 4000]
    q = x[::3] + torch.randn(5, 4_000, generator=gen)
    rows, tokens = torch.arange(14, -1, -1), torch.randint(4_000, (15,), generator=gen)
    roles = [torch.randn(40, 8_000, generator=gen) for _ in range(3)]
    cfg = SamplingConfig(0.8, top_p=0.9)

    def everything():
        u, more, _ = row_uniforms([torch.Generator().manual_seed(i) for i in range(15)])
        out = [sample_rows(x, cfg, u, more=more)]
        out += [token_probs_at(x, rows, tokens, cfg, exact=exact) for exact in (False, True)]
        out.append(fusedrows.residual_draw_fused(x, np.arange(0, 15, 3), q, LOG2E / 0.8, 0.9, np.linspace(0, 0.99, 5)))
        scores = torch.empty(40, 8_000)
        maxima = batchmix._mix3(scores, [[(0, 40, c, [r])] for c, r in zip((1.0, 0.5, -0.5), roles)])
        return out + [scores, maxima]

    one = everything()
    try:
        for n in (2, 3):
            fusedrows.set_threads(n)
            for rows_n in (1, 2, 7, 40):  # every row in exactly one share, the shares in as many threads
                shares: list[tuple[int, int]] = []
                names: set[str] = set()

                def note(lo, hi, shares=shares, names=names):
                    shares.append((lo, hi))
                    names.add(threading.current_thread().name)

                fusedrows.by_rows(rows_n, note)
                assert sorted(r for lo, hi in shares for r in range(lo, hi)) == list(range(rows_n))
                assert len(shares) == min(n, rows_n) and (len(names) > 1) == (len(shares) > 1)  # (this thread and the pool's)
            again = everything()
            flat = [(a, b) for x, y in zip(one, again) for a, b in (zip(x, y) if isinstance(x, tuple) else [(x, y)])]
            assert len(flat) == 12 and all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in flat)
    finally:
        fusedrows.set_threads(1)
