"""The step mixer: role-by-role runs over the batch equal a per-generation mix."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from eftmesh.combiner import batchmix
from eftmesh.combiner.batchmix import Workspace, joined, mix_step
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
        want = rows[x]["big"][:, :V].float() * x.coef["big"]  # (in float32, whatever the rows' dtype)
        for r in ("ft", "small"):
            if r in x.coef:
                want.add_(rows[x][r][:, :V], alpha=x.coef[r])
        assert torch.equal(scores[o:o + m], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_usual_step_is_mixed_in_one_pass_bitwise_as_role_by_role(monkeypatch, dtype):
    """Three roles, each one run over every row (one composition, base-large's coefficient 1)
    are mixed in one compiled pass (`fusedmix.mix3`), bitwise the two torch passes (one torch.add,
    then add_) over the rows in float32; bfloat16 rows (a GPU model's, as the wire brings them)
    are widened as they are read. Rows wider than the vocabulary (padding columns) are read
    where they lie. Any other step (a role's coefficient changes between runs, or too few
    entries to gain) takes the torch passes."""
    from eftmesh.core import fused, fusedmix

    calls = []
    real = fusedmix.mix3
    fused.warm()
    warmed = len(real.signatures)  # (float32 rows and bfloat16 rows)
    monkeypatch.setattr(fusedmix, "mix3", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(batchmix, "MIX3_MIN_ENTRIES", 0)  # (these rows are few: torch's passes otherwise)
    g = torch.Generator().manual_seed(4)
    up = {"big": 1.0, "ft": 1.5, "small": -1.5}
    gens = [FakeGeneration(up, k) for k in (0, 2, 1, 0)]
    n = sum(x.rows_per_role() for x in gens)
    blocks = {r: (torch.randn(n, V + 2, generator=g) * 4).to(dtype) for r in up}
    rows, at = {}, 0
    for x in gens:
        m = x.rows_per_role()
        rows[x] = {r: blocks[r][at:at + m] for r in up}
        at += m
    blocks["ft"][2, 3] = float("nan")  # (a NaN row: its maximum NaN, as numpy's)
    ws = Workspace()
    scores, _ = mix_step(gens, rows, V, ws)
    wide = {r: b.float() for r, b in blocks.items()}
    want = torch.add(wide["big"][:, :V], wide["ft"][:, :V], alpha=1.5).add_(wide["small"][:, :V], alpha=-1.5)
    assert calls == [1] and torch.equal(scores.nan_to_num(), want.nan_to_num())
    fine = torch.arange(n) != 2
    assert ws.maxima[2].isnan() and torch.equal(ws.maxima[fine], want[fine].amax(1))  # the rows' maxima, taken on the way
    assert len(real.signatures) == warmed == 2  # one of the two `fused.warm` compiles: no request compiles
    gens[2].coef = {"big": 1.0, "ft": 2.0, "small": -2.0}  # two runs of ft and small: torch's passes
    scores, _ = mix_step(gens, rows, V, ws)
    assert calls == [1] and ws.maxima is None
    mixed = torch.cat([torch.add(wide["big"][o:o + m, :V], wide["ft"][o:o + m, :V], alpha=c).add_(
        wide["small"][o:o + m, :V], alpha=-c) for o, m, c in ((0, 4, 1.5), (4, 2, 2.0), (6, 1, 1.5))])
    assert torch.equal(scores.nan_to_num(), mixed.nan_to_num())
    monkeypatch.setattr(batchmix, "MIX3_MIN_ENTRIES", n * V + 1)  # too few entries to gain: torch's passes
    gens[2].coef = up
    assert torch.equal(mix_step(gens, rows, V)[0].nan_to_num(), want.nan_to_num())
    assert calls == [1]


@dataclass(eq=False)
class FakeSampler(FakeGeneration):
    """A generation that samples: its own seeded generator."""

    gen: torch.Generator = field(default_factory=torch.Generator)
    draft_rows: torch.Tensor | None = None
    draft_probs: list[float] = field(default_factory=list)  # (the drafter's q(x); [] here: read from the rows)
    draft_cuts: list[tuple[float, float]] = field(default_factory=list)  # (its rows' cuts; [] here: cut at a rejection)
    drafts: list[int] = field(default_factory=list)
    keeps_scores: bool = True  # (log-probabilities asked for: its rows must survive the draw)


@pytest.mark.parametrize("cfg,fused", [(dict(temperature=0.8, top_p=0.9), True), (dict(temperature=0.8, top_k=50), False)])
def test_plain_rows_are_scaled_in_place_unless_read_later_with_the_same_tokens(cfg, fused):
    """draw_plain's two paths draw the same tokens: adjacent rows nobody reads afterwards
    scaled over the scores; rows a generation reads afterwards (log-probabilities), or rows
    apart, copied to the scratch buffer first, the scores left as they were. A fused draw (no
    top-k: `fusedrows.draw_fused`) only reads the rows, on every path."""
    from eftmesh.combiner.batchmix import draw_plain
    from eftmesh.core.sampling import SamplingConfig, _fusable

    cfg = SamplingConfig(**cfg)
    assert _fusable(torch.zeros(1, 5000), cfg, lambda r: r) == fused
    gens = [FakeSampler(k=0, gen=torch.Generator().manual_seed(s)) for s in range(6)]
    offsets = {g: i for i, g in enumerate(gens)}
    scores = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1)) * 3
    before = scores.clone()
    plain = draw_plain(gens, dict.fromkeys(gens, cfg), offsets, scores)
    for s, g in enumerate(gens):
        g.gen.manual_seed(s)
    ws = Workspace()
    assert draw_plain(gens, dict.fromkeys(gens, cfg), offsets, scores, ws) == plain
    assert torch.equal(scores, before)  # scaled into the scratch, not over the scores
    for s, g in enumerate(gens):  # the same rows apart (every other row): copied, then scaled
        g.gen.manual_seed(s)
    apart = torch.zeros(12, 5000)
    apart[::2] = scores
    assert draw_plain(gens, dict.fromkeys(gens, cfg), {g: 2 * i for i, g in enumerate(gens)}, apart, ws) == plain
    assert torch.equal(apart[::2], before)
    for s, g in enumerate(gens):  # nobody reads them afterwards: scaled over the scores
        g.gen.manual_seed(s)
        g.keeps_scores = s == 9
    assert draw_plain(gens, dict.fromkeys(gens, cfg), offsets, scores, ws) == plain
    assert torch.equal(scores, before) == fused  # (written over, unless fused)


def test_draw_plain_and_verify_groups_give_what_each_generation_would_take_alone():
    from eftmesh.combiner.batchmix import draw_plain, verify_groups
    from eftmesh.core.sampling import NoFiniteMass, SamplingConfig, process, sample_rows, uniforms
    from eftmesh.core.speculative import verify_sampled

    hot, cool = SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)
    gens = [FakeSampler(k=0, gen=torch.Generator().manual_seed(s)) for s in range(9)]
    for s in (2, 6, 7, 8):  # verify blocks: not drawn
        gens[s].k = 2 if s != 7 else 3
        gens[s].draft_rows = torch.randn(gens[s].k + 1, 310, generator=torch.Generator().manual_seed(s))  # a padded vocabulary
    sampling = {g: hot if i % 2 else cool for i, g in enumerate(gens)}
    sampling[gens[4]] = SamplingConfig(temperature=0.0)  # greedy: neither
    offsets, n = {}, 0
    for g in gens:
        offsets[g], n = n, n + g.rows_per_role()
    scores = torch.randn(n, 300, generator=torch.Generator().manual_seed(9))
    scores[offsets[gens[5]], 7] = float("nan")  # a degenerate row fails alone
    scores[offsets[gens[8]], 3] = float("nan")  # (its first row: always read)
    scores[offsets[gens[6]]:offsets[gens[6]] + 3] = gens[6].draft_rows[:, :300]
    scores[offsets[gens[7]]] = gens[7].draft_rows[0, :300]
    for g in (gens[2], gens[6], gens[7]):  # drafts drawn from q: some pass, some do not
        q = process(g.draft_rows[:g.k, :300], sampling[g]).exp()  # what drafts are drawn from
        g.drafts = [int(torch.multinomial(q[i], 1, generator=g.gen)) for i in range(g.k)]
        g.gen.manual_seed(100 + g.k)
    g8 = gens[8]
    g8.drafts = [0, 1]
    expected = {}
    for s, g in enumerate(gens):
        if s in (0, 1, 3):
            token, ok = sample_rows(scores[offsets[g]:offsets[g] + 1], sampling[g], uniforms(torch.Generator().manual_seed(s)))
            assert ok.all()
            expected[g] = int(token[0])
    drawn = draw_plain(gens, sampling, offsets, scores)
    assert set(drawn) == {gens[0], gens[1], gens[3], gens[5]}
    assert {g: drawn[g] for g in expected} == expected and drawn[gens[5]] == -1
    for s in (0, 1, 3, 5):
        gens[s].gen.manual_seed(s)
    before = scores.clone()
    assert draw_plain(gens, sampling, offsets, scores, Workspace()) == drawn  # rows copied to its scratch
    assert torch.equal(before.nan_to_num(), scores.nan_to_num())  # the scores stay
    verdicts = verify_groups(gens, sampling, offsets, scores)
    assert set(verdicts) == {gens[2], gens[6], gens[7], g8} and isinstance(verdicts[g8], NoFiniteMass)
    for g in (gens[2], gens[6], gens[7]):  # alone: the same generator state gives the same verdict
        o = offsets[g]
        alone = verify_sampled(torch.tensor(g.drafts), g.draft_rows[:g.k], scores[o:o + g.k + 1],
                               torch.Generator().manual_seed(100 + g.k), sampling[g])
        assert verdicts[g] == alone
    # p = q: every draft passes (the bonus token); p_0 = q_0 alone: the first passes
    assert [verdicts[g].accepted for g in (gens[2], gens[6], gens[7])] == [0, 2, 1]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_the_fused_mix_reads_rows_from_several_responses_in_place_with_the_same_sums(threads):
    """A step whose rows come from more than one response per role (generations drafting and
    not in one step, answers of two calls) is mixed in runs that read each response where it
    lies: bitwise the scores and maxima of the same rows in one tensor, and no copy; with
    several threads, their shares crossing the runs' bounds."""
    from eftmesh.core import fusedrows

    fusedrows.set_threads(threads)
    try:
        _mix_from_several_responses()
    finally:
        fusedrows.set_threads(1)


def _mix_from_several_responses():
    g = torch.Generator().manual_seed(2)
    vocab, n = 30_000, 12  # (n x vocab over MIX3_MIN_ENTRIES: the fused mix)
    whole = [torch.randn(n, vocab + 3, generator=g) for _ in range(3)]
    coefs = (1.0, 0.75, -0.75)
    want = torch.empty(n, vocab)
    want_max, want_top = batchmix._mix3(want, [[(0, n, c, [w])] for c, w in zip(coefs, whole)])
    # role 0: one response; role 1: two responses (rows 0-4, 5-11); role 2: three, the middle
    # one holding its rows with a gap and out of order within its storage
    split1 = [whole[1][:5].clone(), whole[1][5:].clone()]
    spread = torch.empty(20, vocab + 3)
    spread[10:14], spread[2:4] = whole[2][3:7], whole[2][7:9]
    split2 = [whole[2][:3].clone(), spread[10:14], spread[2:4], whole[2][9:].clone()]
    roles = [[(0, n, coefs[0], [whole[0][i:i + 1] for i in range(n)])], [(0, n, coefs[1], split1)],
             [(0, n, coefs[2], split2)]]
    segments = batchmix._segments([r[0][3] for r in roles], n, vocab)
    assert [(lo, hi) for lo, hi, _ in segments] == [(0, 3), (3, 5), (5, 9), (9, 12)]
    for _, _, rows in segments:  # every run reads its rows where they lie
        for (flat, _), parts in zip(rows, [r[0][3] for r in roles]):
            assert any(np.shares_memory(flat, p.numpy()) for p in parts)
    got = torch.empty(n, vocab)
    got_max, got_top = batchmix._mix3(got, roles)
    assert torch.equal(got, want) and torch.equal(got_max, want_max) and torch.equal(got_top, want_top)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 16, 53, 1_000])
