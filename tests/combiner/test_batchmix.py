"""The step mixer: role-by-role runs over the batch equal a per-generation mix."""

from dataclasses import dataclass, field

import pytest
import torch

from eftmesh.combiner import batchmix
from eftmesh.combiner.batchmix import joined, mix_step
from eftmesh.core.mixing import mix

V = 11


@dataclass(eq=False)
class FakeGeneration:
    """Stands in for a Generation: its coefficients and rows per role."""

    coef: dict = field(default_factory=dict)
    k: int = 0

    def rows_per_role(self) -> int:
        return self.k + 1


def test_adjacent_slices_of_one_tensor_join_as_a_view_and_others_are_copied():
    block = torch.randn(7, V)
    parts = [block[0:2], block[2:3], block[3:7]]
    view = joined(parts)
    assert view.data_ptr() == block.data_ptr() and torch.equal(view, block)
    gap = joined([block[0:2], block[3:5]])
    assert gap.data_ptr() != block.data_ptr() and torch.equal(gap, torch.cat([block[0:2], block[3:5]]))
    other = joined([block[0:2], torch.randn(1, V)])
    assert other.shape == (3, V)


def test_mix_step_equals_each_generation_mixed_alone():
    g = torch.Generator().manual_seed(0)
    up = {"big": 1.0, "ft": 1.0, "small": -1.0}
    gens = [FakeGeneration(up, 0), FakeGeneration(up, 3), FakeGeneration({"big": 1.0, "ft": 2.0, "small": -2.0}, 1),
            FakeGeneration({"small": 1.0}, 0), FakeGeneration(up, 2)]
    # one response block per role, sliced per generation in order, as upstream.py does
    blocks = {r: torch.randn(sum(x.rows_per_role() for x in gens), V + 2, generator=g) for r in up}
    rows, at = {}, 0
    for x in gens:
        m = x.rows_per_role()
        rows[x] = {r: blocks[r][at:at + m] for r in x.coef}
        at += m
    scores, offsets = mix_step(gens, rows, V)
    for x in gens:
        o, m = offsets[x], x.rows_per_role()
        alone = mix(rows[x], x.coef, V)
        torch.testing.assert_close(torch.log_softmax(scores[o:o + m], -1), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_two_roles_written_in_one_pass_give_the_same_sums_bitwise(dtype, monkeypatch):
    """Where the first role (it covers every row) has coefficient 1, the second role's runs
    inside its run are added in the same pass: the scores equal, bit for bit, the role-by-role
    sums (x * 1, then + c * y, then the rest); bf16 rows (summed in float32) and a first role
    with another coefficient take the two passes."""
    g = torch.Generator().manual_seed(1)
    up = {"big": 1.0, "ft": 1.0, "small": -1.0}
    gens = [FakeGeneration(up, 0), FakeGeneration(up, 2), FakeGeneration({"big": 1.0, "ft": 2.0, "small": -2.0}, 1),
            FakeGeneration({"big": 3.0, "ft": 1.0}, 0), FakeGeneration(up, 1)]
    n = sum(x.rows_per_role() for x in gens)
    blocks = {r: torch.randn(n, V + 2, generator=g).to(dtype) for r in up}
    rows, at = {}, 0
    for x in gens:
        m = x.rows_per_role()
        rows[x] = {r: blocks[r][at:at + m] for r in x.coef}
        at += m
    one_pass = []
    real = batchmix._init_fused
    monkeypatch.setattr(batchmix, "_init_fused", lambda *a: one_pass.append(real(*a)) or one_pass[-1])
    scores, offsets = mix_step(gens, rows, V)
    assert one_pass == [{(0, 4), (4, 6)} if dtype == torch.float32 else set()]  # ft's runs within big's first
    for x in gens:
        o, m = offsets[x], x.rows_per_role()
        want = torch.mul(rows[x]["big"][:, :V], x.coef["big"], out=torch.empty(m, V))
        for r in ("ft", "small"):
            if r in x.coef:
                want.add_(rows[x][r][:, :V], alpha=x.coef[r])
        assert torch.equal(scores[o:o + m], want)


@dataclass(eq=False)
class FakeSampler(FakeGeneration):
    """A generation that samples: its own seeded generator."""

    gen: torch.Generator = field(default_factory=torch.Generator)
    draft_rows: torch.Tensor | None = None


def test_draw_plain_draws_what_each_generation_would_sample_alone_and_process_groups_takes_the_blocks():
    from eftmesh.combiner.batchmix import draw_plain, process_groups
    from eftmesh.core.sampling import SamplingConfig, process, sample_rows, uniforms

    hot, cool = SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)
    gens = [FakeSampler(k=0, gen=torch.Generator().manual_seed(s)) for s in range(6)]
    gens[2].k = 2  # verifies a block: processed, not drawn
    gens[2].draft_rows = torch.randn(3, 310)  # the draft model's rows (a padded vocabulary)
    sampling = {g: hot if i % 2 else cool for i, g in enumerate(gens)}
    sampling[gens[4]] = SamplingConfig(temperature=0.0)  # greedy: neither
    offsets, n = {}, 0
    for g in gens:
        offsets[g], n = n, n + g.rows_per_role()
    scores = torch.randn(n, 300, generator=torch.Generator().manual_seed(9))
    scores[offsets[gens[5]], 7] = float("nan")  # a degenerate row fails alone
    expected = {}
    for s, g in enumerate(gens):
        if s in (0, 1, 3):
            token, ok = sample_rows(scores[offsets[g]:offsets[g] + 1], sampling[g], uniforms(torch.Generator().manual_seed(s)))
            assert ok.all()
            expected[g] = int(token[0])
    drawn = draw_plain(gens, sampling, offsets, scores)
    assert set(drawn) == {gens[0], gens[1], gens[3], gens[5]}
    assert {g: drawn[g] for g in expected} == expected and drawn[gens[5]] == -1
    processed = process_groups(gens, sampling, offsets, scores)
    o = offsets[gens[2]]
    p, q = processed[gens[2]]
    assert set(processed) == {gens[2]} and torch.equal(p, process(scores[o:o + 3], cool))
    assert torch.equal(q, process(gens[2].draft_rows[:2, :300], cool))
