"""Every row of the HTTP API's status table (docs/api.md), in OpenAI's error shape, and the
protections it shares with gRPC: bearer tokens, TLS, the request size limit, admission control,
readiness, spans and GenAI metrics with http.* attributes, and a client that disconnects
mid-stream freeing its KV blocks in every role."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import collect, free_ports, points
import httpmesh
from conftest import idle, wait_for
from httpmesh import ROLES, http_combiner, request
from eftmesh.common import tracing
from eftmesh.common.tls import ServerTLS

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
demo_logits, http_mesh = httpmesh.demo_logits, httpmesh.http_mesh  # the module's fixtures

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "What pet does Kose Vetael keep?"}]


def chat(**kw) -> dict:
    return {"model": "helpful", "messages": HI, "max_tokens": 4, "temperature": 0, **kw}


def assert_error(r, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status == status, (r.status, r.body[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    assert text in err["message"], err
    return err


# (path, body, status, param, text in the message): the caller's mistakes
MISTAKES = [
    (CHAT, b"{", 400, None, "not JSON"),
    (CHAT, b"\xff\xfe{}", 400, None, "not JSON"),
    (CHAT, b"[1, 2]", 400, None, "JSON object"),
    (CHAT, chat(messages="hi"), 400, "messages", ""),
    (CHAT, chat(max_tokens="8"), 400, "max_tokens", ""),
    (CHAT, chat(max_tokens=2**40), 400, "max_tokens", ""),
    (CHAT, chat(max_tokens=100000), 400, None, "max_new_tokens"),
    (CHAT, chat(temperature=-1), 400, None, "temperature"),
    (CHAT, chat(top_p=2.0), 400, None, "top_p"),
    (CHAT, chat(seed=-1), 400, "seed", ""),
    (CHAT, chat(mesages=HI), 400, "mesages", "unknown field"),
    (CHAT, chat(n=2), 400, "n", "not supported"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", "not supported"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", "needs logprobs"),
    (CHAT, chat(top_logprobs=21, logprobs=True), 400, None, "top_logprobs"),
    (CHAT, chat(max_tokens=3, max_completion_tokens=4), 400, "max_tokens", "differ"),
    (CHAT, chat(messages=[]), 400, "messages", ""),
    (CHAT, chat(eft="base-large+1.0*(ft-small"), 400, "eft", ""),
    (CHAT, chat(eft={"base": "base-large", "deltas": [{"tuned": "ft-small", "reference": "base-small",
                                                       "weight": 1e9}]}), 400, None, "weight"),
    (CHAT, chat(speculation={"mode": "fixed", "k": 1000}), 400, None, "speculation.k"),
    (CHAT, chat(stop=["x" * 1000]), 400, None, "stop"),
    (CHAT, chat(chat_template_role="base-large"), 400, None, "chat template"),  # FAILED_PRECONDITION
    ("/v1/completions", {"model": "base-large", "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {"model": "base-large", "prompt": ""}, 400, None, "prompt is empty"),
    ("/v1/completions", {"model": "base-large", "prompt": "x", "logprobs": 6}, 400, None, "logprobs"),
    ("/v1/completions", {"model": "base-large", "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    (CHAT, chat(model="base-huge"), 404, None, "base-huge"),
    (CHAT, chat(eft="base-huge+1.0*(ft-small - base-small)"), 400, "eft", "base-huge"),
    (CHAT, chat(eft={"base": "base-huge"}), 404, None, "base-huge"),
    (CHAT, chat(speculation={"mode": "fixed", "draft_role": "nobody"}), 404, None, "nobody"),
]


@pytest.mark.parametrize("path,body,status,param,text", MISTAKES)
def test_a_callers_mistake_gets_its_status_and_names_the_field(http_mesh, path, body, status, param, text):
    assert_error(request(http_mesh.port, "POST", path, body), status, param, text)


def test_routes_methods_sizes_and_readiness(http_mesh):
    assert_error(request(http_mesh.port, "POST", "/v1/embeddings", {}), 404)
    assert_error(request(http_mesh.port, "GET", CHAT), 405)
    limit = http_mesh.combiner.http.api.cfg.max_request_bytes
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * limit}])).encode()
    assert_error(request(http_mesh.port, "POST", CHAT, big), 413)
    assert request(http_mesh.port, "GET", "/health/live").status == 200
    assert request(http_mesh.port, "GET", "/version").json()["version"]
    assert request(http_mesh.port, "GET", "/health/ready").json() == {"status": "ready"}
    assert request(http_mesh.port, "POST", CHAT, chat()).status == 200


def test_bearer_tokens_401_and_403(demo_logits, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\nnew-token\n")
    cs = http_combiner(demo_logits, auth_tokens_file=str(tokens))
    try:
        port = cs.http.port
        assert_error(request(port, "POST", CHAT, chat()), 401)
        assert_error(request(port, "GET", "/v1/models"), 401)
        assert_error(request(port, "POST", CHAT, chat(), {"Authorization": "Bearer wrong"}), 403)
        assert request(port, "POST", CHAT, chat(), {"Authorization": "Bearer new-token"}).status == 200
        assert request(port, "GET", "/health/ready").status == 200  # probes need no token
        tokens.write_text("newest-token\n")  # rotation: the file is re-read, for gRPC and HTTP alike
        assert wait_for(lambda: request(port, "GET", "/v1/models", headers={"Authorization": "Bearer newest-token"})
                        .status == 200, 15.0)
        assert_error(request(port, "POST", CHAT, chat(), {"Authorization": "Bearer new-token"}), 403)
    finally:
        cs.stop(0)


def test_overload_is_429_with_retry_after_and_a_disconnect_frees_every_roles_kv_blocks(demo_logits):
    """One slot: a stream holds it, the next request is refused at once; the stream's client
    then disconnects, its generation is cancelled (the metric says CANCELLED with the route) and
    every role's KV usage returns to zero."""
    reader = InMemoryMetricReader()
    cs = http_combiner(demo_logits, max_concurrent_generations=1, meter_provider=MeterProvider(metric_readers=[reader]))
    conn = http.client.HTTPConnection("127.0.0.1", cs.http.port, timeout=60)
    try:
        assert wait_for(idle(demo_logits), 5.0)
        body = chat(model="helpful", max_tokens=256, stream=True, ignore_eos=True)
        conn.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.status == 200
        assert stream.readline().startswith(b"data: ")  # the generation runs
        assert all(ls.engine.pool.used_blocks > 0 for ls in demo_logits.values())
        r = request(cs.http.port, "POST", CHAT, chat())
        assert_error(r, 429, text="limit of 1 generations")
        assert r.headers["retry-after"] == "1"
        conn.sock.shutdown(2)
        conn.close()
        assert wait_for(idle(demo_logits), 10.0), "a disconnected stream kept KV blocks"
        assert wait_for(lambda: request(cs.http.port, "POST", CHAT, chat()).status == 200, 10.0)
        data = collect(reader)
        done = points(data, "gen_ai.server.request.duration", **{"http.route": CHAT})
        assert {p.attributes["rpc.grpc.status_code"] for p in done} == {"RESOURCE_EXHAUSTED", "CANCELLED", "OK"}
    finally:
        conn.close()
        cs.stop(0)


