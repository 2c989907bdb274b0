"""The load-test runner (eftmesh-load, eftmesh_lab.loadtest): the shipped ghz scenario files are valid for the
eftmesh.v1 API, and running scenarios against a real mesh on loopback counts requests, tokens
and status codes as they happened. ghz itself is in no registry here, so it is not run."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from eftmesh_lab import loadtest
from eftmesh_lab.loadtest import Call, Scenario, ScenarioError
from conftest import start_combiner

LOAD_TESTS = Path(__file__).resolve().parents[1] / "load_tests"
SHIPPED = sorted(LOAD_TESTS.glob("*.json"))

# most tests load a real mesh of gRPC services on loopback (the conftest `mesh`)
pytestmark = [pytest.mark.e2e]


def test_scenarios_are_shipped():
    assert len(SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_is_valid_for_the_api(path):
    raw = json.loads(path.read_text())
    s = Scenario.load(path)
    call = Call.resolve(s)
    assert s.service == "eftmesh.v1.Generator" and raw.get("insecure") is True  # ghz needs it for plaintext
    for i, template in enumerate(s.data):
        request = call.request(template, request_number=i, worker_id=0, where=path.name)
        # a hand-formatted demo prompt, or a chat the demo's template renders the same way
        assert request.prompt.startswith("<|endoftext|>User: ") or (
            [m.role for m in request.messages] == ["user"] and request.messages[0].content and not request.prompt)
        assert request.max_new_tokens > 0


def scenario(**kw) -> Scenario:
    raw = {"call": "eftmesh.v1.Generator.Complete", "total": 6, "concurrency": 3, "timeout": "60s",
           "data": [{"prompt": "hello", "max_new_tokens": 4, "ignore_eos": True, "sampling": {"temperature": 0}},
                    {"prompt": "the cat", "max_new_tokens": 4, "ignore_eos": True, "sampling": {"temperature": 0}}]}
    raw.update(kw)
    return Scenario.from_dict(raw)


def test_unary_scenario_counts_every_request_and_token(mesh):
    address = f"127.0.0.1:{mesh.combiner.server.port}"
    d = loadtest.run(scenario(), address).as_dict()
    assert (d["count"], d["ok"], d["status"]) == (6, 6, {"OK": 6})
    assert d["completion_tokens"] == 6 * 4  # ignore_eos: exactly max_new_tokens each
    lat = d["latency_ms"]
    assert 0 < lat["fastest"] <= lat["p50"] <= lat["p99"] <= lat["slowest"]
    assert d["requests_per_s"] > 0 and d["tokens_per_s"] > 0
    assert "time_to_first_token_ms" not in d  # unary: no first token to time


def test_streaming_scenario_times_the_first_token(mesh):
    address = f"127.0.0.1:{mesh.combiner.server.port}"
    s = scenario(call="eftmesh.v1.Generator/Generate", total=4, concurrency=2,
                 data={"prompt": "hello", "max_new_tokens": 6, "ignore_eos": True, "seed": "{{.RequestNumber}}"})
    d = loadtest.run(s, address).as_dict()
    assert d["ok"] == 4 and d["completion_tokens"] == 4 * 6
    assert 0 < d["time_to_first_token_ms"]["p50"] <= d["latency_ms"]["slowest"]


def test_overload_is_counted_as_resource_exhausted(mesh, tiny_family):
    ports = {r: ls.server.port for r, ls in mesh.logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, max_concurrent_generations=1)
    try:
        s = scenario(total=12, concurrency=6,
                     data={"prompt": "hello", "max_new_tokens": 24, "ignore_eos": True})
        d = loadtest.run(s, f"127.0.0.1:{cs.server.port}").as_dict()
    finally:
        cs.stop(0)
    assert d["count"] == 12
    assert d["ok"] >= 1 and d["status"].get("RESOURCE_EXHAUSTED", 0) >= 1, d
    assert d["ok"] + d["status"]["RESOURCE_EXHAUSTED"] == 12
    assert any(e.startswith("RESOURCE_EXHAUSTED: ") for e in d["errors"])
    assert d["completion_tokens"] == d["ok"] * 24  # only successful requests' tokens count
    assert d["failed_latency_ms"]["p50"] < d["latency_ms"]["p50"]  # shed at once, not after queueing


def test_bad_data_fails_before_any_load_is_sent(mesh):
    s = scenario(data={"prompt": "hi", "max_new_tokenz": 4})
    with pytest.raises(ScenarioError, match="max_new_tokenz"):
        loadtest.run(s, f"127.0.0.1:{mesh.combiner.server.port}")


@pytest.mark.parametrize("raw, message", [
    ({"call": "eftmesh.v1.Generator.Complete", "totl": 5}, "unknown key(s) ['totl']"),
    ({"call": "Complete"}, "'call' must be"),
    ({"call": "eftmesh.v1.Generator.Complete", "duration": "ten seconds"}, "is not a duration"),
    ({"call": "eftmesh.v1.Generator.Complete", "data": []}, "'data' must be"),
])
def test_bad_scenario_files_say_what_to_fix(raw, message):
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Scenario.from_dict(raw)


@pytest.mark.parametrize("call, message", [
    ("eftmesh.v1.Nope.Complete", "no service 'eftmesh.v1.Nope'"),
    ("eftmesh.v1.Generator.Completes", "has no method 'Completes'"),
])
def test_unknown_calls_are_named(call, message):
    with pytest.raises(ScenarioError, match=message):
        Call.resolve(Scenario.from_dict({"call": call}))


def test_durations_parse_like_go():
    assert loadtest.parse_duration("1m30s", "d") == 90.0
    assert loadtest.parse_duration("500ms", "d") == 0.5
    assert loadtest.parse_duration(3, "d") == 3.0


def test_duration_bounds_a_run(mesh):
    s = scenario(total=None, duration="1s", concurrency=2, data={"prompt": "hi", "max_new_tokens": 2})
    d = loadtest.run(s, f"127.0.0.1:{mesh.combiner.server.port}").as_dict()
    assert d["count"] >= 1 and d["total_s"] < 10


def test_cli_prints_a_ghz_style_summary_and_writes_json(mesh, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "tiny", "call": "eftmesh.v1.Generator.Complete", "total": 2,
                                "concurrency": 1, "data": {"prompt": "hi", "max_new_tokens": 2}}))
    out = tmp_path / "r.json"
    loadtest.main([str(path), "--address", f"127.0.0.1:{mesh.combiner.server.port}", "--out", str(out),
                   "--markdown"])
    text = capsys.readouterr().out
    assert "Summary: tiny" in text and "Status code distribution:" in text and "[OK] 2 responses" in text
    assert "| tiny | Complete | 1 | 2 | 2 |" in text and "| - | - |" in text  # no TTFT, no failures
    assert json.loads(out.read_text())["scenarios"][0]["ok"] == 2


def test_unreachable_address_is_counted_not_raised():
    s = scenario(total=2, concurrency=1, timeout="1s")
    d = loadtest.run(s, "127.0.0.1:1").as_dict()
    assert d["ok"] == 0 and set(d["status"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


def test_grpc_status_names_are_reported(mesh):
    # prompt too long for the tiny models' context: INVALID_ARGUMENT or OUT_OF_RANGE, not a crash
    s = scenario(total=1, concurrency=1, data={"prompt": "word " * 5000, "max_new_tokens": 2})
    d = loadtest.run(s, f"127.0.0.1:{mesh.combiner.server.port}").as_dict()
    assert d["ok"] == 0 and set(d["status"]) & {"INVALID_ARGUMENT", "OUT_OF_RANGE"}, d
    assert grpc.StatusCode.OK.name not in d["status"]


# ghz's own report layout (runner.Report as `ghz -O json` writes it)

GHZ_FIELDS = {"name", "endReason", "options", "date", "count", "total", "average", "fastest", "slowest", "rps",
              "errorDistribution", "statusCodeDistribution", "latencyDistribution", "histogram", "details"}


def test_ghz_report_layout_and_units(mesh, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "tiny", "call": "eftmesh.v1.Generator.Complete", "total": 5, "concurrency": 2,
                                "connections": 2, "skipFirst": 1, "insecure": True,
                                "data": {"prompt": "hi", "max_new_tokens": 2, "ignore_eos": True}}))
    out = tmp_path / "r.json"
    loadtest.main([str(path), "--address", f"127.0.0.1:{mesh.combiner.server.port}", "--format", "ghz",
                   "--out", str(out)])
    g = json.loads(out.read_text())
    assert set(g) == GHZ_FIELDS
    assert g["name"] == "tiny" and g["endReason"] == "normal"
    assert g["count"] == 4  # skipFirst: 1 of 5 left out
    assert g["statusCodeDistribution"] == {"OK": 4} and g["errorDistribution"] == {}
    for key in ("total", "average", "fastest", "slowest"):
        assert isinstance(g[key], int) and g[key] > 0, key
    assert 1_000 < g["fastest"] <= g["slowest"] < g["total"] < 60 * 10**9  # nanoseconds
    assert isinstance(g["rps"], float) and g["rps"] == pytest.approx(4 / (g["total"] / 1e9), rel=1e-3)
    assert [d["percentage"] for d in g["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    lats = [d["latency"] for d in g["latencyDistribution"]]
    assert all(isinstance(x, int) for x in lats) and lats == sorted(lats) and g["fastest"] <= lats[0]
    assert lats[-1] == g["slowest"]
    assert len(g["histogram"]) == 11 and sum(b["count"] for b in g["histogram"]) == 4
    assert g["histogram"][0]["mark"] == pytest.approx(g["fastest"] / 1e9, rel=1e-6)  # marks in seconds
    assert g["histogram"][-1]["mark"] == pytest.approx(g["slowest"] / 1e9, rel=1e-6)
    assert sum(b["frequency"] for b in g["histogram"]) == pytest.approx(1.0)
    assert len(g["details"]) == 4
    for d in g["details"]:
        assert set(d) == {"timestamp", "latency", "error", "status"}
        assert isinstance(d["latency"], int) and d["status"] == "OK" and d["error"] == ""
        datetime.fromisoformat(d["timestamp"])  # RFC 3339
    datetime.fromisoformat(g["date"])
    assert g["options"]["connections"] == 2 and g["options"]["call"] == "eftmesh.v1.Generator.Complete"


def test_ghz_report_spells_errors_as_grpc_go(mesh, tiny_family):
    ports = {r: ls.server.port for r, ls in mesh.logits.items()}
    cs = start_combiner(tiny_family["base-small"], ports, max_concurrent_generations=1)
    try:
        s = scenario(total=8, concurrency=4, data={"prompt": "hello", "max_new_tokens": 16, "ignore_eos": True})
        g = loadtest.run(s, f"127.0.0.1:{cs.server.port}").as_ghz()
    finally:
        cs.stop(0)
    assert g["statusCodeDistribution"]["ResourceExhausted"] >= 1
    assert sum(g["statusCodeDistribution"].values()) == g["count"] == 8
    assert all(e.startswith("rpc error: code = ResourceExhausted desc = ") for e in g["errorDistribution"])
    failed = [d for d in g["details"] if d["status"] != "OK"]
    assert failed and all(d["error"] for d in failed)
    # fastest/slowest over successful calls only (no count-errors), as ghz
    ok = [d["latency"] for d in g["details"] if d["status"] == "OK"]
    assert (g["fastest"], g["slowest"]) == (min(ok), max(ok))


def test_ghz_duration_run_ends_with_timeout(mesh):
    s = scenario(total=None, duration="1s", concurrency=1, data={"prompt": "hi", "max_new_tokens": 2})
    g = loadtest.run(s, f"127.0.0.1:{mesh.combiner.server.port}").as_ghz()
    assert g["endReason"] == "timeout" and g["count"] >= 1


def test_ghz_format_wants_a_directory_for_several_scenarios(tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"call": "eftmesh.v1.Generator.Complete", "total": 1}))
    with pytest.raises(ScenarioError, match="one report per run"):
        loadtest.run_all(paths, "127.0.0.1:1", {}, tmp_path / "r.json", quiet=True, fmt="ghz")


@pytest.mark.parametrize("key, value", [
    ("load-schedule", "step"), ("concurrency-schedule", "line"), ("load-start", 5), ("concurrency-step", 2),
    ("load-max-duration", "10s"), ("cpus", 4), ("async", True), ("stream-interval", "100ms"),
    ("stream-call-count", 3), ("data-file", "d.json"), ("binary", True), ("metadata-file", "m.json"),
    ("cacert", "ca.pem"), ("skipTLS", True), ("duration-stop", "close"),
])
def test_ghz_keys_that_change_the_load_are_refused_by_name(key, value):
    with pytest.raises(ScenarioError, match=f"ghz key '{key}'"):
        Scenario.from_dict({"call": "eftmesh.v1.Generator.Complete", key: value})


@pytest.mark.parametrize("key, value", [
    ("load-schedule", "const"), ("concurrency-schedule", "const"), ("cpus", 0), ("async", False),
    ("load-start", 0), ("stream-interval", "0s"), ("binary", False), ("proto", "x.proto"), ("format", "json"),
])
def test_ghz_defaults_and_non_load_keys_are_accepted(key, value):
    Scenario.from_dict({"call": "eftmesh.v1.Generator.Complete", key: value})


def test_ghz_keys_that_are_honoured_are_read():
    s = Scenario.from_dict({"call": "eftmesh.v1.Generator.Complete", "connections": 3, "skipFirst": 2,
                            "count-errors": True, "duration-stop": "ignore", "lb-strategy": "round_robin",
                            "keepalive": "30s", "enable-compression": True, "tags": {"env": "ci"}})
    assert (s.connections, s.skip_first, s.count_errors, s.duration_stop, s.compression) == (3, 2, True, "ignore", True)
    assert dict(s.channel_options) == {"grpc.lb_policy_name": "round_robin", "grpc.keepalive_time_ms": 30000}
    assert s.tags == (("env", "ci"),)


def test_ghz_latency_distribution_follows_ghz_ranks():
    lats = [i / 1000 for i in range(1, 11)]  # 1..10 ms
    d = loadtest._ghz_latencies(lats)
    assert [x["latency"] for x in d] == [1_000_000, 3_000_000, 5_000_000, 8_000_000, 9_000_000, 10_000_000, 10_000_000]
    h = loadtest._ghz_histogram(lats)
    assert [b["count"] for b in h] == [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert h[0]["mark"] == 0.001 and h[-1]["mark"] == 0.01 and h[2]["frequency"] == 0.1
