"""`make bench-hop`: the per-role breakdown from the services' own metrics, its arithmetic on a
page of known figures, and one real run over a tiny mesh."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import free_port_block

from eftmesh_lab import bench_hop


def page(client: dict[str, tuple[float, int]], service: dict[str, tuple[float, int]], steps: int,
         failed: int = 0) -> str:
    """A /metrics page as the combiner's and the logit services' Prometheus exporters write it
    (the names and labels of a real scrape), ScoreBatch calls only."""
    lines = ["# TYPE eftmesh_upstream_duration_seconds histogram"]
    for role, (s, n) in client.items():
        labels = f'eftmesh_role="{role}",otel_scope_name="eftmesh.combiner",rpc_grpc_status_code="OK",rpc_method="ScoreBatch"'
        lines += [f'eftmesh_upstream_duration_seconds_bucket{{{labels},le="+Inf"}} {n}',
                  f"eftmesh_upstream_duration_seconds_count{{{labels}}} {n}",
                  f"eftmesh_upstream_duration_seconds_sum{{{labels}}} {s}"]
    if failed:  # a failed call's time is not a hop
        labels = 'eftmesh_role="base-large",rpc_grpc_status_code="UNAVAILABLE",rpc_method="ScoreBatch"'
        lines += [f"eftmesh_upstream_duration_seconds_count{{{labels}}} {failed}",
                  f"eftmesh_upstream_duration_seconds_sum{{{labels}}} {5.0 * failed}"]
    lines += ["# TYPE eftmesh_batch_size histogram", f'eftmesh_batch_size_count{{otel_scope_name="eftmesh.combiner"}} {steps}',
              f'eftmesh_batch_size_sum{{otel_scope_name="eftmesh.combiner"}} {steps}']
    lines += ["# TYPE eftmesh_logit_duration_seconds histogram"]
    for role, (s, n) in service.items():
        labels = f'eftmesh_role="{role}",otel_scope_name="eftmesh.logit",rpc_grpc_status_code="OK",rpc_method="ScoreBatch"'
        lines += [f"eftmesh_logit_duration_seconds_count{{{labels}}} {n}", f"eftmesh_logit_duration_seconds_sum{{{labels}}} {s}"]
    lines += ["# TYPE eftmesh_logit_queue_duration_seconds histogram"]
    for role, (_, n) in service.items():
        labels = f'eftmesh_role="{role}",rpc_method="ScoreBatch"'
        lines += [f"eftmesh_logit_queue_duration_seconds_count{{{labels}}} {n}",
                  f"eftmesh_logit_queue_duration_seconds_sum{{{labels}}} {0.0001 * n}"]
    return "\n".join(lines) + "\n"


def test_the_breakdown_of_a_round_from_two_scrapes() -> None:
    before = bench_hop.parse(page({"base-large": (1.0, 10), "base-small": (0.5, 10)},
                                  {"base-large": (0.8, 10), "base-small": (0.2, 10)}, steps=10))
    # 20 plain steps in 0.4 s: base-large's calls took 15 ms each (12.5 in its service), base-small's 6 (2)
    after = bench_hop.parse(page({"base-large": (1.3, 30), "base-small": (0.62, 30)},
                                 {"base-large": (1.05, 30), "base-small": (0.24, 30)}, steps=30, failed=3))
    r = bench_hop.breakdown(bench_hop.delta(before, after), wall_s=0.4, tokens=20, plain=True)
    assert r["steps"] == 20 and r["tokens_per_s"] == pytest.approx(50.0) and r["step_ms"] == pytest.approx(20.0)
    large = r["calls"]["base-large ScoreBatch"]
    assert large["calls"] == 20  # the 3 failed calls are not counted
    assert large["client_ms"] == pytest.approx(15.0) and large["service_ms"] == pytest.approx(12.5)
    assert large["hop_ms"] == pytest.approx(2.5) and large["queue_ms"] == pytest.approx(0.1)
    assert r["calls"]["base-small ScoreBatch"]["hop_ms"] == pytest.approx(6.0 - 2.0)
    assert r["outside_ms"] == pytest.approx(20.0 - 15.0)  # the step waits for its slowest role
    assert bench_hop.breakdown(bench_hop.delta(before, after), 0.4, 20, plain=False)["outside_ms"] is None

    twice = bench_hop.medians([r, {**r, "tokens_per_s": 70.0, "calls": {}}, {**r, "tokens_per_s": 60.0}])
    assert twice["tokens_per_s"] == 60.0 and twice["calls"]["base-large ScoreBatch"]["hop_ms"] == pytest.approx(2.5)
    table = bench_hop.markdown({"1": twice})
    assert "| 1 | 60.0 | 20.00 | 5.00 | base-large ScoreBatch | 20 | 15.00 | 12.50 | 0.10 | 2.50 |" in table
    assert "| | | | | base-small ScoreBatch | 20 | 6.00 | 2.00 | 0.10 | 4.00 |" in table


def test_stream_figures_summarise_what_the_readers_saw() -> None:
    chunks = [(0.010, [0.002, 0.004], 3), (0.030, [0.006] * 5 + [0.100], 7)]
    f = bench_hop.stream_figures(chunks, tokens=20)
    assert f["ttft_ms"] == pytest.approx(20.0) and f["tokens_per_chunk"] == 2.0
    assert f["chunk_gap_ms_p50"] == pytest.approx(6.0) and f["chunk_gap_ms_max"] == pytest.approx(100.0)
    assert f["chunk_gap_ms_p99"] == pytest.approx(100.0)  # (8 gaps: the 99th percentile is the largest)
    assert bench_hop.stream_figures([], 0)["ttft_ms"] is None


def test_cpu_per_step_reads_each_process_and_divides_by_the_steps() -> None:
    before = bench_hop.cpu_seconds({"self-again": os.getpid(), "gone": 2 ** 22 + 7})  # (no such pid: skipped)
    assert set(before) == {"client", "self-again"}
    t = time.process_time()
    while time.process_time() - t < 0.2:  # burn 0.2 s of this process's CPU
        pass
    after = bench_hop.cpu_seconds({"self-again": os.getpid()})
    per = bench_hop.cpu_per_step(before, after, steps=10)
    assert set(per) == {"client", "self-again"}
    assert 15.0 <= per["client"] <= 40.0  # 0.2 s over 10 steps, in clock ticks; a slow machine adds a little
    r = {"tokens_per_s": 1.0, "steps": 10, "step_ms": 1.0, "outside_ms": None, "calls": {}, "cpu_ms_per_step": per}
    m = bench_hop.medians([r, {**r, "cpu_ms_per_step": {"client": 0.0}}, r])
    assert m["cpu_ms_per_step"]["client"] == per["client"] and m["cpu_ms_per_step"]["self-again"] == per["self-again"]
    assert f"N = 16: client {per['client']:.2f}" in bench_hop.markdown({"16": m})


@pytest.mark.slow
def test_spread_varies_the_new_tokens_around_max_new_with_the_same_total() -> None:
    assert bench_hop.spread(16, 128, 0.0) == [128] * 16 and bench_hop.spread(1, 128, 1.0) == [128]
    news = bench_hop.spread(16, 128, 1.0)
    assert news[0] == 64 and news[-1] == 192 and news == sorted(news) and len(set(news)) == 16
    assert abs(sum(news) - 16 * 128) <= 8  # (rounding)


def test_a_real_run_over_a_tiny_mesh(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "hop.json"
    base = free_port_block(8)  # the mesh's 4 ports, then its 4 metrics ports
    bench_hop.main(["--models", str(tiny_family["base-large"].parent), "--concurrency", "1,2", "--reps", "1",
                    "--max-new", "6", "--port", str(base), "--metrics-port", str(base + 4),
                    "--out", str(out)])
    res = json.loads(out.read_text())
    for n in ("1", "2"):
        m = res["medians"][n]
        assert m["steps"] >= 6 and m["tokens_per_s"] > 0
        assert set(m["calls"]) == {f"{r} ScoreBatch" for r in ("base-large", "base-small", "ft-small")}
        for c in m["calls"].values():
            # a plain step calls each role at most once, and each of a generation's 6 tokens needs a call
            assert 6 <= c["calls"] <= m["steps"]
            # a call's time at the client covers its time in the service
            assert c["client_ms"] >= c["service_ms"] > 0 and c["hop_ms"] >= 0
        assert 0 <= m["outside_ms"] < m["step_ms"]
        assert set(m["cpu_ms_per_step"]) == {"client", "combiner", "base-large", "base-small", "ft-small"}


@pytest.mark.slow
def test_a_streaming_run_counts_the_streamed_tokens(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "hop.json"
    base = free_port_block(8)
    bench_hop.main(["--models", str(tiny_family["base-large"].parent), "--concurrency", "2", "--reps", "1",
                    "--max-new", "5", "--stream", "--port", str(base), "--metrics-port", str(base + 4),
                    "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["stream"] is True
    m = res["rounds"]["2"][0]
    assert round(m["tokens_per_s"] * m["steps"] * m["step_ms"] / 1e3) == 2 * 5  # tokens / wall, wall = steps x step
    st = m["stream"]
    assert st["tokens_per_chunk"] == 1.0  # --stream-interval 1: a chunk per token
    assert 0 < st["ttft_ms"] and 0 < st["chunk_gap_ms_p50"] <= st["chunk_gap_ms_p99"] <= st["chunk_gap_ms_max"]
    assert "What the streams' readers saw" in bench_hop.markdown(res["medians"])
