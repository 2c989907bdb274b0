"""The CPU sampler (core/draws.py): inverse-CDF draws, and top-k / top-p cuts found without
sorting the vocabulary, against float64 references that sort."""

import math

import pytest
import torch

from eftmesh.core import cuts, draws, sampling
from eftmesh.core.cuts import cut
from eftmesh.core.draws import draw
from eftmesh.core.sampling import SamplingConfig, make_generator, process, sample, sample_rows, uniforms


def distance_from(probs: torch.Tensor, u: float, token: int) -> float:
    """How far u * mass lies outside `token`'s interval of a float64 running sum over the whole
    row (0: the token a float64 inverse CDF picks), relative to the row's mass."""
    cdf = probs.double().cumsum(0)
    target = u * float(cdf[-1])
    lo = float(cdf[token - 1]) if token else 0.0
    return max(lo - target, target - float(cdf[token]), 0.0) / float(cdf[-1])


def random_rows(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Log-probabilities as models make them: peaked, long tails, some tokens impossible."""
    x = torch.randn(rows, vocab, generator=gen) * float(torch.empty(1).uniform_(0.5, 8.0, generator=gen))
    x[torch.rand(rows, vocab, generator=gen) < 0.1] = -math.inf
    x[:, int(torch.randint(vocab, (1,), generator=gen))] = 0.0  # each row has some mass
    return torch.log_softmax(x, dim=-1)


@pytest.mark.parametrize("vocab", [1, 3, 255, 256, 257, 1000, 4096, 50_257])
def test_draw_picks_the_token_a_float64_inverse_cdf_picks(vocab):

    gen = torch.Generator().manual_seed(vocab)
    lp = random_rows(gen, 64, vocab)
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2.0 ** -53  # the ends of [0, 1)
    tokens, ok = draw(lp, u)
    assert ok.all()
    probs = lp.exp()
    misses = 0
    for i in range(64):
        token = int(tokens[i])
        assert probs[i, token] > 0, "an impossible token"
        off = distance_from(probs[i], float(u[i]), token)
        # float32 block sums (relative error ~1e-7) may move a draw to a neighbour of the boundary
        assert off < 1e-5, (i, float(u[i]), off)
        misses += off > 0
    assert misses <= 2


def test_draw_never_picks_an_impossible_token_and_follows_the_distribution():

    p = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.0, 0.25, 0.0])  # zeros at both ends and between
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 0.25, 0.75, 1.0 - 2.0 ** -53], dtype=torch.float64)  # exact boundaries
    tokens, ok = draw(p.log().expand(n, -1), u)
    assert ok.all()
    assert tokens[:4].tolist() == [1, 3, 5, 5]
    freq = torch.bincount(tokens, minlength=7).double() / n
    torch.testing.assert_close(freq, p.double(), atol=0.01, rtol=0)


def test_a_row_draws_the_same_token_alone_as_in_any_batch():

    gen = torch.Generator().manual_seed(11)
    lp = random_rows(gen, 48, 50_257)
    u = torch.rand(48, generator=gen, dtype=torch.float64)
    together, _ = draw(lp, u)
    alone = torch.cat([draw(lp[i:i + 1], u[i:i + 1])[0] for i in range(48)])
    assert torch.equal(together, alone)
    order = torch.randperm(48, generator=gen)
    assert torch.equal(draw(lp[order], u[order])[0], together[order])


def test_draw_flags_exactly_the_rows_without_finite_mass_and_overwrite_spares_a_copy():

    lp = torch.log_softmax(torch.randn(5, 300), -1)
    lp[1] = -math.inf
    lp[2, 7] = math.nan
    lp[3, 9] = math.inf
    u = torch.full((5,), 0.5, dtype=torch.float64)
    tokens, ok = draw(lp.clone(), u)
    assert ok.tolist() == [True, False, False, False, True]
    assert torch.equal(draw(lp[[0, 4]], u[:2])[0], tokens[[0, 4]])  # the others are unaffected
    mine = lp.clone()
    again, _ = draw(mine, u, overwrite=True)
    assert torch.equal(again[ok], tokens[ok])
    torch.testing.assert_close(mine[0], lp[0].exp(), rtol=1e-6, atol=0)  # exp'ed in place (numpy's, within 2 ulp)


def test_sample_takes_one_uniform_per_row_from_its_generator():
    from eftmesh.core.sampling import uniforms

    cfg = SamplingConfig()
    rows = process(torch.randn(3, 500), cfg)
    a = sample(rows, cfg, make_generator(5))
    g = make_generator(5)
    b, _ = draw(rows, uniforms(g, 3))
    assert torch.equal(a, b)
    assert torch.equal(g.get_state(), (lambda h: (uniforms(h, 3), h.get_state())[1])(make_generator(5)))


# --- top-k and top-p cuts ---------------------------------------------------------------------


def shaped_rows(gen: torch.Generator, rows: int, vocab: int, shape: str) -> torch.Tensor:
    """Logits shaped as models make them: `peaked` (a trained model: a few tokens hold most of
    the mass), `zipf` (a long tail), `flat` (near-uniform, a random model: nuclei of thousands)."""
    if shape == "flat":
        x = torch.randn(rows, vocab, generator=gen) * 0.3
    else:
        s = 1.1 if shape == "zipf" else 2.5
        ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
        x = torch.stack([(-s * ranks.log())[torch.randperm(vocab, generator=gen)] for _ in range(rows)])
        x += torch.randn(rows, vocab, generator=gen) * 0.5
    x[torch.rand(rows, vocab, generator=gen) < 0.05] = -math.inf  # impossible tokens
    return x


def reference_kept(z: torch.Tensor, k: int, p: float) -> tuple[set[int], float]:
    """One row's kept columns by a float64 sort (ties broken by column), and how close the mass
    before the cut lies to p (relative): a cut that close may fall either side in float32."""
    vals, order = torch.sort(z.double(), descending=True, stable=True)
    finite = int(torch.isfinite(vals).sum())
    vals, order = vals[:finite], order[:finite]
    if 0 < k < finite:  # (k at least the finite entries: all of them)
        kth = vals[k - 1]
        n = int((vals >= kth).sum())
        vals, order = vals[:n], order[:n]
    margin = math.inf
    if p < 1.0:
        probs = torch.softmax(vals, 0)
        before = probs.cumsum(0) - probs
        n = max(1, int((before < p).sum()))
        margin = float((before - p).abs().min())
        n = int((vals >= vals[n - 1]).sum())  # ties with the last kept
        vals, order = vals[:n], order[:n]
    return set(order.tolist()), margin


@pytest.mark.parametrize("shape", ["peaked", "zipf", "flat"])
@pytest.mark.parametrize("vocab", [5, 31, 33, 1000, 50_257])
def test_cut_keeps_what_a_float64_sort_keeps(shape, vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = shaped_rows(gen, 6, vocab, shape)
    for cfg in [SamplingConfig(1.0, top_p=0.9), SamplingConfig(0.7, top_p=0.95), SamplingConfig(1.0, top_p=0.5),
                SamplingConfig(1.3, top_k=1), SamplingConfig(0.8, top_k=50), SamplingConfig(1.0, top_k=40, top_p=0.9),
                SamplingConfig(1.0, top_k=vocab - 1), SamplingConfig(1.0, top_p=0.999)]:
        p = process(x, cfg)
        z = (x - x.amax(-1, keepdim=True)) / cfg.temperature
        for i in range(x.shape[0]):
            want, margin = reference_kept(z[i], cfg.top_k, cfg.top_p)
            got = set(torch.isfinite(p[i]).nonzero().flatten().tolist())
            assert got == want or margin < 1e-5, (cfg, i, len(got), len(want))
        torch.testing.assert_close(torch.logsumexp(p, -1), torch.zeros(x.shape[0]), atol=1e-5, rtol=0)


def test_both_paths_of_a_cut_are_taken_and_agree():
    """Peaked rows are cut among candidates, flat ones (nuclei of thousands) from their
    histogram; forcing every row through the histogram gives the same cuts."""
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([shaped_rows(gen, 3, 20_000, "peaked"), shaped_rows(gen, 3, 20_000, "flat")])
    z = x - x.amax(-1, keepdim=True)
    c = cut(z, 0, 0.9)
    assert sum(len(rows) for rows, _, _ in c.lists) == 3 and c.wide.tolist() == [3, 4, 5]
    wide = cuts._cut_wide(z, None, 0, 0.9)
    assert torch.equal(wide, c.tau)
    both = cut(z, 100, 0.9)
    assert torch.equal(both.tau, cuts._cut_wide(z, None, 100, 0.9))


def test_ties_at_a_cut_are_all_kept_and_a_row_draws_alike_in_any_batch():
    """bf16 rows tie often: the kept set holds every token equal to the last one kept, and a
    row's token does not depend on the rows beside it (candidates in column order)."""
    gen = torch.Generator().manual_seed(2)
    x = shaped_rows(gen, 24, 8_000, "peaked").bfloat16().float()
    x[0, :4] = x[0].amax() + 1  # a four-way tie at the top
    p = process(x, SamplingConfig(1.0, top_k=1))
    assert torch.isfinite(p[0]).sum() == 4
    for cfg in [SamplingConfig(1.0, top_p=0.9), SamplingConfig(0.8, top_k=20), SamplingConfig(1.0, top_p=0.99)]:
        u = torch.rand(24, generator=gen, dtype=torch.float64)
        together, ok = sample_rows(x, cfg, u)
        assert ok.all()
        alone = torch.cat([sample_rows(x[i:i + 1], cfg, u[i:i + 1])[0] for i in range(24)])
        assert torch.equal(together, alone)
        order = torch.randperm(24, generator=gen)
        assert torch.equal(sample_rows(x[order], cfg, u[order])[0], together[order])
        assert torch.isfinite(process(x, cfg).gather(1, together[:, None])).all()  # a kept token


def assert_shares(tokens: torch.Tensor, want: torch.Tensor, atol: float, groups: int = 10) -> None:
    """The drawn tokens' mass by groups of tokens of falling probability under `want` ([vocab]
    float64): each group's share within sampling noise (atol)."""
    vocab = want.shape[0]
    group = torch.empty(vocab, dtype=torch.int64)
    group[want.argsort(descending=True)] = torch.arange(vocab) * groups // vocab
    got = torch.bincount(group[tokens], minlength=groups).double() / tokens.shape[0]
    expected = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, want)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("shape,cfg", [("peaked", SamplingConfig(0.7, top_p=0.9)),
                                       ("zipf", SamplingConfig(1.0, top_k=30, top_p=0.95)),
                                       ("flat", SamplingConfig(1.0, top_p=0.8)),
                                       ("zipf", SamplingConfig(0.5))])
