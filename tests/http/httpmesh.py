"""Fixtures of the HTTP API's tests: the shipped demo family's mesh with the OpenAI-compatible
port open, and a raw HTTP client (the standard library's, so a test sees exactly what went over
the wire: status, headers, the bytes of an SSE stream)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import start_combiner, start_logit
from eftmesh.combiner.compositions import parse_named
from eftmesh.combiner.convert import Defaults
from eftmesh.combiner.server import HttpConfig
from eftmesh.combiner.server import DEFAULT_COMPOSITION, CombinerServer
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.server import LogitServer
from eftmesh.v1 import generator_pb2_grpc

MODELS = Path(__file__).resolve().parents[2] / "models" / "demo"
ROLES = ("base-large", "base-small", "ft-small")
HELPFUL = "helpful=base-large+1.0*(ft-small-base-small)"
AMPLIFIED = "amplified=base-large + 1.5*(ft-small - base-small)"


@dataclass
class HttpMesh:
    logits: dict[str, LogitServer]
    combiner: CombinerServer
    channel: grpc.Channel

    @property
    def port(self) -> int:
        assert self.combiner.http is not None
        return self.combiner.http.port

    @property
    def generator(self) -> generator_pb2_grpc.GeneratorStub:
        return generator_pb2_grpc.GeneratorStub(self.channel)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def http_combiner(logits: dict[str, LogitServer], ports: dict[str, int] | None = None, **kwargs: Any) -> CombinerServer:
    """A combiner with the HTTP API on a free loopback port, over `logits` (or `ports`)."""
    named = dict(parse_named(s, ROLES) for s in (HELPFUL, AMPLIFIED))
    kwargs.setdefault("defaults", Defaults(DEFAULT_COMPOSITION, SamplingConfig(temperature=1.0, top_p=1.0), 16, 256,
                                           compositions=named))
    http_kw = {"grace_s": 1.0, **kwargs.pop("http_kw", {})}
    return start_combiner(MODELS / "ft-small", ports or {r: ls.server.port for r, ls in logits.items()},
                          http=HttpConfig(host="127.0.0.1", port=0, **http_kw), **kwargs)


@pytest.fixture(scope="module")
def demo_logits() -> Iterator[dict[str, LogitServer]]:
    logits = {r: start_logit(MODELS / r, r) for r in ROLES}
    yield logits
    for ls in logits.values():
        ls.server.stop(0).wait()


@pytest.fixture(scope="module")
def http_mesh(demo_logits: dict[str, LogitServer]) -> Iterator[HttpMesh]:
    cs = http_combiner(demo_logits)
    assert cs.wait_serving(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    yield HttpMesh(demo_logits, cs, channel)
    channel.close()
    cs.stop(0)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The `data:` events of an SSE body, JSON-decoded ('[DONE]' kept as the string)."""
        out = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out


def request(port: int, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
    """One HTTP request on a fresh connection; the whole response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()
