"""The EFT formula on hand-built tensors."""

import math

import pytest
import torch

from eftmesh.core.mixing import Composition, Delta, mix

V = 6


def _lp(*rows: list[float]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(rows, dtype=torch.float32), dim=-1)


@pytest.fixture
def rows() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {r: torch.log_softmax(torch.randn(3, V, generator=g), -1) for r in ("big", "small", "ft")}


def test_zero_weight_gives_the_base_exactly(rows):
    comp = Composition("big", (Delta("ft", "small", 0.0),))
    out = mix(rows, comp.coefficients(), V)
    assert torch.equal(out, torch.log_softmax(rows["big"], -1))


def test_delta_of_a_model_with_itself_gives_the_base(rows):
    comp = Composition("big", (Delta("ft", "ft", 2.5),))
    out = mix(rows, comp.coefficients(), V)
    torch.testing.assert_close(out, rows["big"], atol=1e-6, rtol=0)


def test_upscaling_matches_the_formula(rows):
    comp = Composition("big", (Delta("ft", "small", 1.0),))
    out = mix(rows, comp.coefficients(), V)
    expected = torch.log_softmax(rows["big"] + rows["ft"] - rows["small"], -1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("w", [-1.0, 0.3, 1.0, 1.5, 2.0])
def test_every_result_is_normalised(rows, w):
    comp = Composition("small", (Delta("ft", "big", w), Delta("big", "small", 1 - w)))
    out = mix(rows, comp.coefficients(), V)
    torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(3), atol=1e-5, rtol=0)


def test_amplified_scale_delta_collects_like_terms():
    # ft-small + beta * (base-large - base-small): base and delta may be any roles.
    comp = Composition("ft", (Delta("big", "small", 1.5),))
    assert comp.coefficients() == {"ft": 1.0, "big": 1.5, "small": -1.5}
    assert comp.roles == ("ft", "big", "small")


def test_interpolation_of_two_deltas_sharing_a_reference():
    comp = Composition("big", (Delta("a", "small", 0.25), Delta("b", "small", 0.75)))
    assert comp.coefficients() == {"big": 1.0, "a": 0.25, "small": -1.0, "b": 0.75}


def test_padding_columns_are_dropped_before_normalising():
    base = _lp([1.0, 2.0, 3.0, 50.0])  # the last column is a padding row of the output layer
    out = mix({"b": base}, {"b": 1.0}, 3)
    assert out.shape == (1, 3)
    torch.testing.assert_close(out, _lp([1.0, 2.0, 3.0]), atol=1e-6, rtol=0)


def test_minus_infinity_inputs_do_not_make_nan():
    big = torch.tensor([[0.0, -math.inf, -1.0]])
    ft = torch.tensor([[-1.0, -math.inf, 0.0]])
    small = torch.tensor([[-0.5, -math.inf, -0.5]])
    out = mix({"big": big, "ft": ft, "small": small}, {"big": 1.0, "ft": 1.0, "small": -1.0}, 3)
    assert torch.isfinite(out[:, [0, 2]]).all()
    assert not torch.isnan(out).any()


def test_composition_rejects_bad_weights_and_roles():
    with pytest.raises(ValueError, match="finite"):
        Composition("big", (Delta("ft", "small", math.nan),))
    with pytest.raises(ValueError, match="finite"):
        Composition("big", (Delta("ft", "small", math.inf),))
    with pytest.raises(ValueError, match="base"):
        Composition("")
    with pytest.raises(ValueError, match="reference"):
        Composition("big", (Delta("ft", "", 1.0),))


def test_mismatched_rows_are_refused(rows):
    bad = dict(rows, small=rows["small"][:2])
    with pytest.raises(AssertionError, match="rows"):
        mix(bad, {"big": 1.0, "ft": 1.0, "small": -1.0}, V)


