"""The pure parts of `make bench-load`: percentiles, the Poisson schedule, the lockstep ceiling."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from eftmesh_lab import bench_load
from eftmesh_lab.bench_load import (
    FT,
    LARGE,
    SMALL,
    check,
    cycle,
    load_family,
    lockstep_generate,
    percentile,
    poisson_schedule,
    ratio,
)


def test_percentile_interpolates_between_ranks() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 25) == 2.0
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_poisson_schedule_is_seeded_ordered_and_has_the_rate() -> None:
    a = poisson_schedule(4000, rate=5.0, lengths=(16, 128), seed=1)
    assert a == poisson_schedule(4000, rate=5.0, lengths=(16, 128), seed=1)
    assert a != poisson_schedule(4000, rate=5.0, lengths=(16, 128), seed=2)
    assert a[0].at == 0.0
    assert all(x.at <= y.at for x, y in zip(a, a[1:], strict=False))
    gaps = [y.at - x.at for x, y in zip(a, a[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 5.0, rel=0.08)
    lengths = [x.max_new for x in a]
    assert min(lengths) == 16 and max(lengths) == 128
    assert statistics.mean(lengths) == pytest.approx(72, rel=0.05)


def test_cycle_ratio_and_check() -> None:
    assert cycle(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    med = {"mesh-plain": {1: 10.0, 16: 70.0}, "lockstep": {16: 100.0}}
    assert ratio(med, ("mesh-plain", 16), ("lockstep", 16)) == pytest.approx(0.7)
    assert ratio(med, ("mesh-plain", 1), ("lockstep", 1)) is None
    assert check(0.7, ">=", 0.7) is True and check(5.1, "<=", 5.0) is False and check(None, ">=", 1.0) is None


@torch.inference_mode()
def _one_at_a_time(family, prompt: str, max_new: int) -> list[int]:
    """Greedy EFT of one prompt, every step recomputed from scratch: no padding, no cache."""
    ids = family.tokenizer.encode(prompt)
    start = len(ids)
    for _ in range(max_new):
        x = torch.tensor([ids])
        lp = {r: torch.log_softmax(m(input_ids=x).logits[0, -1, :family.vocab].float(), -1) for r, m in family.models.items()}
        ids.append(int(torch.log_softmax(lp[LARGE] + (lp[FT] - lp[SMALL]), -1).argmax()))
    return ids[start:]


def test_lockstep_equals_one_sequence_at_a_time(tiny_family: dict[str, Path]) -> None:
    torch.manual_seed(0)
    family = load_family(tiny_family, "cpu", "float32")
    # Lengths differ, so the batch is left-padded; one prompt repeats.
    prompts = ["The quick brown fox", "In the beginning God created the heaven and the earth.", "Numbers 0 1 2", "The quick brown fox"]
    batched = lockstep_generate(family, prompts, 12)
    assert batched == [_one_at_a_time(family, p, 12) for p in prompts]
    assert lockstep_generate(family, prompts[1:2], 12) == batched[1:2]


def test_one_gguf_in_every_role_is_loaded_once_and_lockstep_is_its_greedy_generate(tmp_path: Path) -> None:
    """`bench-load --model X.gguf`: the roles share one loaded model, and EFT of a model with
    itself (base + 1.0 * (m - m)) is the model: the lockstep loop gives its own greedy output."""
    from eftmesh.common import loading
    from gguf_models import write_tiny_gguf

    if not loading.gguf_available():
        pytest.skip(f"needs gguf: {loading.GGUF_INSTALL_HINT}")
    gguf = write_tiny_gguf(tmp_path / "tiny-llama.F32.gguf")
    family = load_family({r: str(gguf) for r in (LARGE, SMALL, FT)}, "cpu", "float32")
    assert family.models[LARGE] is family.models[SMALL] is family.models[FT]
    prompt = "The quick brown fox"
    ids = torch.tensor([family.tokenizer.encode(prompt)])
    reference = family.models[LARGE].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                              min_new_tokens=10, do_sample=False, pad_token_id=family.pad_id)
    assert lockstep_generate(family, [prompt], 10) == [reference[0, ids.shape[1]:].tolist()]


def test_a_run_of_some_systems_without_poisson_reports_the_rest_as_not_measured() -> None:
    """bench/gpu.sh trims its real-shape run (--systems, --poisson-requests 0): ratios of the
    systems left out and the Poisson ratio are 'not measured', never passes or failures."""
    med = {"mesh-plain": {1: 100.0, 16: 700.0}, "lockstep": {1: 120.0, 16: 800.0}}
    ratios, targets = bench_load.derive(med, None, "cpu")
    assert ratios["mesh_plain1_over_lockstep1"] == pytest.approx(100 / 120)
    assert ratios["mesh_adaptive16_over_mesh_plain16"] is None and ratios["poisson_ttft_p99_over_single"] is None
    assert targets["mesh_adaptive16_over_mesh_plain16"]["pass"] is None
    assert targets["poisson_ttft_p99_over_single"]["pass"] is None
    out = {"concurrency": [1, 16], "tokens_per_s": {k: {str(n): v for n, v in row.items()} for k, row in med.items()},
           "ratios": ratios, "targets": targets, "poisson": None, "kv_cache": {}}
    table = bench_load.markdown(out)
    assert "poisson (mesh-plain)" not in table and "| mesh_adaptive16_over_mesh_plain16 | - | >= 1.0 | not measured |" in table
    with pytest.raises(SystemExit, match="--systems: unknown nope; choose from lockstep, hf-generate"):
        bench_load.main(["--systems", "nope"])


def test_sweep_counts_mesh_adaptives_steps_by_cap_over_its_repetitions_only() -> None:
    """The combiner's counter of steps by cap also counts the warm-up and the other systems'
    runs; the sweep keeps, per N, only what mesh-adaptive's measured repetitions added."""
    steps = {4: 0.0}

    def adaptive(prompts: Sequence[str], max_new: int) -> int:
        steps[4] += 3.0
        steps[0] = steps.get(0, 0.0) + 1.0
        return max_new * len(prompts)

    def plain(prompts: Sequence[str], max_new: int) -> int:
        steps[4] += 100.0  # as if another system's steps were counted too
        return max_new * len(prompts)

    chosen: dict[int, dict[int, float]] = {}
    runs = bench_load.sweep({"mesh-plain": plain, "mesh-adaptive": adaptive}, ["p"], [1, 2], 4, 2,
                            lambda: dict(steps), chosen)
    assert chosen == {1: {4: 6.0, 0: 2.0}, 2: {4: 6.0, 0: 2.0}}  # 2 repetitions each, warm-up left out
    assert len(runs["mesh-adaptive"][2]) == 2


