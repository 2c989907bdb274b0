"""Temperature, top-k, top-p and seeded sampling on hand-built tensors."""

import math

import pytest
import torch

from eftmesh.core.sampling import SamplingConfig, make_generator, process, sample

PROBS = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]])
LP = PROBS.log()


def kept(out: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist())


def test_no_filter_keeps_the_distribution():
    out = process(LP, SamplingConfig(temperature=1.0))
    torch.testing.assert_close(out.exp(), PROBS, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k,expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (5, {0, 1, 2, 3, 4})])
def test_top_k_keeps_exactly_the_k_most_likely(k, expected):
    out = process(LP, SamplingConfig(top_k=k))
    assert kept(out) == expected
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "p,expected",
    [
        (0.40, {1}),  # the first token alone reaches 0.40
        (0.41, {1, 3}),
        (0.69, {1, 3}),
        (0.71, {1, 3, 4}),
        (0.94, {1, 2, 3, 4}),
        (0.96, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    out = process(LP, SamplingConfig(top_p=p))
    assert kept(out) == expected
    renorm = PROBS[0, sorted(expected)] / PROBS[0, sorted(expected)].sum()
    torch.testing.assert_close(out.exp()[0, sorted(expected)], renorm, atol=1e-5, rtol=0)


def test_top_k_then_top_p():
    out = process(LP, SamplingConfig(top_k=3, top_p=0.8))
    # after top-k: {1: .40, 3: .30, 4: .15} renormalised to .47/.35/.18; 0.47+0.35 >= 0.8
    assert kept(out) == {1, 3}


def test_temperature_sharpens_and_flattens():
    hot = process(LP, SamplingConfig(temperature=2.0)).exp()
    cold = process(LP, SamplingConfig(temperature=0.5)).exp()
    torch.testing.assert_close(hot, torch.softmax(LP / 2.0, -1), atol=1e-6, rtol=0)
    assert cold[0, 1] > PROBS[0, 1] > hot[0, 1]


def test_greedy_takes_the_argmax():
    cfg = SamplingConfig(temperature=0.0)
    assert sample(process(LP, cfg), cfg, None).tolist() == [1]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    cfg = SamplingConfig()
    rows = process(LP.expand(20000, -1), cfg)
    a = sample(rows, cfg, make_generator(7))
    b = sample(rows, cfg, make_generator(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=5).float() / a.numel()
    torch.testing.assert_close(freq, PROBS[0], atol=0.015, rtol=0)


def test_filtered_tokens_are_never_sampled():
    cfg = SamplingConfig(top_k=2)
    rows = process(LP.expand(5000, -1), cfg)
    assert set(sample(rows, cfg, make_generator(1)).tolist()) <= {1, 3}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_configurations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_argmax_rows_equals_torch_argmax_with_ties_nan_and_infinities():
    from eftmesh.core.sampling import argmax_rows

    x = torch.tensor([
        [0.0, 3.0, 3.0, 1.0],  # a tie: the first maximum
        [0.0, float("nan"), 5.0, float("nan")],  # NaN counts as the maximum, first one
        [-math.inf, -math.inf, -math.inf, -math.inf],
        [1.0, math.inf, 2.0, 0.0],
    ])
    assert torch.equal(argmax_rows(x), torch.argmax(x, -1))
    assert torch.equal(argmax_rows(x[:, 1:]), torch.argmax(x[:, 1:], -1))  # a strided view
    y = torch.randn(16, 50_000)
    assert torch.equal(argmax_rows(y), torch.argmax(y, -1))
    assert torch.equal(argmax_rows(y.bfloat16()), torch.argmax(y.bfloat16(), -1))


def test_check_argmax_finite_refuses_exactly_the_rows_without_finite_mass():
    from eftmesh.core.sampling import NoFiniteMass, argmax_rows, check_argmax_finite

    good = torch.tensor([[0.0, -math.inf, 1.0], [-5.0, -6.0, -7.0]])
    check_argmax_finite(good, argmax_rows(good))
    for bad in ([[0.0, float("nan"), 1.0]], [[-math.inf, -math.inf, -math.inf]], [[0.0, math.inf, 1.0]]):
        t = torch.tensor(bad)
        with pytest.raises(NoFiniteMass):
            check_argmax_finite(t, argmax_rows(t))


# --- draw: the batched inverse-CDF sampler ---------------------------------------------------------


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
    from eftmesh.core.sampling import draw

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
    from eftmesh.core.sampling import draw

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
    from eftmesh.core.sampling import draw

    gen = torch.Generator().manual_seed(11)
    lp = random_rows(gen, 48, 50_257)
    u = torch.rand(48, generator=gen, dtype=torch.float64)
    together, _ = draw(lp, u)
    alone = torch.cat([draw(lp[i:i + 1], u[i:i + 1])[0] for i in range(48)])
    assert torch.equal(together, alone)
    order = torch.randperm(48, generator=gen)
    assert torch.equal(draw(lp[order], u[order])[0], together[order])


def test_draw_flags_exactly_the_rows_without_finite_mass_and_overwrite_spares_a_copy():
    from eftmesh.core.sampling import draw

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
    assert torch.equal(again[ok], tokens[ok]) and torch.equal(mine[0], lp[0].exp())


def test_sample_takes_one_uniform_per_row_from_its_generator():
    from eftmesh.core.sampling import draw, uniforms

    cfg = SamplingConfig()
    rows = process(torch.randn(3, 500), cfg)
    a = sample(rows, cfg, make_generator(5))
    g = make_generator(5)
    b, _ = draw(rows, uniforms(g, 3))
    assert torch.equal(a, b)
    assert torch.equal(g.get_state(), (lambda h: (uniforms(h, 3), h.get_state())[1])(make_generator(5)))
