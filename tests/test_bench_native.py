"""make bench-native's step-alone part (eftmesh_lab.bench_native.step_times) on the tiny family:
both implementations time their decode steps over the same weights and agree bit for bit. The
mesh part starts two meshes for minutes and is not run here."""

from __future__ import annotations

from eftmesh_lab.bench_native import step_times


def test_step_times_time_both_implementations_and_find_their_logits_equal(tiny_family):
    r = step_times(tiny_family["base-large"], rows=3, context=12, steps=2, rounds=3)
    assert r["bitwise_equal"] is True
    assert set(r["ms"]) == {"transformers", "native"} and all(ms > 0 for ms in r["ms"].values())
    assert [len(v) for v in r["rounds_ms"].values()] == [3, 3]
    assert r["speedup"] == r["ms"]["transformers"] / r["ms"]["native"]


def test_mesh_tables_take_medians_and_ratios_over_lockstep_and_between_the_meshes():
    from eftmesh_lab.bench_compile import mesh_tables

    runs = {"lockstep": {1: [10.0, 30.0, 20.0]}, "a": {1: [5.0, 15.0, 10.0]}, "b": {1: [20.0, 40.0, 30.0]}}
    t = mesh_tables(runs, ("lockstep", "a", "b"), "b / a")
    assert t["tokens_per_s"] == {"lockstep": {"1": 20.0}, "a": {"1": 10.0}, "b": {"1": 30.0}}
    assert t["ratios"] == {"a / lockstep": {"1": 0.5}, "b / lockstep": {"1": 1.5}, "b / a": {"1": 3.0}}
    assert t["runs"]["b"] == {"1": [20.0, 40.0, 30.0]}