def test_http_requests_over_the_in_flight_limit_get_429(demo_logits):
    cs = http_combiner(demo_logits, http_kw={"max_in_flight": 1})
    conn = http.client.HTTPConnection("127.0.0.1", cs.http.port, timeout=60)
    try:
        conn.request("POST", CHAT, body=json.dumps(chat(max_tokens=256, stream=True, ignore_eos=True)),
                     headers={"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.readline().startswith(b"data: ")
        r = request(cs.http.port, "POST", CHAT, chat())
        assert_error(r, 429, text="HTTP requests in flight")
        assert r.headers["retry-after"] == "1"
    finally:
        conn.close()
        cs.stop(0)


def test_503_while_a_role_has_no_live_replica(demo_logits):
    cs = http_combiner(demo_logits, ports=dict(zip(ROLES, free_ports(len(ROLES)))))
    try:
        r = request(cs.http.port, "GET", "/health/ready")
        assert r.status == 503
        r = request(cs.http.port, "POST", CHAT, chat())
        assert_error(r, 503)
        assert r.headers["retry-after"] == "1"
        assert request(cs.http.port, "GET", "/health/live").status == 200
    finally:
        cs.stop(0)


def test_tls_with_the_grpc_ports_certificate_and_an_http_span_around_the_generation(demo_logits, tmp_path: Path):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    exporter = InMemorySpanExporter()
    provider = tracing.make_tracer_provider("eftmesh-combiner", otlp=False, exporter=exporter)
    cs = http_combiner(demo_logits, http_kw={"tls": ServerTLS(str(cert), str(key))}, tracer_provider=provider)
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        conn = http.client.HTTPSConnection("127.0.0.1", cs.http.port, context=ctx, timeout=60)
        conn.request("POST", CHAT, body=json.dumps(chat()), headers={
            "Content-Type": "application/json", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"]
        conn.close()
        provider.force_flush()
        spans = {s.name: s for s in exporter.get_finished_spans()}
        server, gen = spans["POST /v1/chat/completions"], spans["eftmesh.generate"]
        assert gen.parent.span_id == server.context.span_id
        assert format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
        assert server.attributes["http.response.status_code"] == 200
        assert gen.attributes["gen_ai.operation.name"] == "chat"
    finally:
        cs.stop(0)



def test_a_drain_lets_running_streams_finish_and_refuses_new_requests(demo_logits):
    """SIGTERM's path (CombinerServer.stop): readiness goes 503 at once, a running stream still
    gets every token and [DONE], and a new request is refused (503, or no connection at all)."""
    cs = http_combiner(demo_logits, http_kw={"grace_s": 30.0})
    conn = http.client.HTTPConnection("127.0.0.1", cs.http.port, timeout=60)
    stopper = threading.Thread(target=cs.stop, args=(30.0,))
    try:
        body = chat(max_tokens=40, stream=True, ignore_eos=True, stream_options={"include_usage": True})
        conn.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.readline().startswith(b"data: ")
        stopper.start()
        assert wait_for(lambda: cs.http.api.draining, 10.0)
        try:
            assert request(cs.http.port, "POST", CHAT, chat(), timeout=10).status == 503
        except OSError:
            pass  # the listening socket is already closed
        events = [json.loads(line[6:]) for line in stream.read().split(b"\n\n") if line.startswith(b"data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 40
    finally:
        conn.close()
        if stopper.ident is None:
            cs.stop(0)
        stopper.join(60)
