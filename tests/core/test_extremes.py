"""Extreme but finite numbers in sampling and mixing: no NaN, no inf, no overflow."""

from __future__ import annotations

import math

import pytest
import torch

from eftmesh.core.mixing import MAX_WEIGHT, Composition, Delta, mix
from eftmesh.core.sampling import GREEDY_TEMPERATURE, NoFiniteMass, SamplingConfig, make_generator, process, sample


def rows(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.log_softmax(torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * 5, dim=-1)


@pytest.mark.parametrize("t", [1e-45, 1e-30, GREEDY_TEMPERATURE / 2, 0.0])
def test_tiny_temperature_is_greedy(t):
    cfg = SamplingConfig(temperature=t)
    assert cfg.greedy
    x = rows()
    assert torch.equal(sample(process(x, cfg), cfg, make_generator(1)), torch.argmax(x, dim=-1))


@pytest.mark.parametrize("t", [GREEDY_TEMPERATURE, 1e-3, 1e4, 1e38, 1e300])
@pytest.mark.parametrize("top_p", [1.0, 0.5, 1e-45])
def test_extreme_temperatures_give_a_distribution(t, top_p):
    cfg = SamplingConfig(temperature=t, top_p=top_p, top_k=7)
    x = rows()
    x[0, 3] = -math.inf  # a model's impossible token
    p = process(x, cfg)
    assert not torch.isnan(p).any()
    assert torch.allclose(torch.logsumexp(p, dim=-1), torch.zeros(3), atol=1e-4)
    assert p[0, 3] == -math.inf
    tok = sample(p, cfg, make_generator(2))
    assert tok.shape == (3,)


def test_a_row_without_finite_mass_is_an_error_not_a_crash():
    cfg = SamplingConfig(temperature=1.0)
    bad = torch.full((2, 10), -math.inf)
    with pytest.raises(NoFiniteMass):
        sample(bad, cfg, make_generator(0))
    nan = rows()
    nan[1, 4] = math.nan
    with pytest.raises(NoFiniteMass):
        sample(nan, cfg, make_generator(0))
    with pytest.raises(NoFiniteMass):
        sample(nan, SamplingConfig(temperature=0.0), None)


@pytest.mark.parametrize("w", [MAX_WEIGHT, -MAX_WEIGHT, 1e-308, -1e-308])
def test_mix_at_the_weight_bound_is_finite(w):
    comp = Composition("a", (Delta("b", "c", w), Delta("c", "b", w)))
    lp = {"a": rows(1), "b": rows(2), "c": rows(3)}
    lp["b"][0, 0] = -math.inf  # float16 underflow in one model
    out = mix(lp, comp.coefficients(), 50)
    assert torch.isfinite(out).all() or not torch.isnan(out).any()
    assert torch.allclose(torch.logsumexp(out, dim=-1), torch.zeros(3), atol=1e-4)


@pytest.mark.parametrize("w", [1e308, -1e308, MAX_WEIGHT * 1.01, math.inf, math.nan])
def test_weights_beyond_the_bound_are_refused(w):
    with pytest.raises(ValueError, match="weight"):
        Composition("a", (Delta("b", "c", w),))
