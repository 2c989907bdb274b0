"""Load tests: run ghz scenario files against a mesh, with ghz or without it.

The scenarios in load_tests/*.json are ghz configuration files (https://ghz.sh/docs/config):
people who have ghz run them as they are,

    ghz --config load_tests/complete-greedy.json --host combiner:50050

and this runner plays the same files where ghz cannot be had (it is in no package registry
here): same call, data, concurrency, total or duration, rps and timeout, same summary
(latency percentiles, requests/s, status code distribution), plus what ghz cannot see in an
LLM service: completion tokens/s and, for the streaming Generate call, time to first token.

    eftmesh-load load_tests/*.json --address HOST:PORT      # against a running combiner (lab)
    make load                                               # starts the demo mesh, runs all

What it reads from a ghz file: call, host, data (one message, or an array used round-robin
across requests, as ghz does for unary calls), metadata, concurrency, total, duration, rps
(or older ghz's "qps"), timeout, name. In string values of data, {{.RequestNumber}} and
{{.WorkerID}} are replaced as ghz's call templates do. Other ghz keys that change the load are
honoured as ghz does: connections (workers spread over that many connections), skipFirst
(the first N results left out of the report), count-errors (errors' latencies in the ghz
report's figures), duration-stop ("wait" or "ignore"), lb-strategy, keepalive,
enable-compression, authority, load-schedule / concurrency-schedule "const", tags (copied to
the ghz report). Those it cannot honour are refused with an error naming the key: step and line
schedules (load-* / concurrency-* settings), cpus, async, stream-* settings, data-file,
binary, metadata-file, TLS (cacert, cert, key, cname, skipTLS), duration-stop "close". Keys
that do not change the load (proto, protoset, import-paths, format, output, reflect-metadata,
debug, dial-timeout, connect-timeout) are ignored; anything else is an error, so a typo cannot
silently change a scenario.

Reports: `--out FILE` writes this runner's JSON ({"scenarios": [...]}, with tokens/s and time
to first token); `--format ghz` writes ghz's own JSON report instead (ghz -O json: name,
endReason, date, count, total, average, fastest, slowest, rps, errorDistribution,
statusCodeDistribution, latencyDistribution, histogram, details, options; durations in
nanoseconds, status names as grpc-go spells them), one run per file as ghz does: --out is the
file for one scenario, a directory (one NAME.json each) for several, stdout without --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from eftmesh.common.auth import add_client_args as add_token_args, client_metadata, client_token
from eftmesh.common.tls import ClientTLS, add_client_args, channel as tls_channel, client_from_args
from eftmesh.v1 import generator_pb2, logit_pb2  # noqa: F401 - registers eftmesh.v1 in the pool

# ghz keys this runner reads and honours.
_READ = {"name", "call", "host", "data", "metadata", "concurrency", "total", "duration", "rps", "qps", "timeout",
         "insecure", "skipFirst", "connections", "count-errors", "duration-stop", "lb-strategy", "keepalive",
         "enable-compression", "authority", "load-schedule", "concurrency-schedule", "tags"}
# ghz keys with no effect on the load sent (what to load, where to write, logging).
_IGNORED = {"proto", "protoset", "import-paths", "format", "output", "reflect-metadata", "debug", "dial-timeout",
            "connect-timeout"}
_SCHEDULES = "step and line schedules are not implemented here: use a constant 'rps' / 'concurrency', or run ghz"
# ghz keys that would change the load in a way this runner cannot play: refused unless set to
# ghz's default (a value that changes nothing), with the reason.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (lambda v: v in (None, 0, "", "0", "0s"), _SCHEDULES) for k in (
        "load-start", "load-end", "load-step", "load-step-duration", "load-max-duration", "concurrency-start",
        "concurrency-end", "concurrency-step", "concurrency-step-duration", "concurrency-max-duration")},
    "cpus": (lambda v: v in (None, 0), "the number of client CPUs cannot be set in this runner (it uses threads)"),
    "async": (lambda v: not v, "async (open-loop) calls are not implemented: use 'rps' with enough 'concurrency'"),
    **{k: (lambda v: v in (None, 0, "", "0", "0s", False), "streaming-call settings are not implemented here "
           "(client-streaming calls are not supported; a server stream is read to its end)")
       for k in ("stream-interval", "stream-call-duration", "stream-call-count", "stream-dynamic-messages")},
    **{k: (lambda v: not v, "request data is read only from 'data' (a JSON object or array) here")
       for k in ("data-file", "binary", "binary-file", "metadata-file")},
    **{k: (lambda v: not v, "TLS is not supported by this runner (plaintext only, as 'insecure': true)")
       for k in ("cacert", "cert", "key", "cname", "skipTLS")},
}
_DURATION_STOPS = {"wait", "ignore"}
_TEMPLATE = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# A scenario whose call is "POST /v1/chat/completions" or "POST /v1/completions" runs against the
# combiner's HTTP API (eftmesh_lab.loadtest_http); its Scenario.service is this.
HTTP_SERVICE = "http"
HTTP_PATHS = ("/v1/chat/completions", "/v1/completions")


class ScenarioError(ValueError):
    """A scenario file that cannot run as written; the message says what to fix."""


def parse_duration(text: str | int | float, key: str) -> float:
    """Seconds in a Go duration string ("20s", "1m30s", "500ms") or a bare number of seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ScenarioError(f"{key}: {text!r} is not a duration like '20s', '1m30s' or '500ms'")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass(frozen=True)