def test_the_mix_takes_each_rows_argmax_on_the_way_as_numpy_does(monkeypatch, dtype, vocab):
    """`argmax_step` reads the argmax the step's mix took (`fusedmix.mix3`'s tops): numpy's, the
    first index of the maximum, for ties within one of the kernel's sixteen lanes, across lanes
    and in the tail past them (bfloat16 rows tie often), and for a row whose maximum is not
    finite (a NaN, a +inf, all -inf) numpy's too, with the same finiteness flags as
    `argmax_finite`'s pass over the rows; no pass of its own where the mix took them."""
    from eftmesh.combiner.batchmix import argmax_step
    from eftmesh.core import sampling
    from eftmesh.core.sampling import argmax_finite

    monkeypatch.setattr(batchmix, "MIX3_MIN_ENTRIES", 0)
    g = torch.Generator().manual_seed(vocab)
    n = 12
    up = {"big": 1.0, "ft": 1.0, "small": -1.0}
    # coarse values (multiples of 1/4 in a small range): many exact ties of the maximum
    blocks = {r: (torch.randint(-6, 7, (n, vocab + 3), generator=g) / 4).to(dtype) for r in up}
    for i in (1, 3, 7):
        blocks["ft"][i] = blocks["small"][i]  # (the mixed row is big's exactly)
    blocks["big"][1, :] = 2.0  # every entry ties: the first
    blocks["ft"][2, vocab - 1] = 50.0  # the maximum in the tail (or the last lane)
    blocks["big"][3, [min(5, vocab - 1), min(21, vocab - 1)]] = 40.0  # tied twice in one lane (5 and 21)
    blocks["big"][7, [min(9, vocab - 1), min(4, vocab - 1)]] = 40.0  # tied in two lanes
    blocks["small"][4, 3] = float("nan")
    blocks["big"][5, 0] = float("inf")
    blocks["big"][6, :] = -float("inf")  # (-inf - -inf: NaN, the whole row)
    gens = [FakeGeneration(up, 0) for _ in range(n)]
    rows = {x: {r: blocks[r][i:i + 1] for r in up} for i, x in enumerate(gens)}
    ws = Workspace()
    scores, _ = mix_step(gens, rows, vocab, ws)
    assert ws.tops is not None
    calls = []
    real = sampling.argmax_rows
    monkeypatch.setattr(batchmix, "argmax_rows", lambda x: calls.append(x.shape[0]) or real(x))
    top, finite = argmax_step(scores, ws)
    want_top, want_finite = argmax_finite(scores)
    assert torch.equal(top, want_top) and torch.equal(finite, want_finite)
    assert finite.sum() == n - 3 and calls == [3]  # (numpy's argmax over the three rows without a finite maximum only)
    ws.tops = None  # a step the kernel did not mix: one pass
    assert all(torch.equal(a, b) for a, b in zip(argmax_step(scores, ws), (want_top, want_finite)))
