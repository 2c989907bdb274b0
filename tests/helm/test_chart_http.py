"""The chart's HTTP API values: the combiner's OpenAI-compatible port on its Service, named
compositions, an optional Ingress, the HTTP readiness probe option."""

from __future__ import annotations

import pytest

from tests.helm.test_chart import by_kind, container, parse, render

COMBINER = "eft-eftmesh-combiner"


def combiner(docs: list[dict]) -> dict:
    return container(by_kind(docs, "Deployment")[COMBINER])


def test_the_combiner_should_serve_http_on_its_service_by_default():
    docs = render()
    c = combiner(docs)
    assert "--http-port=8000" in c["args"] and parse(COMBINER, c).http.port == 8000
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    ports = {p["name"]: p for p in by_kind(docs, "Service")[COMBINER]["spec"]["ports"]}
    assert ports["http"] == {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    assert "grpc" in c["readinessProbe"]  # gRPC health unless asked otherwise
    policy = by_kind(docs, "NetworkPolicy").get("eft-eftmesh-combiner")
    if policy is not None:
        assert {"port": 8000, "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    assert not by_kind(docs, "Ingress")


def test_http_off_should_leave_no_port_and_no_flag():
    docs = render({"combiner": {"http": {"enabled": False}}})
    c = combiner(docs)
    assert not [a for a in c["args"] if a.startswith("--http-port")] and parse(COMBINER, c).http is None
    assert [p["name"] for p in by_kind(docs, "Service")[COMBINER]["spec"]["ports"]] == ["grpc"]


@pytest.mark.parametrize("tls,scheme", [(False, "HTTP"), (True, "HTTPS")])
def test_the_http_readiness_option_should_probe_health_ready_over_the_ports_scheme(tls, scheme):
    c = combiner(render({"combiner": {"http": {"readinessProbe": True}}, "tls": {"enabled": tls}}))
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http", "scheme": scheme}
    assert "grpc" in c["startupProbe"] and "grpc" in c["livenessProbe"]


def test_named_compositions_should_become_flags_the_combiner_accepts():
    c = combiner(render({"combiner": {"compositions": {"helpful": "base-large+1.0*(ft-small-base-small)"}}}))
    assert "--composition=helpful=base-large+1.0*(ft-small-base-small)" in c["args"]
    assert parse(COMBINER, c).defaults.compositions["helpful"].base == "base-large"


def test_the_ingress_should_route_v1_to_the_http_port():
    docs = render({"combiner": {"ingress": {"enabled": True, "className": "nginx", "hosts": ["eft.example.com"],
                                            "tls": [{"secretName": "eft-tls", "hosts": ["eft.example.com"]}]}}})
    (ing,) = by_kind(docs, "Ingress").values()
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["spec"]["tls"][0]["secretName"] == "eft-tls"
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "eft.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/v1" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": COMBINER, "port": {"name": "http"}}
    (any_host,) = by_kind(render({"combiner": {"ingress": {"enabled": True}}}), "Ingress").values()
    assert "host" not in any_host["spec"]["rules"][0]


@pytest.mark.parametrize("values,message", [
    ({"combiner": {"http": {"enabled": False}, "ingress": {"enabled": True}}}, "combiner.ingress needs"),
    ({"combiner": {"http": {"enabled": False, "readinessProbe": True}}}, "combiner.http.readinessProbe needs"),
    ({"combiner": {"httpRoute": {"enabled": True}}}, "combiner.httpRoute.parentRefs"),
    ({"combiner": {"compositions": {"bad name": "base-large"}}}, "'bad name' does not match pattern"),
])
def test_inconsistent_http_values_should_fail_with_a_message(values, message):
    with pytest.raises(Exception, match=message):  # helm_python's render error
        render(values)
