"""Named compositions (`--composition NAME=SPEC`): the grammar, the one table both APIs read
(gRPC `Composition.name`, HTTP `model`), and the combiner flags that configure the HTTP port.
Pure: no services."""

from __future__ import annotations

import pytest

from eftmesh.combiner import compositions, openai_schema as oai
from eftmesh.combiner.convert import Defaults, request_from_pb
from eftmesh.combiner.server import DEFAULT_COMPOSITION, parse_args
from eftmesh.common.errors import InvalidArgument, NotFound
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import generator_pb2

ROLES = ("base-large", "base-small", "ft-small", "ft-small-alt", "ft-large")


@pytest.mark.parametrize("spec,want", [
    ("base-large+1.0*(ft-small-base-small)", Composition("base-large", (Delta("ft-small", "base-small", 1.0),))),
    ("base-large + (ft-small - base-small)", Composition("base-large", (Delta("ft-small", "base-small", 1.0),))),
    ("ft-small+1.5*(base-large-base-small)", Composition("ft-small", (Delta("base-large", "base-small", 1.5),))),
    ("base-small-0.5*(ft-large-base-large)", Composition("base-small", (Delta("ft-large", "base-large", -0.5),))),
    ("base-small+0.7*(ft-small-base-small)+3e-1*(ft-small-alt - base-small)",
     Composition("base-small", (Delta("ft-small", "base-small", 0.7), Delta("ft-small-alt", "base-small", 0.3)))),
    ("base-large", Composition("base-large")),
])
def test_the_grammar(spec, want):
    assert compositions.parse_spec(spec, ROLES) == want


@pytest.mark.parametrize("spec,text", [
    ("", "is not"), ("base-large+1.0*(ft-small-base-small", "is not"), ("base-large*2", "is not"),
    ("base-large+(ft-small)", "cannot tell"), ("base-huge", "no --upstream"), ("base-large+1e999*(a - b)", "finite"),
    ("base-large+2e4*(ft-small-base-small)", "weight"), ("base-large+(ft-small-nobody)", "cannot tell"),
])
def test_a_bad_spec_says_what_is_wrong(spec, text):
    with pytest.raises(ValueError, match=text):
        compositions.parse_spec(spec, ROLES)


@pytest.mark.parametrize("text", ["default=base-large", "base-large=base-small", "no spaces=base-large", "x"])
def test_reserved_and_malformed_names_are_refused(text):
    with pytest.raises(ValueError):
        compositions.parse_named(text, ROLES)


def test_grpc_and_http_resolve_the_same_names():
    named = dict([compositions.parse_named("helpful=base-large+1.0*(ft-small-base-small)", ROLES)])
    d = Defaults(DEFAULT_COMPOSITION, SamplingConfig(), compositions=named)
    roles = dict.fromkeys(ROLES)

    def by_name(name: str) -> Composition:
        msg = generator_pb2.CompleteRequest(prompt="x", composition=generator_pb2.Composition(name=name))
        return request_from_pb(msg, d, roles).composition

    assert by_name("helpful") == named["helpful"] == by_name("default")
    assert by_name("ft-small") == Composition("ft-small")
    with pytest.raises(NotFound, match="default, helpful, base-large"):
        by_name("nope")
    with pytest.raises(InvalidArgument, match="name or base"):
        request_from_pb(generator_pb2.CompleteRequest(prompt="x", composition=generator_pb2.Composition(
            name="helpful", base="base-large")), d, roles)
    body = oai.ChatRequest.model_validate({"model": "helpful", "messages": [{"role": "user", "content": "hi"}]})
    assert request_from_pb(oai.to_pb(body, named, roles), d, roles).composition == named["helpful"]
    assert compositions.model_names(named, roles) == ["default", "helpful", *sorted(ROLES)]


def test_flags_give_the_http_port_the_grpc_ports_tls_limits_and_compositions():
    cfg = parse_args(["--upstream", "base-large=h:1", "--upstream", "base-small=h:2", "--upstream", "ft-small=h:3",
                      "--tokenizer", "t", "--http-port", "8000", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                      "--max-request-bytes", "65536", "--max-concurrent-rpcs", "9",
                      "--composition", "helpful=base-large+1.0*(ft-small-base-small)"], environ={})
    assert cfg.http is not None and cfg.http.port == 8000
    assert cfg.http.tls == cfg.server.tls and cfg.http.max_request_bytes == 65536 and cfg.http.max_in_flight == 9
    assert cfg.defaults.compositions["helpful"].describe() == "base-large + 1*(ft-small - base-small)"
    assert parse_args(["--upstream", "base-large=h:1", "--tokenizer", "t", "--no-default-delta",
                       "--default-base", "base-large"], environ={}).http is None


def test_the_cli_sends_a_composition_by_name():
    import argparse

    from eftmesh.cli import add_request_flags, build_request

    p = argparse.ArgumentParser()
    add_request_flags(p)
    req = build_request(p.parse_args(["--composition", "helpful"]), prompt="x")
    assert req["composition"].name == "helpful" and not req["composition"].base


def test_a_server_fault_is_a_500_in_openai_shape_with_its_traceback_logged(caplog):
    """Never for input (the fuzz tests hold that), but a bug must still answer in the API's shape."""
    from starlette.testclient import TestClient

    from eftmesh.combiner.http import HttpApi
    from eftmesh.combiner.server import HttpConfig

    class Broken:
        defaults = property(lambda self: 1 / 0)

    api = HttpApi(Broken(), None, HttpConfig(), tracer=__import__("opentelemetry").trace.NoOpTracer(),
                  ready=lambda: True)
    r = TestClient(api.app, raise_server_exceptions=False).get("/v1/models")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "ZeroDivisionError" in caplog.text
