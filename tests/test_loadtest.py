"""The load-test runner (eftmesh load): the shipped ghz scenario files are valid for the
eftmesh.v1 API, and running scenarios against a real mesh on loopback counts requests, tokens
and status codes as they happened. ghz itself is in no registry here, so it is not run."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from eftmesh import loadtest
from eftmesh.loadtest import Call, Scenario, ScenarioError
from conftest import start_combiner

LOAD_TESTS = Path(__file__).resolve().parents[1] / "load_tests"
SHIPPED = sorted(LOAD_TESTS.glob("*.json"))


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
        assert request.prompt.startswith("<|endoftext|>User: ")
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