class Scenario:
    """One ghz configuration, as this runner reads it."""

    name: str
    service: str  # e.g. eftmesh.v1.Generator
    method: str  # e.g. Complete
    data: tuple[dict, ...]  # round-robin over requests
    metadata: tuple[tuple[str, str], ...] = ()
    concurrency: int = 50  # ghz's defaults
    total: int | None = 200
    duration_s: float | None = None
    rps: float | None = None
    timeout_s: float = 20.0
    host: str | None = None
    connections: int = 1
    skip_first: int = 0
    count_errors: bool = False
    duration_stop: str = "wait"  # ghz's "close" (cancel in-flight calls) is refused
    channel_options: tuple[tuple[str, Any], ...] = ()
    compression: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    # From the command line, never written to reports: TLS to the combiner and a bearer token.
    tls: ClientTLS | None = None
    token: str | None = None

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (*self.metadata, *client_metadata(self.token)) or None

    @staticmethod
    def load(path: Path) -> Scenario:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ScenarioError(f"{path}: cannot read a JSON ghz config: {e}") from None
        return Scenario.from_dict(raw, default_name=path.stem, where=str(path))

    @staticmethod
    def from_dict(raw: dict, default_name: str = "scenario", where: str = "scenario") -> Scenario:
        unknown = set(raw) - _READ - _IGNORED - set(_REFUSED)
        if unknown:
            raise ScenarioError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_READ)}")
        for key in sorted(set(raw) & set(_REFUSED)):
            harmless, why = _REFUSED[key]
            if not harmless(raw[key]):
                raise ScenarioError(f"{where}: ghz key {key!r} ({raw[key]!r}) is not supported: {why}")
        for key in ("load-schedule", "concurrency-schedule"):
            if raw.get(key, "const") != "const":
                raise ScenarioError(f"{where}: ghz key {key!r} ({raw[key]!r}) is not supported: {_SCHEDULES}")
        stop = raw.get("duration-stop") or "wait"
        if stop not in _DURATION_STOPS:
            raise ScenarioError(f"{where}: ghz key 'duration-stop' ({stop!r}) is not supported: in-flight calls are "
                                "not cancelled at the end of 'duration' here; use 'wait' or 'ignore'")
        options: list[tuple[str, Any]] = []
        if raw.get("lb-strategy"):
            options.append(("grpc.lb_policy_name", str(raw["lb-strategy"])))
        if raw.get("keepalive"):
            options.append(("grpc.keepalive_time_ms", int(parse_duration(raw["keepalive"], "keepalive") * 1000)))
        if raw.get("authority"):
            options.append(("grpc.default_authority", str(raw["authority"])))
        connections, skip_first = int(raw.get("connections") or 1), int(raw.get("skipFirst") or 0)
        if connections < 1 or skip_first < 0:
            raise ScenarioError(f"{where}: connections must be at least 1 and skipFirst at least 0")
        call = raw.get("call")
        if isinstance(call, str) and call.startswith("POST /"):  # the HTTP API (eftmesh_lab.loadtest_http)
            service, method = HTTP_SERVICE, call[len("POST "):]
            if method not in HTTP_PATHS:
                raise ScenarioError(f"{where}: HTTP calls are {', '.join('POST ' + p for p in HTTP_PATHS)}, got {call!r}")
        elif not isinstance(call, str) or not re.fullmatch(r"[\w.]+[./]\w+", call):
            raise ScenarioError(f"{where}: 'call' must be 'package.Service.Method', 'package.Service/Method' or "
                                f"'POST /v1/...', got {call!r}")
        else:
            service, method = re.split(r"[./](?=\w+$)", call)
        data = raw.get("data", {})
        data = tuple(data) if isinstance(data, list) else (data,)
        if not data or not all(isinstance(d, dict) for d in data):
            raise ScenarioError(f"{where}: 'data' must be a JSON object or a non-empty array of objects")
        duration = parse_duration(raw["duration"], "duration") if raw.get("duration") else None
        total = raw.get("total", None if duration else 200)
        concurrency = int(raw.get("concurrency", 50))
        if concurrency < 1 or (total is not None and int(total) < 1):
            raise ScenarioError(f"{where}: concurrency and total must be at least 1")
        return Scenario(
            name=str(raw.get("name", default_name)), service=service, method=method, data=data,
            metadata=tuple((str(k).lower(), str(v)) for k, v in raw.get("metadata", {}).items()),
            concurrency=concurrency, total=int(total) if total is not None else None, duration_s=duration,
            rps=float(raw.get("rps") or raw.get("qps") or 0) or None,
            timeout_s=parse_duration(raw.get("timeout", "20s"), "timeout"), host=raw.get("host"),
            connections=connections, skip_first=skip_first, count_errors=bool(raw.get("count-errors")),
            duration_stop=stop, channel_options=tuple(options), compression=bool(raw.get("enable-compression")),
            tags=tuple((str(k), str(v)) for k, v in (raw.get("tags") or {}).items()),
        )


