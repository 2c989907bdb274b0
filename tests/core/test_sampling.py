"""Temperature, top-k, top-p and seeded sampling on hand-built tensors."""

import math

import pytest
import torch

from eftmesh.core.sampling import SamplingConfig, make_generator, process, processed_probs, sample

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


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.6), SamplingConfig(1.3, top_k=40),
                                 SamplingConfig(0.7, top_p=0.9), SamplingConfig(1.0, top_k=100, top_p=0.8)])
def test_processed_probs_are_the_float64_processed_distribution(cfg):
    """The sampler works in log2 units (exp2, draws.py): its probabilities equal a float64
    softmax of x / temperature over the kept entries, and process() gives the same in nats."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3000, generator=gen) * 4
    got = processed_probs(x, cfg)
    z = x.double() / cfg.temperature
    keep = torch.isfinite(process(x, cfg))  # (which entries a cut keeps: test_draws checks that)
    want = torch.softmax(z.masked_fill(~keep, -math.inf), -1)
    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=2e-6)
    torch.testing.assert_close(process(x, cfg).exp().double(), want, atol=1e-7, rtol=2e-6)
    assert torch.equal(got > 0, keep)


def test_huge_temperatures_scale_without_nan():
    """Past 1e30 the log2 scale (log2(e) / temperature) would be a float32 subnormal, which a
    flush-to-zero mode reads as 0 (and -inf * 0 is NaN): it divides, then scales."""
    x = torch.tensor([[0.0, -1.0, -math.inf, -5.0]])
    for t in (1e29, 1e31, 3e38, math.inf):
        z = processed_probs(x, SamplingConfig(min(t, 1e300)))
        assert not torch.isnan(z).any()
        torch.testing.assert_close(z, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))


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


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=5),
    SamplingConfig(temperature=1.3, top_p=0.9), SamplingConfig(temperature=0.6, top_k=300, top_p=0.8),
])
def test_token_probs_are_the_processed_distribution_at_each_token(cfg):
    from eftmesh.core.sampling import token_probs

    gen = torch.Generator().manual_seed(3)
    # peaked rows (cut among candidates), flat ones (cut from the whole row), a bf16-valued one
    # (ties), and rows without finite mass: -inf everywhere, a NaN, +inf
    rows = torch.cat((torch.randn(4, 5000, generator=gen) * 6, torch.randn(3, 5000, generator=gen) * 0.2,
                      (torch.randn(1, 5000, generator=gen) * 2).bfloat16().float(), torch.full((3, 5000), -math.inf)))
    rows[-2:, :100] = 0.0  # finite entries beside the NaN and the +inf
    rows[-2, 700], rows[-1, 900] = float("nan"), math.inf
    want = process(rows, cfg).exp()  # [rows, vocab]
    drawn = torch.cat((torch.multinomial(want[:8], 1, generator=gen).view(-1), torch.zeros(3, dtype=torch.int64)))
    for tokens in (want.argmax(-1), torch.randint(0, 5000, (11,), generator=gen), drawn):
        before = rows.clone()
        probs, ok = token_probs(rows, tokens, cfg)
        torch.testing.assert_close(rows, before, rtol=0, atol=0, equal_nan=True)  # not written
        assert ok.tolist() == [True] * 8 + [False] * 3
        expected = want[torch.arange(8), tokens[:8]].double()
        torch.testing.assert_close(probs[:8], expected, rtol=1e-5, atol=1e-12)
        assert torch.equal(probs[:8] == 0, expected == 0)  # filtered out exactly where process drops it
        probs_over, _ = token_probs(rows.clone(), tokens, cfg, overwrite=True)
        assert torch.equal(probs_over[:8], probs[:8])
