"""The chart's start-up and connection values against what the services do with them: the
combiner waits for logit pods as long as they may take to load, `healthPort: null` really
turns the health server off, and `maxConnectionAge: 0` reaches the combiner as "never"."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest

from eftmesh.combiner import monitor
from eftmesh.combiner.server import connection_age_options
from eftmesh.combiner.upstream import GrpcScorer
from tests.helm.test_chart import VALUE_SETS, by_kind, container, parse, render, render_set


def _budget(probe: dict) -> int:
    """Seconds a startup probe lets a container take before the kubelet restarts it."""
    return probe["periodSeconds"] * probe["failureThreshold"]


def _combiner(docs: list[dict]) -> tuple[str, dict]:
    (name, dep), = ((n, d) for n, d in by_kind(docs, "Deployment").items() if n.endswith("-combiner"))
    return name, container(dep)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_combiner_should_wait_for_its_upstreams_as_long_as_the_slowest_role_may_take_to_start(name):
    docs = render_set(name)
    slowest = max(_budget(container(d)["startupProbe"])
                  for n, d in by_kind(docs, "Deployment").items() if not n.endswith("-combiner"))
    cname, c = _combiner(docs)
    wait = parse(cname, c).policy.connect_timeout_s
    # 0 waits forever; anything else must outlast the slowest role's load, or the combiners
    # exit (code 2) and crash-loop through a first install of real models
    assert wait == 0 or wait >= slowest, (name, wait, slowest)
    # while it waits it is NOT_SERVING, so its own startup probe must not restart it first
    assert _budget(c["startupProbe"]) >= slowest, (name, c["startupProbe"], slowest)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("connect_timeout, gives_up", [(None, False), (120.0, True)])
def test_a_combiner_under_the_chart_default_should_still_wait_after_120_s(monkeypatch, connect_timeout, gives_up):
    """The chart's default policy, parsed by the real entry point, against an upstream that
    never answers, on a clock that runs an hour per health round; the old default (120 s) as
    the control."""
    cname, c = _combiner(render())
    policy = dataclasses.replace(parse(cname, c).policy, health_interval_s=0.02, health_timeout_s=0.2)
    if connect_timeout is not None:
        policy = dataclasses.replace(policy, connect_timeout_s=connect_timeout)
    clock = {"offset": 0.0}
    real = time.monotonic

    class FastClock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def monotonic() -> float:
            clock["offset"] += 3600.0
            return real() + clock["offset"]

    monkeypatch.setattr(monitor, "time", FastClock())  # the health rounds and the connect timeout live there
    died = threading.Event()
    scorer = GrpcScorer({"base-large": f"127.0.0.1:{_closed_port()}"}, policy)
    try:
        scorer.start(on_fatal=lambda err: died.set())
        assert died.wait(2.0) is gives_up
        assert scorer.fatal is None or gives_up
    finally:
        scorer.close()


def test_health_port_null_should_turn_the_health_server_off_and_probe_the_serving_port():
    docs = render({"logit": {"healthPort": None}, "combiner": {"healthPort": None}})
    for name, dep in by_kind(docs, "Deployment").items():
        c = container(dep)
        assert "--health-port=off" in c["args"]
        assert parse(name, c).server.resolved_health_port() is None  # no second server opened
        assert [p["name"] for p in c["ports"] if p["name"] == "health"] == []
        serving = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == serving


@pytest.mark.parametrize("health", [50070, None])
def test_every_port_a_pod_opens_should_be_declared_in_its_spec(health):
    docs = render({"logit": {"healthPort": health}, "combiner": {"healthPort": health and health + 1}})
    for name, dep in by_kind(docs, "Deployment").items():
        c = container(dep)
        declared = {p["containerPort"] for p in c["ports"]}
        cfg = parse(name, c)
        opened = {cfg.server.port, cfg.server.resolved_health_port(), cfg.metrics_port} - {None}
        assert opened <= declared, (name, opened, declared)


@pytest.mark.parametrize("age, expect", [(0, 0.0), (600, 600.0), (None, 300.0)])
def test_max_connection_age_should_reach_the_combiner_with_0_as_never(age, expect):
    cname, c = _combiner(render({"combiner": {"maxConnectionAge": age}}))
    cfg = parse(cname, c)
    assert cfg.max_connection_age_s == expect
    assert (connection_age_options(cfg.max_connection_age_s, cfg.max_connection_age_grace_s) == []) is (expect == 0)