@dataclass
class Call:
    """A scenario's method, resolved against the eftmesh.v1 protos."""

    path: str
    request_class: type[Message]
    response_class: type[Message]
    server_streaming: bool

    @staticmethod
    def resolve(s: Scenario) -> Call:
        pool = descriptor_pool.Default()
        try:
            service = pool.FindServiceByName(s.service)
        except KeyError:
            raise ScenarioError(f"{s.name}: no service {s.service!r} (known: eftmesh.v1.Generator, eftmesh.v1.LogitService)") from None
        method = service.methods_by_name.get(s.method)
        if method is None:
            raise ScenarioError(f"{s.name}: {s.service} has no method {s.method!r} (it has {sorted(service.methods_by_name)})")
        if method.client_streaming:
            raise ScenarioError(f"{s.name}: client-streaming calls are not supported")
        return Call(f"/{s.service}/{s.method}", message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type), method.server_streaming)

    def request(self, template: dict, request_number: int, worker_id: int, where: str) -> Message:
        try:
            return json_format.ParseDict(fill(template, request_number, worker_id, where), self.request_class())
        except json_format.ParseError as e:
            raise ScenarioError(f"{where}: data does not fit {self.request_class.DESCRIPTOR.full_name}: {e}") from None


def fill(template: Any, request_number: int, worker_id: int, where: str) -> Any:
    """`template` with ghz's call templates ({{.RequestNumber}}, {{.WorkerID}}) filled in."""
    values = {"RequestNumber": str(request_number), "WorkerID": str(worker_id)}

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise ScenarioError(f"{where}: template {m.group(0)} is not supported (only {{{{.RequestNumber}}}} and "
                                "{{.WorkerID}})")
        return values[m.group(1)]

    if isinstance(template, str):
        return _TEMPLATE.sub(sub, template)
    if isinstance(template, dict):
        return {k: fill(x, request_number, worker_id, where) for k, x in template.items()}
    if isinstance(template, list):
        return [fill(x, request_number, worker_id, where) for x in template]
    return template


