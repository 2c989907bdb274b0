"""The load runner's HTTP/SSE mode: scenarios whose `call` is `POST /v1/chat/completions` or
`POST /v1/completions` go to the combiner's OpenAI-compatible port (`--http-port`), with the
same keys (data, concurrency, total, duration, rps, timeout, metadata as headers) and the same
report (latency, time to first token, inter-token latency, tokens/s, statuses), the statuses
as HTTP spells them ("HTTP 429"). ghz cannot run these files; this runner can.

A streamed body (`"stream": true`) is read event by event: time to first token is the first
event with tokens, tokens come from the usage event (`stream_options.include_usage` is set when
the scenario leaves it out), and an error event inside a 200 stream counts as a failure.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from eftmesh_lab.loadtest import Result, Scenario, fill

# HTTP status -> the gRPC code the report's ghz view uses (docs/api.md's table, read backwards).
GRPC_OF = {200: grpc.StatusCode.OK, 400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
           499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class Outcome:
    """One HTTP generation as the client saw it."""

    status: int  # HTTP status; 0 when the connection failed
    latency_s: float
    first_s: float | None = None
    last_s: float | None = None  # time of the last event with tokens
    completion_tokens: int = 0
    error: str = ""

    @property
    def inter_token_s(self) -> float | None:
        """Mean time between tokens after the first."""
        if self.first_s is None or self.last_s is None or self.completion_tokens < 2:
            return None
        return (self.last_s - self.first_s) / (self.completion_tokens - 1)


def connect(address: str, tls: Any = None, timeout: float = 60.0) -> http.client.HTTPConnection:
    """A keep-alive connection to HOST:PORT; HTTPS when `tls` (a ClientTLS) is given."""
    host, _, port = address.rpartition(":")
    if tls is None:
        return http.client.HTTPConnection(host, int(port), timeout=timeout)
    ctx = ssl.create_default_context(cafile=tls.ca)
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key)
    return http.client.HTTPSConnection(host, int(port), context=ctx, timeout=timeout)


def _carries_tokens(event: dict) -> bool:
    """Whether an event is a generation chunk (every one carries at least one token; its text
    may be empty while a character or a possible stop string is incomplete), not the role-only
    first chunk of a chat or the usage chunk."""
    choices = event.get("choices")
    return bool(choices) and "role" not in (choices[0].get("delta") or {})


def generate(conn: http.client.HTTPConnection, path: str, body: dict, headers: dict[str, str]) -> Outcome:
    """POST one generation and read the whole response (SSE events as they come)."""
    if body.get("stream"):
        body = {**body, "stream_options": body.get("stream_options") or {"include_usage": True}}
    data = json.dumps(body).encode()
    start = time.perf_counter()
    try:
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # A kept-alive connection the server closed while idle: reconnect once, as clients do.
            conn.close()
            start = time.perf_counter()
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
        if resp.status != 200 or not resp.getheader("content-type", "").startswith("text/event-stream"):
            raw = resp.read()
            took = time.perf_counter() - start
            if resp.status != 200:
                return Outcome(resp.status, took, error=f"HTTP {resp.status}: {_message(raw)}")
            usage = json.loads(raw).get("usage") or {}
            return Outcome(200, took, completion_tokens=usage.get("completion_tokens", 0))
        out = Outcome(200, 0.0)
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                out.status, out.error = 500, f"error event: {event['error'].get('message', '')}"
                continue
            if _carries_tokens(event):
                now = time.perf_counter() - start
                out.first_s = now if out.first_s is None else out.first_s
                out.last_s = now
            if event.get("usage"):
                out.completion_tokens = event["usage"]["completion_tokens"]
        resp.read()  # the rest of the chunked body, so the connection can be reused
        out.latency_s = time.perf_counter() - start
        return out
    except (OSError, http.client.HTTPException, ValueError) as e:
        conn.close()
        return Outcome(0, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def http_calls(s: Scenario, address: str) -> tuple[Callable[[int, int], Result], Callable[[], None]]:
    """`one(worker_id, request_number)` for the load runner (a kept-alive connection per worker,
    the scenario's metadata as headers, its bearer token as Authorization), and `close()`."""
    conns: dict[int, http.client.HTTPConnection] = {}
    headers = {k: v for k, v in s.call_metadata() or ()}

    def one(worker_id: int, n: int) -> Result:
        conn = conns.get(worker_id)
        if conn is None or conn.sock is None:
            conn = conns[worker_id] = connect(address, s.tls, s.timeout_s)
        body = fill(s.data[n % len(s.data)], n, worker_id, s.name)
        wall = time.time()
        o = generate(conn, s.method, body, headers)
        code = GRPC_OF.get(o.status, grpc.StatusCode.INTERNAL if o.status >= 500 else grpc.StatusCode.UNKNOWN)
        if o.status == 0:
            code = grpc.StatusCode.UNAVAILABLE
        status = f"HTTP {o.status}" if o.status else "connection failed"
        return Result(code, o.latency_s, o.first_s, o.completion_tokens, o.error, wall, o.error, o.inter_token_s,
                      status)

    def close() -> None:
        for c in conns.values():
            c.close()

    return one, close