def test_accumulate_adds_ordinary_rows_as_they_came_and_floors_only_extreme_ones():
    from eftmesh.core.mixing import LOGPROB_FLOOR, accumulate

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=g) * 20  # an ordinary spread: no floor needed
    acc = torch.zeros(4, 7)
    accumulate(acc, x, -1.5)
    torch.testing.assert_close(acc, -1.5 * x[:, :7], atol=0, rtol=0)  # exact: added in place, no shift
    extreme = x.clone()
    extreme[1, 2] = -math.inf
    extreme[2, 0] = 2 * LOGPROB_FLOOR
    acc = torch.zeros(4, 7)
    accumulate(acc, extreme, -1.0)
    assert torch.isfinite(acc).all()  # -inf with a negative weight would be +inf unfloored
    shifted = (extreme[:, :7] - extreme[:, :7].amax(-1, keepdim=True)).clamp_min(LOGPROB_FLOOR)
    torch.testing.assert_close(acc, -shifted, atol=1e-5, rtol=0)


def test_accumulate_reads_bfloat16_rows_into_float32_without_changing_them():
    from eftmesh.core.mixing import accumulate

    x = torch.randn(3, 5).bfloat16()
    before = x.clone()
    acc = torch.ones(3, 5)
    accumulate(acc, x, 2.0)
    assert torch.equal(x, before)
    torch.testing.assert_close(acc, 1 + 2 * x.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulate_weighs_half_precision_rows_in_float32(dtype):
    """A first role's half-precision rows written with a weight (`init`, e.g. amplified's
    ft-small in a batch led by another composition) are weighed in float32, not rounded to the
    rows' 8 or 11 bits first (torch.mul computes in its inputs' dtype)."""
    from eftmesh.core.mixing import accumulate

    x = (torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 8).to(dtype)
    want = x.double() * 1.3 - 0.7 * x.double()
    acc = torch.empty(4, 300)
    accumulate(acc, x, 1.3, init=True)
    accumulate(acc, x, -0.7)
    torch.testing.assert_close(acc.double(), want, atol=1e-5, rtol=1e-6)
    accumulate(acc, x, 1.0, init=True)  # (weight 1: one pass, exact in any dtype)
    assert torch.equal(acc, x.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_converted_in_a_scratch_buffer_add_the_same_sums(dtype):
    """With a scratch buffer, half-precision rows are converted to float32 there before they are
    added (torch's float32 += bf16 add takes a slow mixed-dtype path): the same sums, bit for
    bit, as the mixed add; the rows themselves are not written."""
    from eftmesh.core.mixing import accumulate

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 310, generator=g) * 6).to(dtype)  # (a padded vocabulary: 300 used)
    before = x.clone()
    base = torch.randn(5, 300, generator=g)
    for w in (1.0, -1.0, 1.3, -0.37):
        mixed, converted = base.clone(), base.clone()
        accumulate(mixed, x, w)
        accumulate(converted, x, w, scratch=torch.full((8, 300), float("nan")))
        assert torch.equal(mixed, converted)
    assert torch.equal(x, before)


def test_mix_scores_normalised_equals_mix_batch_with_mixed_runs_and_weights(rows):
    from eftmesh.core.mixing import Term, mix_batch, mix_scores

    idx = torch.tensor([2, 0, 1])  # out of order, unequal weights: the general path
    terms = [
        Term(torch.arange(3), rows["big"], torch.ones(3)),
        Term(idx, rows["ft"], torch.tensor([0.5, 1.0, 2.0])),
        Term(idx, rows["small"], torch.tensor([-0.5, -1.0, -2.0])),
    ]
    expected = torch.stack([
        torch.log_softmax(rows["big"][i] + w * (rows["ft"][j] - rows["small"][j]), -1)
        for i, (j, w) in enumerate([(1, 1.0), (2, 2.0), (0, 0.5)])
    ])
    torch.testing.assert_close(mix_batch(terms, 3, V), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.log_softmax(mix_scores(terms, 3, V), -1), expected, atol=1e-5, rtol=0)