@dataclass
class Result:
    """What one request did."""

    code: grpc.StatusCode
    latency_s: float
    first_s: float | None = None  # streaming: time to the first response carrying tokens
    completion_tokens: int = 0
    error: str = ""
    timestamp: float = 0.0  # time.time() when the call started
    ghz_error: str = ""  # the error as grpc-go prints it, for ghz's report
    itl_s: float | None = None  # streaming: mean time between tokens after the first
    status: str = ""  # the status as the protocol spells it when not gRPC's ("HTTP 429")


def _tokens(response: Message) -> int:
    if response.DESCRIPTOR.fields_by_name.get("usage") is not None and response.HasField("usage"):
        return response.usage.completion_tokens
    return 0


def _one(invoke: Callable, streaming: bool, request: Message, s: Scenario) -> Result:
    """One request through `invoke` (the channel's callable for the method)."""
    start, wall = time.perf_counter(), time.time()
    try:
        if streaming:
            first, last, tokens = None, None, 0
            for response in invoke(request, timeout=s.timeout_s, metadata=s.call_metadata()):
                if getattr(response, "token_ids", None):
                    last = time.perf_counter() - start
                    first = last if first is None else first
                tokens = max(tokens, _tokens(response))
            itl = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
            return Result(grpc.StatusCode.OK, time.perf_counter() - start, first, tokens, timestamp=wall, itl_s=itl)
        response = invoke(request, timeout=s.timeout_s, metadata=s.call_metadata())
        return Result(grpc.StatusCode.OK, time.perf_counter() - start, None, _tokens(response), timestamp=wall)
    except grpc.RpcError as e:
        return Result(e.code(), time.perf_counter() - start, error=f"{e.code().name}: {e.details()}", timestamp=wall,
                      ghz_error=f"rpc error: code = {go_code(e.code())} desc = {e.details()}")


def go_code(code: grpc.StatusCode) -> str:
    """A status code as grpc-go's codes.Code.String() spells it ("ResourceExhausted"), as ghz
    reports it."""
    if code == grpc.StatusCode.OK:
        return "OK"
    if code == grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


def _rfc3339(t: float, seconds_only: bool = False) -> str:
    when = datetime.fromtimestamp(t, timezone.utc).astimezone()
    return when.isoformat(timespec="seconds" if seconds_only else "microseconds")


_NS = 1_000_000_000
_GHZ_PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)