def test_sample_rows_follows_the_processed_distribution(shape, cfg):
    gen = torch.Generator().manual_seed(8)
    x = shaped_rows(gen, 1, 3_000, shape)
    n = 30_000
    tokens, ok = sample_rows(x.expand(n, -1), cfg, torch.rand(n, generator=gen, dtype=torch.float64))
    assert ok.all()
    want = process(x, cfg).exp()[0].double()  # [vocab]
    assert want[tokens].gt(0).all()
    assert_shares(tokens, want, atol=0.01)


def test_rows_without_finite_mass_are_flagged_on_every_path():
    x = shaped_rows(torch.Generator().manual_seed(1), 4, 2_000, "peaked")
    x[1] = -math.inf
    x[2, 5] = math.nan
    u = torch.full((4,), 0.3, dtype=torch.float64)

    def more(rows: torch.Tensor) -> torch.Tensor:
        return torch.full((len(rows),), 0.6, dtype=torch.float64)

    for cfg, again in [(SamplingConfig(1.0), None), (SamplingConfig(0.7, top_k=10), None),
                       (SamplingConfig(1.0, top_p=0.9), None), (SamplingConfig(1.0, top_p=0.9), more)]:
        tokens, ok = sample_rows(x, cfg, u, more=again)  # (the last: drawn without a cut)
        assert ok.tolist() == [True, False, False, True], cfg
        assert torch.equal(tokens[[0, 3]], sample_rows(x[[0, 3]], cfg, u[:2], more=again)[0])
        p = process(x, cfg)  # what verification checks (check_finite_mass): those rows are not finite
        assert (~torch.isfinite(p.amax(-1))).tolist() == [False, True, True, False], cfg
        torch.testing.assert_close(torch.logsumexp(p[[0, 3]], -1), torch.zeros(2), atol=1e-5, rtol=0)


