"""bench/gpu.sh rehearsed without a GPU: every command it runs is checked, not run
(tests/gpu_sh_stand_in.py says how), so that a flag or path the script gets wrong is found here
rather than on a lent GPU machine's 15 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eftmesh_lab import bench_load

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~10 Python starts, each importing torch


def _rehearse(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    log = tmp_path / "log.jsonl"
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "gpu_sh_stand_in.py"}" "$@"\n')
    py.chmod(0o755)
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PY": str(py), "RESULTS_DIR": str(tmp_path / "out"), "GPU_SH_LOG": str(log), "REAL": "1",
             "PROFILE": "1", **env})
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return run, lines


def test_every_command_of_the_gpu_run_parses_its_arguments(tmp_path):
    run, log = _rehearse(tmp_path, "--reps", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    started = [e for e in log if e.get("start")]
    passed = [e for e in log if e.get("ok")]
    failed = [e for e in started if not any(p["target"] == e["target"] for p in passed)]
    assert len(passed) == len(started) and not failed, (failed, run.stdout[-3000:], run.stderr[-3000:])
    targets = [e["target"] for e in started]
    assert targets == ["-c", "pytest", "eftmesh_lab.real_shapes", "eftmesh_lab.bench_engine", "eftmesh_lab.bench_load",
                       "eftmesh_lab.bench_load", "eftmesh_lab.gpu_targets", "bench/gpu_profile.py", "pytest",
                       "eftmesh_lab.bench_engine"]
    assert all(e["collected"] > 0 for e in passed if e["target"] == "pytest")
    parsed = [e["parsed"] for e in passed if "parsed" in e]
    shapes = parsed[0]["out"]
    engine, loads = parsed[1], parsed[2:4]
    assert engine["model"] == ["models/demo/base-large", f"{shapes}/base-large"]  # what real_shapes built
    assert loads[1]["models"] == shapes
    for a in loads:  # the script's extra arguments reach both runs; every system named exists
        assert a["reps"] == 1 and a["device"] == "cuda" and a["dtype"] == "bfloat16"
        assert set(a["systems"].split(",")) <= set(bench_load.SYSTEMS)
        assert Path(a["out"]).parent == tmp_path / "out"
    assert parsed[-1]["torch_compile"] == "only"
    # the table of targets was written, every figure 'not measured' (nothing ran)
    doc = json.loads((tmp_path / "out" / "gpu-targets.json").read_text())
    assert doc["targets"] and all(t["pass"] is None for t in doc["targets"])


def test_the_rehearsal_fails_on_a_flag_the_benchmark_does_not_take(tmp_path):
    """The check can fail: an unknown flag (passed through to both concurrency benchmarks) stops
    their parsers, and the log shows those two commands never passed."""
    run, log = _rehearse(tmp_path, "--no-such-flag")
    assert run.returncode == 0  # gpu.sh itself goes on past a failed step (`|| true`)
    started = [e["target"] for e in log if e.get("start")]
    passed = [e["target"] for e in log if e.get("ok")]
    assert started.count("eftmesh_lab.bench_load") == 2 and "eftmesh_lab.bench_load" not in passed
    assert "no-such-flag" in run.stderr


def test_the_one_step_profile_runs_whole_on_the_cpu(tmp_path):
    """bench/gpu_profile.py, gpu.sh's step 6, end to end on the CPU at a few steps (its code paths
    are the GPU's but for the device events); every section is in the report."""
    out = tmp_path / "profile.txt"
    run = subprocess.run(
        [sys.executable, "bench/gpu_profile.py", "--device", "cpu", "--steps", "2", "--profile-steps", "1",
         "--batch", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'services'}:{ROOT / 'tools' / 'lab'}"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = out.read_text()
    for row in ("engine score_batch N=1", "engine score_batch N=2", "hf-plain N=1 (base-large)",
                "lockstep 3 models N=2", "aten ops/step (all, nested included)"):
        assert row in report, row


def test_a_failed_real_shape_build_leaves_the_demo_family_s_runs(tmp_path):
    """real_shapes failing (its command exits 1): the engine benchmark runs the demo model alone
    (a missing checkpoint would fail the whole benchmark, demo figures included), and the
    real-shape concurrency run is skipped."""
    run, log = _rehearse(tmp_path, "--reps", "1", GPU_SH_FAIL="eftmesh_lab.real_shapes")
    assert run.returncode == 0, run.stderr[-3000:]
    started = [e["target"] for e in log if e.get("start")]
    parsed = [e["parsed"] for e in log if "parsed" in e]
    engines = [a for a in parsed if "torch_compile" in a]
    assert engines and all(a["model"] == ["models/demo/base-large"] for a in engines)
    assert started.count("eftmesh_lab.bench_load") == 1 and "real-shape runs are skipped" in run.stdout