@dataclass
class Report:
    """A ghz-style summary of one scenario run."""

    name: str
    call: str
    concurrency: int
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    scenario: Scenario | None = None
    end_reason: str = "normal"  # ghz's: normal, or timeout when 'duration' ended the run
    ended: float = 0.0  # time.time() at the end

    def as_ghz(self, host: str = "") -> dict:
        """ghz's own JSON report (runner.Report, as `ghz -O json` writes it): durations as
        integer nanoseconds, histogram marks in seconds, status names as grpc-go's. Figures
        other than count, average and rps use successful calls only, unless the scenario
        sets count-errors, as in ghz."""
        s = self.scenario
        results = self.results
        count = len(results)
        total_ns = int(self.wall_s * _NS)
        counted = sorted(r.latency_s for r in results
                         if r.code == grpc.StatusCode.OK or (s is not None and s.count_errors))
        report: dict[str, Any] = {
            "name": self.name,
            "endReason": self.end_reason,
            "options": self._ghz_options(host),
            "date": _rfc3339(self.ended or time.time(), seconds_only=True),
            "count": count,
            "total": total_ns,
            "average": int(sum(r.latency_s for r in results) / count * _NS) if count else 0,
            "fastest": int(counted[0] * _NS) if counted else 0,
            "slowest": int(counted[-1] * _NS) if counted else 0,
            "rps": count / self.wall_s if count and self.wall_s else 0.0,
            "errorDistribution": dict(Counter(r.ghz_error for r in results if r.code != grpc.StatusCode.OK)),
            "statusCodeDistribution": dict(Counter(go_code(r.code) for r in results)),
            "latencyDistribution": _ghz_latencies(counted) if counted else None,
            "histogram": _ghz_histogram(counted) if counted else None,
            "details": [{"timestamp": _rfc3339(r.timestamp), "latency": int(r.latency_s * _NS),
                         "error": r.ghz_error, "status": go_code(r.code)} for r in results] or None,
        }
        if s is not None and s.tags:
            report["tags"] = dict(s.tags)
        return report

    def _ghz_options(self, host: str) -> dict:
        s = self.scenario
        if s is None:
            return {"call": self.call, "host": host, "insecure": True, "concurrency": self.concurrency}
        out: dict[str, Any] = {"host": host, "call": f"{s.service}.{s.method}", "insecure": True,
                               "concurrency": s.concurrency, "connections": s.connections,
                               "timeout": int(s.timeout_s * _NS), "CPUs": 0, "binary": False, "name": s.name,
                               "data": s.data[0] if len(s.data) == 1 else list(s.data)}
        if s.total is not None:
            out["total"] = s.total
        if s.duration_s:
            out["duration"] = int(s.duration_s * _NS)
        if s.rps:
            out["rps"] = int(s.rps)
        if s.skip_first:
            out["skipFirst"] = s.skip_first
        if s.count_errors:
            out["count-errors"] = True
        if s.metadata:
            out["metadata"] = dict(s.metadata)
        return out

    def as_dict(self) -> dict:
        ok = [r for r in self.results if r.code == grpc.StatusCode.OK]
        codes = Counter(r.status or r.code.name for r in self.results)
        errors = Counter(r.error for r in self.results if r.error)
        tokens = sum(r.completion_tokens for r in ok)
        out = {
            "name": self.name, "call": self.call, "concurrency": self.concurrency,
            "count": len(self.results), "ok": len(ok), "total_s": round(self.wall_s, 3),
            "requests_per_s": round(len(self.results) / self.wall_s, 3) if self.wall_s else 0.0,
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_ms": _distribution([r.latency_s for r in ok]),
            "status": dict(codes.most_common()),
            "errors": dict(errors.most_common(10)),
        }
        failed = [r.latency_s for r in self.results if r.code != grpc.StatusCode.OK]
        if failed:
            out["failed_latency_ms"] = _distribution(failed)  # how fast errors come back (load shedding)
        firsts = [r.first_s for r in ok if r.first_s is not None]
        if firsts:
            out["time_to_first_token_ms"] = _distribution(firsts)
        itls = [r.itl_s for r in ok if r.itl_s is not None]
        if itls:
            out["inter_token_latency_ms"] = _distribution(itls)
        return out


def _ghz_latencies(latencies: Sequence[float]) -> list[dict]:
    """ghz's latencyDistribution: percentages 10 ... 99 of sorted latencies (seconds), its
    rank rule, latency in ns (an entry ghz leaves zero for a zero latency stays zero)."""
    out = []
    for p in _GHZ_PERCENTAGES:
        ip = p / 100.0 * len(latencies)
        di = int(ip)
        if ip == di:
            di -= 1
        value = latencies[max(di, 0)]
        out.append({"percentage": p, "latency": int(value * _NS)} if value > 0 else {"percentage": 0, "latency": 0})
    return out


def _ghz_histogram(latencies: Sequence[float]) -> list[dict]:
    """ghz's histogram: 11 marks (seconds) from fastest to slowest, counts of latencies up to
    each mark, frequency as a fraction."""
    fastest, slowest, bc = latencies[0], latencies[-1], 10
    step = (slowest - fastest) / bc
    marks = [fastest + step * i for i in range(bc)] + [slowest]
    counts = [0] * len(marks)
    bi = 0
    for lat in latencies:
        while lat > marks[bi] and bi < len(marks) - 1:
            bi += 1
        counts[bi] += 1
    return [{"mark": m, "count": c, "frequency": c / len(latencies)} for m, c in zip(marks, counts)]


def _distribution(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = sorted(s * 1000.0 for s in seconds)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100.0 * len(ms)))], 2)

    return {"fastest": round(ms[0], 2), "average": round(statistics.fmean(ms), 2), "p50": pct(50), "p90": pct(90),
            "p95": pct(95), "p99": pct(99), "slowest": round(ms[-1], 2)}


