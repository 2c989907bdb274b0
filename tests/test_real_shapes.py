"""The GPU benchmark's model family and engine benchmark, at a tiny scale on the CPU (the real
shapes run only where a GPU is: bench/gpu.sh)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from eftmesh_lab import bench_engine, real_shapes


def test_shipped_shapes_are_a_1b_llama_and_smollm2_135m_on_one_vocabulary():
    large = real_shapes.load_config("base-large.json")
    small = real_shapes.load_config("small.json")
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads, large.num_key_value_heads,
            large.intermediate_size) == (16, 2048, 32, 8, 8192)
    assert (small.num_hidden_layers, small.hidden_size, small.num_key_value_heads) == (30, 576, 3)
    assert large.vocab_size == small.vocab_size == real_shapes.VOCAB
    # a 1B model and a 135M one, counted on the meta device (nothing allocated)
    assert 1.0e9 < real_shapes.parameter_bytes(large, torch.float32) / 4 < 1.2e9  # 1.07B on a 49k vocabulary
    assert 1.3e8 < real_shapes.parameter_bytes(small, torch.float32) / 4 < 1.4e8  # SmolLM2-135M: 134.5M


@pytest.mark.slow
def test_a_tiny_family_builds_and_the_engine_benchmark_runs_on_it(tmp_path):
    paths = real_shapes.build(tmp_path / "fam", device="cpu", dtype="float32", scale=0.05)
    assert set(paths) == {"base-large", "base-small", "ft-small"}
    a = json.loads((paths["base-small"] / "config.json").read_text())
    b = json.loads((paths["ft-small"] / "config.json").read_text())
    assert a["num_hidden_layers"] == b["num_hidden_layers"]
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(paths["base-small"])
    ft = AutoModelForCausalLM.from_pretrained(paths["ft-small"])
    diff = [(p - q).abs().max().item() for p, q in zip(small.parameters(), ft.parameters())]
    assert 0 < max(diff) < 0.5  # perturbed, not another model
    out = tmp_path / "engine.json"
    bench_engine.main(["--model", str(paths["base-large"]), "--device", "cpu", "--dtype", "float32",
                       "--concurrency", "1,3", "--steps", "3", "--cuda-graphs", "static", "--out", str(out),
                       "--hbm-gbps", "100"])
    doc = json.loads(out.read_text())
    res = doc["results"][0]
    assert set(res["modes"]) == {"off", "static"}
    assert res["modes"]["static"]["execution"] == "static" and res["modes"]["off"]["execution"] == "eager"
    assert all(v > 0 for m in res["modes"].values() for v in m["decode_ms"].values())
    assert res["bandwidth_bound_ms"] == pytest.approx(res["weight_bytes"] / 100e9 * 1e3, rel=1e-3)


def test_the_profile_counts_only_what_runs_inside_a_step():
    """profile_counts' tally (per_step): a launch or sync inside a step's range counts; the
    synchronize torch.profiler makes when it stops, outside every step, does not (on the GPU it
    made a correct engine's one sync a step read as 1.4). The ranges are what record_function
    names: checked on a real CPU profile."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with record_function(bench_engine.STEP):
                torch.ones(3).sum()
    steps = [e for e in prof.events() if e.name == bench_engine.STEP]
    assert len(steps) == 2 and all(e.time_range.end >= e.time_range.start for e in steps)
    assert all(e.device_type == torch.autograd.DeviceType.CPU for e in steps)

    def ev(name: str, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    gpu_range = ev(bench_engine.STEP, 30, 45)  # the last step's range on the GPU's timeline: not a step's
    gpu_range.device_type = torch.autograd.DeviceType.CUDA
    events = [gpu_range, ev(bench_engine.STEP, 0, 10), ev("cudaGraphLaunch", 1, 2), ev("cudaMemcpyAsync", 3, 4),
              ev("cudaEventSynchronize", 5, 9), ev(bench_engine.STEP, 20, 30), ev("cudaGraphLaunch", 21, 22),
              ev("cudaEventSynchronize", 23, 29), ev("cudaDeviceSynchronize", 31, 40), ev("cudaLaunchKernel", 41, 42)]
    got = bench_engine.per_step(events, 2)
    assert got["host_syncs_per_step"] == 1.0 and got["launches_per_step"] == 1.5
    assert got["by_name"] == {"cudaGraphLaunch": 1.0, "cudaMemcpyAsync": 0.5, "cudaEventSynchronize": 1.0}
