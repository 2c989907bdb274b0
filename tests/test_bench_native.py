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