def run(s: Scenario, address: str, progress: Callable[[int], None] | None = None) -> Report:
    """Run a scenario against `address` with `s.concurrency` workers over `s.connections`
    channels (worker i on connection i mod connections, one connection by default), as ghz
    does; an HTTP scenario with a kept-alive connection per worker."""
    if s.service == HTTP_SERVICE:
        from eftmesh_lab.loadtest_http import http_calls

        one, close = http_calls(s, address)
        return _drive(s, Report(s.name, f"POST {s.method}", s.concurrency, scenario=s), one, close, progress)
    call = Call.resolve(s)
    # Build every distinct request once up front, so bad data fails before any load is sent.
    for i, template in enumerate(s.data):
        call.request(template, i, 0, s.name)
    # A local subchannel pool per channel: otherwise gRPC would share one connection among them.
    options = [*s.channel_options, *([("grpc.use_local_subchannel_pool", 1)] if s.connections > 1 else [])]
    compression = grpc.Compression.Gzip if s.compression else None
    channels = [tls_channel(address, s.tls, options, compression=compression)
                for _ in range(s.connections)]
    invokes = []
    for channel in channels:
        kind = channel.unary_stream if call.server_streaming else channel.unary_unary
        invokes.append(kind(call.path, request_serializer=call.request_class.SerializeToString,
                            response_deserializer=call.response_class.FromString))

    def one(worker_id: int, n: int) -> Result:
        request = call.request(s.data[n % len(s.data)], n, worker_id, s.name)
        return _one(invokes[worker_id % len(invokes)], call.server_streaming, request, s)

    def close() -> None:
        for channel in channels:
            channel.close()

    return _drive(s, Report(s.name, f"{s.service}.{s.method}", s.concurrency, scenario=s), one, close, progress)


def _drive(s: Scenario, report: Report, one: Callable[[int, int], Result], close: Callable[[], None],
           progress: Callable[[int], None] | None) -> Report:
    """The scenario's schedule (total, duration, rps, concurrency) over `one(worker_id, n)`."""
    lock = threading.Lock()
    counter = iter(range(sys.maxsize))
    start = time.perf_counter()
    deadline = start + s.duration_s if s.duration_s else None
    timed_out = threading.Event()

    def next_number() -> int | None:
        with lock:
            n = next(counter)
        if s.total is not None and n >= s.total:
            return None
        if s.rps:  # ghz's constant schedule: request n is due at n / rps
            due = start + n / s.rps
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if deadline is not None and time.perf_counter() >= deadline:
            timed_out.set()
            return None
        return n

    def worker(worker_id: int) -> None:
        while (n := next_number()) is not None:
            result = one(worker_id, n)
            if s.duration_stop == "ignore" and deadline is not None and time.perf_counter() > deadline:
                timed_out.set()
                continue  # ghz's duration-stop "ignore": calls ending after the duration are not counted
            with lock:
                report.results.append(result)
                done = len(report.results)
            if progress:
                progress(done)

    try:
        with ThreadPoolExecutor(s.concurrency) as pool:
            for f in [pool.submit(worker, w) for w in range(s.concurrency)]:
                f.result()
    finally:
        close()
    report.wall_s = time.perf_counter() - start
    report.ended = time.time()
    report.end_reason = "timeout" if timed_out.is_set() else "normal"
    if s.skip_first:  # ghz's skipFirst: the first N results (in the order they came) are left out
        report.results = report.results[s.skip_first:]
    return report


