"""The step mixer: role-by-role runs over the batch equal a per-generation mix."""

from dataclasses import dataclass, field

import torch

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