def test_sample_and_sample_rows_each_take_one_uniform_per_row():
    cfg = SamplingConfig(0.9, top_p=0.9)
    x = shaped_rows(torch.Generator().manual_seed(4), 3, 500, "peaked")
    g, h = make_generator(3), make_generator(3)
    sample(process(x, cfg), cfg, g)
    sample_rows(x, cfg, uniforms(h, 3))
    assert torch.equal(g.get_state(), h.get_state())


def test_overwrite_gives_the_same_rows_and_tokens_without_a_copy():
    x = shaped_rows(torch.Generator().manual_seed(6), 5, 3_000, "zipf")
    u = torch.rand(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cfg in [SamplingConfig(0.7), SamplingConfig(0.8, top_p=0.9), SamplingConfig(1.0, top_k=20)]:
        mine = x.clone()
        out = process(mine, cfg, overwrite=True)
        assert torch.equal(out, process(x, cfg))
        assert (out.data_ptr() == mine.data_ptr()) == (cfg.top_p < 1 or cfg.top_k > 0)  # (log_softmax: a new one)
        assert torch.equal(sample_rows(x.clone(), cfg, u, overwrite=True)[0], sample_rows(x, cfg, u)[0])


# --- nuclei drawn without a cut (draw_nucleus) ------------------------------------------------


def row_uniforms(gens: list[torch.Generator]):
    """`sample_rows`' first uniforms and its `more`, each row from its own generator, as the
    combiner gives them; `taken` counts the uniforms each row took."""
    taken = [0] * len(gens)

    def more(rows: torch.Tensor) -> torch.Tensor:
        for i in rows.tolist():
            taken[i] += 1
        return torch.cat([uniforms(gens[i]) for i in rows.tolist()])

    return more(torch.arange(len(gens))), more, taken


@pytest.mark.parametrize("top_p", [0.8, 0.3])
def test_a_flat_nucleus_is_drawn_without_a_cut_as_the_processed_distribution(top_p):
    """Flat rows (a random model's: nuclei of thousands) are not cut when the caller can give
    more uniforms: a draw from the whole row is kept when it lies in the nucleus, so a row takes
    1 / top_p uniforms on average, and the tokens follow `process`'s distribution."""
    gen = torch.Generator().manual_seed(9)
    x = shaped_rows(gen, 1, 3_000, "flat")
    cfg = SamplingConfig(1.0, top_p=top_p)
    n = 20_000
    u, more, taken = row_uniforms([torch.Generator().manual_seed(i) for i in range(n)])
    tokens, ok = sample_rows(x.expand(n, -1), cfg, u, more=more)
    assert ok.all()
    want = process(x, cfg).exp()[0].double()  # [vocab]
    assert want[tokens].gt(0).all(), "a token outside the nucleus"
    # a try is kept with probability a, the nucleus' share of the row (a little over top_p); after
    # 1 + REDRAWS rejections a row takes one more uniform for its cut
    a = float(torch.softmax(x[0].double(), 0)[want > 0].sum())
    tries = sum((1 - a) ** i for i in range(cuts.REDRAWS + 1)) + (1 - a) ** (cuts.REDRAWS + 1)
    assert abs(sum(taken) / n - tries) < 0.05 * tries
    assert_shares(tokens, want, atol=0.012)


@pytest.mark.parametrize("shape", ["peaked", "zipf"])
def test_top_p_rows_are_drawn_without_a_cut_from_nucleus_min_p_on(shape):
    """Top-p alone at p >= NUCLEUS_MIN_P, with more uniforms to give: trained models' rows too
    are drawn from the whole row and kept when in the nucleus (no cut); the tokens follow
    `process`'s distribution. Below NUCLEUS_MIN_P, rows whose cut lies among candidates are cut
    and take one uniform each."""
    gen = torch.Generator().manual_seed(21)
    x = shaped_rows(gen, 1, 3_000, shape)
    n = 20_000
    for p in (sampling.NUCLEUS_MIN_P, 0.9):
        cfg = SamplingConfig(0.8, top_p=p)
        u, more, taken = row_uniforms([torch.Generator().manual_seed(i) for i in range(n)])
        tokens, ok = sample_rows(x.expand(n, -1), cfg, u, more=more)
        assert ok.all()
        want = process(x, cfg).exp()[0].double()
        assert want[tokens].gt(0).all(), "a token outside the nucleus"
        a = float(torch.softmax(x[0].double() / 0.8, 0)[want > 0].sum())  # a try's chance to be kept
        assert abs(sum(taken) / n - 1 / a) < 0.05 / a, "a row takes 1 / (the nucleus' share) tries"
        assert_shares(tokens, want, atol=0.012)
    below = SamplingConfig(0.8, top_p=sampling.NUCLEUS_MIN_P / 2)
    u, more, taken = row_uniforms([torch.Generator().manual_seed(i) for i in range(200)])
    tokens, ok = sample_rows(x.expand(200, -1), below, u, more=more)
    assert ok.all() and taken == [1] * 200 and process(x, below).exp()[0][tokens].gt(0).all()


def test_a_nucleus_rejected_too_often_is_cut_and_drawn_within(monkeypatch):
    """After REDRAWS rejections a row is cut from its histogram and drawn within the cut: with
    no redraws allowed, a small top-p sends most rows there, and they still draw only kept
    tokens, as `process` distributes them."""
    monkeypatch.setattr(cuts, "REDRAWS", 0)
    x = shaped_rows(torch.Generator().manual_seed(12), 1, 2_000, "flat")
    cfg = SamplingConfig(1.0, top_p=0.2)
    n = 6_000
    u, more, taken = row_uniforms([torch.Generator().manual_seed(i) for i in range(n)])
    tokens, ok = sample_rows(x.expand(n, -1), cfg, u, more=more)
    assert ok.all() and max(taken) == 2 and sum(taken) > 1.5 * n  # most rows took the fallback's uniform
    want = process(x, cfg).exp()[0].double()
    assert want[tokens].gt(0).all()
    inside = torch.zeros(2_000, dtype=torch.bool)
    inside[want.argsort(descending=True)[:int(want.gt(0).sum()) // 2]] = True  # the likelier half of the nucleus
    torch.testing.assert_close(inside[tokens].double().mean(), want[inside].sum(), atol=0.03, rtol=0)


def test_a_row_draws_from_its_nucleus_alike_in_any_batch():
    """Rows drawn without a cut take their redraws from their own generators: a row's token and
    the uniforms it takes do not depend on the rows beside it (flat rows redraw; peaked rows'
    nuclei hold nearly all their mass, and these take one uniform each)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([shaped_rows(gen, 6, 20_000, "flat"), shaped_rows(gen, 6, 20_000, "peaked")])
    cfg = SamplingConfig(0.9, top_p=0.5)
    seeds = list(range(100, 112))
    u, more, taken = row_uniforms([make_generator(s) for s in seeds])
    together, ok = sample_rows(x, cfg, u, more=more)
    assert ok.all() and taken[6:] == [1] * 6 and max(taken[:6]) > 1
    nucleus = process(x, cfg)
    assert torch.isfinite(nucleus.gather(1, together[:, None])).all()
    for i in range(12):
        u1, more1, taken1 = row_uniforms([make_generator(seeds[i])])
        assert int(sample_rows(x[i:i + 1], cfg, u1, more=more1)[0]) == int(together[i]) and taken1[0] == taken[i]


@pytest.mark.parametrize("vocab", [1003, 49_152, 50_257, 128_256])
def test_a_rows_probabilities_are_bitwise_those_it_gets_alone(vocab):
    """torch's exp2 takes a buffer's last few entries by a scalar path; draws.exp2 keeps every
    row's values what they are alone, wherever the row lies in a batch (one intra-op thread,
    the combiner's default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        z = -torch.rand(9, vocab, generator=torch.Generator().manual_seed(vocab)) * 60
        batch = draws.exp2(z)
        for i in range(9):
            assert torch.equal(batch[i:i + 1], draws.exp2(z[i:i + 1].clone()))
            assert torch.equal(batch[i:i + 2], draws.exp2(z[i:i + 2].clone()))
        assert torch.equal(draws.exp2(z.clone(), overwrite=True), batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", ["peaked", "flat"])
@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.7), SamplingConfig(0.8, top_p=0.9),
                                 SamplingConfig(1.0, top_p=0.3), SamplingConfig(0.9, top_k=20),
                                 SamplingConfig(1.0, top_k=50, top_p=0.8)])
def test_sample_with_probs_is_sample_rows_then_token_probs_bitwise(shape, cfg):
    """What a drafting logit service sends (each draft and its q(x)) from one scaling of the
    rows: the tokens sample_rows draws, and their probabilities bitwise what token_probs gives,
    or on the compiled kernels' rows (no top-k) bitwise what verification's exact test reads
    (`token_probs_at(exact=True)`) and within float rounding of token_probs; a row without mass
    is flagged alike."""
    import numpy as np

    from eftmesh.core import fusedrows
    from eftmesh.core.draws import LOG2E
    from eftmesh.core.sampling import _fusable, sample_with_probs, token_probs, token_probs_at

    gen = torch.Generator().manual_seed(3)
    x = shaped_rows(gen, 8, 20_000, shape)
    x[5] = -math.inf  # no finite mass

    def more_from(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda rows: torch.rand(len(rows), generator=g, dtype=torch.float64)

    u = torch.rand(8, generator=gen, dtype=torch.float64)
    tokens, ok = sample_rows(x.clone(), cfg, u, more=more_from(9))
    probs, _ = token_probs(x.clone(), tokens, cfg)
    t2, ok2, p2, made = sample_with_probs(x.clone(), cfg, u, overwrite=True, more=more_from(9))
    assert torch.equal(ok, ok2) and ok.tolist() == [True] * 5 + [False] + [True] * 2
    assert torch.equal(tokens[ok], t2[ok]) and (p2[ok] > 0).all()
    if _fusable(x, cfg, more_from(9)):
        exact = token_probs_at(x, torch.arange(8), t2, cfg, exact=True)[0]
        assert torch.equal(exact[ok], p2[ok])
        torch.testing.assert_close(p2[ok], probs[ok], rtol=1e-5, atol=0)
        # each row's cut, as `nucleus_cut` makes it (what a rejection's residual reuses)
        scratch, scale = fusedrows._Scratch(x.shape[1]), np.float32(LOG2E / cfg.temperature)
        for i in ok.nonzero().flatten().tolist() if made is not None else ():
            row = x[i].numpy()
            assert fusedrows.nucleus_cut(row, row.max(), scale, cfg.top_p, scratch) == (made[0][i], made[1][i])
        assert made is None if cfg.top_p >= 1 else (made[0][5] == -np.inf and made[1][5] == 0.0)
    else:
        assert torch.equal(probs[ok], p2[ok]) and made is None