def summary(d: dict) -> str:
    """The report in ghz's own summary layout, with the LLM figures appended."""
    lat = d["latency_ms"]
    lines = [
        f"Summary: {d['name']} ({d['call']}, concurrency {d['concurrency']})",
        f"  Count:        {d['count']}",
        f"  Total:        {d['total_s'] * 1000:.2f} ms",
    ]
    if lat:
        lines += [f"  Slowest:      {lat['slowest']:.2f} ms", f"  Fastest:      {lat['fastest']:.2f} ms",
                  f"  Average:      {lat['average']:.2f} ms"]
    lines += [f"  Requests/sec: {d['requests_per_s']:.2f}",
              f"  Tokens/sec:   {d['tokens_per_s']:.2f} ({d['completion_tokens']} completion tokens)"]
    if lat:
        lines += ["", "Latency distribution:"] + [f"  {p} % in {lat[f'p{p}']:.2f} ms" for p in (50, 90, 95, 99)]
    if "time_to_first_token_ms" in d:
        t = d["time_to_first_token_ms"]
        lines += [f"  time to first token: p50 {t['p50']:.2f} ms, p99 {t['p99']:.2f} ms"]
    if "inter_token_latency_ms" in d:
        t = d["inter_token_latency_ms"]
        lines += [f"  inter-token latency (per request): p50 {t['p50']:.2f} ms, p99 {t['p99']:.2f} ms"]
    lines += ["", "Status code distribution:"] + [f"  [{c}] {n} responses" for c, n in d["status"].items()]
    if d["errors"]:
        f = d["failed_latency_ms"]
        lines += ["", "Error distribution:"] + [f"  [{n}] {e}" for e, n in d["errors"].items()]
        lines += [f"  failed calls returned in: p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms"]
    return "\n".join(lines)


def markdown(reports: Sequence[dict]) -> str:
    """One README table row per scenario."""
    rows = ["| scenario | call | concurrency | requests | OK | req/s | tokens/s | p50 ms | p99 ms | TTFT p50 ms "
            "| ITL p50 ms | other statuses (p50 ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(dist: dict, key: str) -> str:
        return f"{dist[key]:.0f}" if key in dist else "-"

    for d in reports:
        lat, ttft, itl = d["latency_ms"], d.get("time_to_first_token_ms", {}), d.get("inter_token_latency_ms", {})
        other = ", ".join(f"{c} {n}" for c, n in d["status"].items() if c not in ("OK", "HTTP 200"))
        other = f"{other} ({ms(d['failed_latency_ms'], 'p50')})" if other else "-"
        call = d["call"] if d["call"].startswith("POST ") else d["call"].rsplit(".", 1)[1]
        rows.append(f"| {d['name']} | {call} | {d['concurrency']} | {d['count']} | {d['ok']} | "
                    f"{d['requests_per_s']:.2f} | {d['tokens_per_s']:.1f} | {ms(lat, 'p50')} | {ms(lat, 'p99')} | "
                    f"{ms(ttft, 'p50')} | {ms(itl, 'p50')} | {other} |")
    return "\n".join(rows)


def _progress(name: str, total: int | None) -> Callable[[int], None]:
    last = [0.0]

    def show(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"\r  {name}: {done}{f'/{total}' if total else ''} requests", end="", file=sys.stderr, flush=True)
            if done == total:
                print(file=sys.stderr)

    return show


def run_all(paths: Sequence[Path], address: str | None, overrides: dict, out: Path | None,
            quiet: bool = False, fmt: str = "eftmesh", http_address: str | None = None) -> list[dict]:
    """Run the scenarios in order; write their reports to `out` in `fmt` ("eftmesh": one JSON
    of all runs; "ghz": ghz's report, one run per file, so `out` is the file for one scenario
    and a directory for several; printed to stdout when `out` is None)."""
    scenarios = []
    for path in paths:
        s = Scenario.load(path)
        s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
        if s.service != HTTP_SERVICE:
            Call.resolve(s)  # fail on a bad call before running anything
        scenarios.append(s)
    if fmt == "ghz" and out is not None and len(scenarios) > 1 and out.suffix == ".json":
        raise ScenarioError(f"--format ghz writes one report per run: give --out a directory for {len(scenarios)} "
                            f"scenarios, not {out}")
    reports, ghz = [], []
    for s in scenarios:
        target = (http_address if s.service == HTTP_SERVICE else address) or s.host
        if not target:
            flag = "--http-address" if s.service == HTTP_SERVICE else "--address"
            raise ScenarioError(f"{s.name}: no address: give {flag} or set 'host' in the file")
        r = run(s, target, None if quiet else _progress(s.name, s.total))
        d = r.as_dict()
        reports.append(d)
        ghz.append(r.as_ghz(target))
        if not quiet:
            print(summary(d) + "\n", flush=True)
    if fmt == "ghz":
        if out is None:
            for g in ghz:
                print(json.dumps(g, indent=2))
        elif len(ghz) == 1 and out.suffix == ".json":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(ghz[0], indent=2) + "\n")
        else:
            out.mkdir(parents=True, exist_ok=True)
            for s, g in zip(scenarios, ghz):
                (out / (re.sub(r"[^\w.-]", "_", s.name) + ".json")).write_text(json.dumps(g, indent=2) + "\n")
    elif out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"scenarios": reports}, indent=2) + "\n")
    return reports