class RecordingStub:
    """A fake Generator stub: keeps the requests, answers with as many tokens as asked."""

    def __init__(self) -> None:
        self.requests: list = []

    def Complete(self, req, timeout=None):  # noqa: N802 (the RPC's name)
        self.requests.append(req)
        return type("Answer", (), {"token_ids": [1] * req.max_new_tokens})()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampled_mesh_requests_carry_no_seed_and_greedy_ones_do(temperature: float) -> None:
    client = bench_load.MeshClient("127.0.0.1:1", temperature, top_p=0.9)  # a fake stub below: never dialled
    client.stub = RecordingStub()
    assert client.complete("p", 3, seed=7, speculation={}) == 3
    (req,) = client.stub.requests
    client.close()
    if temperature:
        assert not req.HasField("seed") and req.sampling.temperature == pytest.approx(0.8)
        assert req.sampling.top_p == pytest.approx(0.9)
    else:
        assert req.HasField("seed") and req.seed == 7 and req.sampling.temperature == 0.0


def test_a_sampled_run_refuses_the_greedy_reference_loops() -> None:
    with pytest.raises(SystemExit, match="lockstep decode greedily"):
        bench_load.main(["--temperature", "0.7", "--systems", "lockstep,mesh-plain", "--out", "", "--plot", ""])


def test_each_stream_sends_its_prompt_requests_per_stream_times_with_its_own_seeds() -> None:
    client = bench_load.MeshClient("127.0.0.1:1")  # a fake stub below: never dialled
    client.stub = RecordingStub()
    assert client.round(["a", "b", "c"], 4, speculation={}, per_stream=2) == 3 * 2 * 4
    reqs = client.stub.requests
    client.close()
    assert sorted(r.prompt for r in reqs) == ["a", "a", "b", "b", "c", "c"]
    assert sorted(r.seed for r in reqs) == list(range(6))  # stream i's j-th request: seed i + 3 j


def test_requests_per_stream_below_one_is_refused() -> None:
    with pytest.raises(SystemExit, match="--requests-per-stream must be >= 1"):
        bench_load.main(["--requests-per-stream", "0", "--out", "", "--plot", ""])