# The --local-mesh combiner's HTTP port: --port plus this (its logit services take the next few).
HTTP_PORT_OFFSET = 30


@contextmanager
def _local_mesh(models: Path, port: int, combiner_args: Sequence[str],
                logit_args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """The gRPC and HTTP addresses of a demo mesh started on loopback."""
    from eftmesh.launcher import LocalMesh, resolve_models

    roles = {r: p for r, p in resolve_models(models).items() if r in ("base-large", "base-small", "ft-small")}
    http_port = port + HTTP_PORT_OFFSET
    with LocalMesh(roles, port=port, log_dir=Path("build/load"), logit_args=logit_args,
                   combiner_args=["--http-port", str(http_port), *combiner_args]) as mesh:
        yield mesh.address, f"127.0.0.1:{http_port}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eftmesh-load", description=__doc__.splitlines()[0],
                                epilog="Scenario files are ghz configs; see load_tests/README.md.")
    p.add_argument("scenarios", nargs="+", type=Path, help="ghz JSON config files")
    p.add_argument("--address", default=None, help="combiner host:port (default: each file's 'host')")
    p.add_argument("--http-address", default=None,
                   help="the combiner's HTTP API host:port, for scenarios whose call is 'POST /v1/...' (default: each "
                        "file's 'host')")
    p.add_argument("--local-mesh", type=Path, default=None, metavar="MODELS",
                   help="start a mesh on loopback over this model family first (as `eftmesh up` does) and test it")
    p.add_argument("--port", type=int, default=50450, help=f"first port of the --local-mesh mesh; its HTTP API on --port + {HTTP_PORT_OFFSET} (default: %(default)s)")
    p.add_argument("--combiner-arg", action="append", default=[], help="extra flag for the --local-mesh combiner; repeatable")
    p.add_argument("--logit-arg", action="append", default=[], help="extra flag for every --local-mesh logit service; repeatable")
    p.add_argument("--concurrency", type=int, default=None, help="override every scenario's concurrency")
    p.add_argument("--total", type=int, default=None, help="override every scenario's total")
    p.add_argument("--out", type=Path, default=None,
                   help="write the reports as JSON here (--format ghz: the file for one scenario, a directory "
                        "for several)")
    p.add_argument("--format", choices=("eftmesh", "ghz"), default="eftmesh",
                   help="eftmesh: this runner's JSON, with tokens/s and time to first token; ghz: ghz's own JSON "
                        "report (ghz -O json), printed to stdout without --out (default: %(default)s)")
    p.add_argument("--markdown", action="store_true", help="also print a README table of the runs")
    add_client_args(p, what="the combiner")
    add_token_args(p)
    a = p.parse_args(argv)
    try:
        overrides = {"concurrency": a.concurrency, "total": a.total, "tls": client_from_args(p, a),
                     "token": client_token(a)}
    except (OSError, ValueError) as e:
        p.error(str(e))
    quiet = a.format == "ghz" and a.out is None  # stdout carries the ghz report alone
    try:
        if a.local_mesh:
            with _local_mesh(a.local_mesh, a.port, a.combiner_arg, a.logit_arg) as (address, http_address):
                reports = run_all(a.scenarios, address, overrides, a.out, quiet, a.format, http_address)
        else:
            reports = run_all(a.scenarios, a.address, overrides, a.out, quiet, a.format, a.http_address)
    except ScenarioError as e:
        p.error(str(e))
    if a.markdown and not quiet:
        print(markdown(reports))
    if a.out:
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
