"""OpenTelemetry metrics, set up once at a service's entry point, and the instruments of each
service.

Two ways out, either or both:
- OTLP, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics-specific variable) is set, exported
  every `OTEL_METRIC_EXPORT_INTERVAL` ms (the SDK reads the variables itself);
- Prometheus, when a service is given `--metrics-port`: GET http://HOST:PORT/metrics, for a
  Prometheus scrape (the Helm chart annotates the pods for it) or an HPA on custom metrics
  through a Prometheus adapter.

With neither, no meter provider is built and the instruments are the API's no-ops: metrics then
cost nothing on the hot path.

Names follow the OpenTelemetry GenAI semantic conventions where they define one
(`gen_ai.server.*`); the rest are `eftmesh.*`. Prometheus shows dots as underscores, with the
unit appended (`gen_ai_server_time_to_first_token_seconds`).

The `gen_ai.server.*` instruments carry the conventions' attributes (`gen_ai_attributes`):
`gen_ai.operation.name` ("text_completion"), `gen_ai.provider.name` ("eftmesh": the conventions
list no well-known value for a self-hosted mesh, so it names itself; the deprecated
`gen_ai.system` is not emitted), `gen_ai.request.model` (the composition, e.g.
"base-large + 1*(ft-small - base-small)"; absent when the request was refused before it
could be read), and on failures `error.type` (`error_type`: the gRPC status name the caller
got, e.g. "RESOURCE_EXHAUSTED", "CANCELLED" for a client gone mid-stream, or the exception's
class for an unexpected error). `rpc.method` and `rpc.grpc.status_code` are kept alongside.
Only `gen_ai.client.token.usage` exists for tokens in the conventions, a client metric, so the
server counts tokens in `eftmesh.tokens` with the conventions' `gen_ai.token.type`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Counter, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from eftmesh.common.errors import EftMeshError

log = logging.getLogger(__name__)

OTLP_METRICS_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")

# Latency buckets in seconds, from a small model's forward on a GPU to a long generation.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 30.0, 60.0, 120.0)
_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Batch occupancy (items / --max-batch): a lone Score of a max-batch-64 service is 1/64; a batch
# of more items than --max-batch (run as several forwards) lands above 1.
_OCCUPANCY = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0)


def otlp_requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for OTLP metrics export."""
    return any(environ.get(k) for k in OTLP_METRICS_ENV)


def make_meter_provider(
    service_name: str,
    *,
    otlp: bool,
    prometheus_port: int | None = None,
    prometheus_host: str = "0.0.0.0",
    readers: Sequence[MetricReader] = (),
) -> MeterProvider | None:
    """A provider for one service, or None when metrics are off.

    Args:
        service_name: the `service.name` resource attribute.
        otlp: export over OTLP/gRPC (endpoint, headers, interval from the OTEL_* variables).
        prometheus_port: serve /metrics on this port (0 picks a free one; None: no endpoint).
        readers: extra readers (tests use an in-memory one).
    """
    all_readers = list(readers)
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        all_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        all_readers.append(PrometheusMetricReader())
        start_http_server(prometheus_port, addr=prometheus_host)
        log.info("metrics on http://%s:%d/metrics", prometheus_host, prometheus_port)
    if not all_readers:
        return None
    views = [
        View(instrument_name="*duration*", aggregation=ExplicitBucketHistogramAggregation(_SECONDS)),
        View(instrument_name="gen_ai.server.time_*", aggregation=ExplicitBucketHistogramAggregation(_SECONDS)),
        View(instrument_name="eftmesh.speculation.acceptance", aggregation=ExplicitBucketHistogramAggregation(_RATIO)),
    ]
    return MeterProvider(metric_readers=all_readers, resource=Resource.create({"service.name": service_name}),
                         views=views)


def outcome(error: BaseException | None) -> str:
    """The gRPC status name a call ended with, for the `rpc.grpc.status_code` attribute."""
    if error is None:
        return "OK"
    if isinstance(error, EftMeshError):
        return error.code.name
    if isinstance(error, GeneratorExit):  # a stream whose client went away
        return "CANCELLED"
    return "INTERNAL"


# The GenAI semantic conventions' values for this service.
GEN_AI_OPERATION = "text_completion"
GEN_AI_CHAT = "chat"
GEN_AI_PROVIDER = "eftmesh"


def gen_ai_attributes(model: str | None = None, operation: str = GEN_AI_OPERATION) -> dict[str, str]:
    """The attributes every `gen_ai.*` span and metric of a generation carries (`operation`:
    "text_completion" for a prompt, "chat" for messages)."""
    attrs = {"gen_ai.operation.name": operation, "gen_ai.provider.name": GEN_AI_PROVIDER}
    if model:
        attrs["gen_ai.request.model"] = model
    return attrs


def error_type(error: BaseException) -> str:
    """The `error.type` of a failed generation: the gRPC status name the caller got
    ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "CANCELLED" for a client gone mid-stream, the
    code of an upstream's RpcError), or the exception's class for an unexpected error (which
    the caller sees as INTERNAL)."""
    if isinstance(error, EftMeshError):
        return error.code.name
    if isinstance(error, GeneratorExit):
        return "CANCELLED"
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        code = error.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
    cls = type(error)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def meter(provider: MeterProvider | None, name: str) -> Meter:
    """A meter from `provider`, or the API's no-op meter when metrics are off."""
    return (provider or metrics.NoOpMeterProvider()).get_meter(name)


def gauge_callback(read: Callable[[], float | int], **attributes: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """An observable instrument's callback that reports `read()` at each collection."""

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(read(), attributes)

    return callback


class CombinerMetrics:
    """What the combiner measures per generation and per upstream call."""

    def __init__(self, m: Meter) -> None:
        self.request_duration = m.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Generation time, from the request to its last token, by RPC and outcome "
                        "(refused requests included, with error.type)")
        self.time_to_first_token = m.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from the request to the first token, for successful generations")
        self.time_per_output_token = m.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token after the first, per successful generation")
        self.tokens = m.create_counter(
            "eftmesh.tokens", unit="{token}", description="Prompt (input) and generated (output) tokens")
        self.active = m.create_up_down_counter(
            "eftmesh.generations.active", unit="{generation}", description="Generations in flight")
        self.rejected = m.create_counter(
            "eftmesh.generations.rejected", unit="{generation}",
            description="Generations answered RESOURCE_EXHAUSTED, by rpc.method and eftmesh.reason: "
                        "concurrency_limit, queue_timeout, max_concurrent_rpcs, request_too_large, other")
        self.preempted = m.create_counter(
            "eftmesh.generations.preempted", unit="{generation}",
            description="Generations sent back to the queue because a logit service refused one of their items "
                        "RESOURCE_EXHAUSTED (a full KV cache, or a forward out of memory): their caches released, "
                        "re-prefilled after a back-off, by role")
        self.acceptance = m.create_histogram(
            "eftmesh.speculation.acceptance", unit="1",
            description="Share of drafted tokens kept, per speculative generation")
        self.drafts = m.create_counter(
            "eftmesh.speculation.drafts", unit="{token}",
            description="Drafted tokens, by draft role and eftmesh.speculation.position (1 = a block's first draft)")
        self.drafts_accepted = m.create_counter(
            "eftmesh.speculation.drafts.accepted", unit="{token}",
            description="Drafted tokens the target kept, by draft role and position: over eftmesh.speculation.drafts "
                        "at the same position, the share of blocks that drafted that far and kept that far")
        self.speculation_caps = m.create_counter(
            "eftmesh.speculation.steps", unit="{step}",
            description="Scheduler steps of load-aware (adaptive) generations, by the cap on k the speculation "
                        "controller chose (eftmesh.speculation.cap; 0 = no drafting)")
        self.upstream_duration = m.create_histogram(
            "eftmesh.upstream.duration", unit="s",
            description="One attempt of a call to a logit service, failed ones included (a re-sent call is "
                        "another attempt), by role, method and rpc.grpc.status_code")
        self.upstream_failovers = m.create_counter(
            "eftmesh.upstream.failovers", unit="{call}",
            description="Sessions moved to another replica of the role, by role, code and cause (error, timeout, health, drain)")
        self.upstream_stragglers = m.create_counter(
            "eftmesh.upstream.stragglers", unit="{generation}",
            description="Generations that sat a step out because their replica of the role had not answered "
                        "within --upstream-straggler-factor times the role's expected call, by role")
        self.upstream_bytes = m.create_counter(
            "eftmesh.upstream.received", unit="By", description="Row bytes received from logit services, by role")
        self.batch_size = m.create_histogram(
            "eftmesh.batch.size", unit="{generation}", description="Generations stepped together per scheduler step")
        self.queue_wait = m.create_histogram(
            "eftmesh.queue.duration", unit="s", description="Time a generation waited before its first step")


class LogitMetrics:
    """What a logit service measures per call; its session store and KV cache are observed at
    collection. Every instrument carries `eftmesh.role`.

    Saturation, per role (what its autoscaling reads):
    - `eftmesh.logit.queue.duration`: seconds a call waited for the engine (which runs one call
      at a time), from its arrival in the servicer to the engine starting it;
    - `eftmesh.logit.batch.occupancy`: items of a call over the engine's --max-batch (above 1
      when a call brings more items than one forward takes);
    - `eftmesh.logit.kv_tokens_used` against `eftmesh.logit.kv_tokens_capacity` (the pool's
      size in tokens, whole blocks), and their ratio `eftmesh.logit.kv_cache.usage` (0 to 1,
      vLLM's `kv_cache_usage_perc`), which the chart's autoscalers target: a share of the
      pool holds whichever flag sized it (tokens, bytes or a share of the card).

    Prefix caching (--prefix-cache), vLLM's figures: hit tokens over queried tokens is the hit
    rate; `prefix_cache(name)` reads the engine's counter `name` (lookups, queried_tokens,
    hit_tokens, evictions, blocks).
    """

    def __init__(self, m: Meter, role: str, sessions: Callable[[], int], evictions: Callable[[], int],
                 kv_tokens_used: Callable[[], int] = lambda: 0, kv_tokens_capacity: Callable[[], int] = lambda: 0,
                 prefix_cache: Callable[[str], int] = lambda name: 0) -> None:
        self.role = role
        self.duration = m.create_histogram(
            "eftmesh.logit.duration", unit="s", description="Score and Draft calls, forward passes included")
        self.tokens = m.create_counter(
            "eftmesh.logit.tokens", unit="{token}", description="Tokens run through the model (prefill and decode)")
        self.queue_wait = m.create_histogram(
            "eftmesh.logit.queue.duration", unit="s",
            description="Time a call waited for the engine (one call runs at a time), from its arrival to its start",
            explicit_bucket_boundaries_advisory=_SECONDS)
        self.batch_occupancy = m.create_histogram(
            "eftmesh.logit.batch.occupancy", unit="1",
            description="Items of a call over the engine's --max-batch (a lone Score or Draft is one item)",
            explicit_bucket_boundaries_advisory=_OCCUPANCY)
        m.create_observable_gauge("eftmesh.logit.sessions", [gauge_callback(sessions, **{"eftmesh.role": role})],
                                  unit="{session}", description="KV caches held")
        m.create_observable_counter("eftmesh.logit.evictions", [gauge_callback(evictions, **{"eftmesh.role": role})],
                                    unit="{session}", description="KV caches evicted for room (--max-sessions, --kv-cache-tokens)")
        m.create_observable_gauge("eftmesh.logit.kv_tokens_used", [gauge_callback(kv_tokens_used, **{"eftmesh.role": role})],
                                  unit="{token}", description="KV cache tokens held by sessions (whole blocks), of --kv-cache-tokens")
        m.create_observable_gauge("eftmesh.logit.kv_tokens_capacity",
                                  [gauge_callback(kv_tokens_capacity, **{"eftmesh.role": role})],
                                  unit="{token}", description="KV cache tokens the pool holds (--kv-cache-tokens in whole blocks)")

        def usage() -> float:
            capacity = kv_tokens_capacity()
            return kv_tokens_used() / capacity if capacity else 0.0

        m.create_observable_gauge("eftmesh.logit.kv_cache.usage", [gauge_callback(usage, **{"eftmesh.role": role})],
                                  unit="1", description="KV cache tokens held over the pool's (0 to 1): what autoscaling targets")

        def read(name: str) -> list[Callable[[CallbackOptions], Iterable[Observation]]]:
            return [gauge_callback(lambda: prefix_cache(name), **{"eftmesh.role": role})]

        m.create_observable_counter("eftmesh.logit.prefix_cache.lookups", read("lookups"), unit="{lookup}",
                                    description="Prefix cache lookups: items at a block boundary that could take cached blocks")
        m.create_observable_counter("eftmesh.logit.prefix_cache.queried_tokens", read("queried_tokens"), unit="{token}",
                                    description="Tokens the prefix cache lookups could have matched")
        m.create_observable_counter("eftmesh.logit.prefix_cache.hit_tokens", read("hit_tokens"), unit="{token}",
                                    description="Tokens taken from the prefix cache instead of run (over queried_tokens: the hit rate)")
        m.create_observable_counter("eftmesh.logit.prefix_cache.evictions", read("evictions"), unit="{block}",
                                    description="Unused cached blocks evicted for room (before any session is)")
        m.create_observable_gauge("eftmesh.logit.prefix_cache.blocks", read("blocks"), unit="{block}",
                                  description="Full KV blocks the prefix cache holds (shared or idle)")


class RefusalCounter(grpc.ServerInterceptor):
    """Counts in `rejected` the generations gRPC itself refuses, before any servicer code runs:
    over the server's `maximum_concurrent_rpcs` (reason "max_concurrent_rpcs") and requests
    whose message never reached the servicer (reason "request_too_large": larger than
    `grpc.max_receive_message_length`, or, rarely, a client gone before its request arrived).
    The servicer counts the refusals it makes itself.

    How it sees them: grpc's Python server looks up a call's handler (running the interceptors)
    and decides, under its lock and in its one polling thread, whether the call is over the
    limit; accepted calls go to the worker pool right away. So the count of in-flight calls
    read here (grpcio's private `_state.active_rpc_count`: grpcio is pinned, and
    tests/combiner/test_rejections.py fails if that moves) is the one the server decides on,
    and a call is over the limit exactly when that count is at the limit; an accepted call is handed from here to `executor`'s `submit`, whose
    task learns at its end whether the request's deserializer ever ran. Pass `executor` as the
    server's thread pool and `attach` the server once built.
    """

    def __init__(self, rejected: Counter, methods: Mapping[str, str]) -> None:
        """`methods`: full method name ("/eftmesh.v1.Generator/Generate") -> its rpc.method."""
        self._rejected = rejected
        self._methods = dict(methods)
        self._state: Any = None
        self._pending: _Call | None = None  # touched only by grpc's polling thread, under its lock

    def attach(self, server: grpc.Server) -> None:
        self._state = getattr(server, "_state", None)
        if self._state is None or not hasattr(self._state, "active_rpc_count"):
            log.warning("this grpcio hides its in-flight call count: --max-concurrent-rpcs refusals go uncounted")

    def executor(self, **kwargs: Any) -> futures.ThreadPoolExecutor:
        """The server's worker pool (ThreadPoolExecutor's arguments)."""
        return _CountingExecutor(self, **kwargs)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        self._pending = None
        method = self._methods.get(handler_call_details.method)
        if handler is None or method is None:
            return handler
        state = self._state
        limit = getattr(state, "maximum_concurrent_rpcs", None)
        if limit is not None and getattr(state, "active_rpc_count", 0) >= limit:
            self._rejected.add(1, {"rpc.method": method, "eftmesh.reason": "max_concurrent_rpcs"})
            return handler
        call = self._pending = _Call(method)
        inner = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            call.read = True
            return data if inner is None else inner(data)

        return handler._replace(request_deserializer=deserialize)

    def _take(self) -> _Call | None:
        call, self._pending = self._pending, None
        return call

    def _finished(self, call: _Call) -> None:
        if not call.read:
            self._rejected.add(1, {"rpc.method": call.method, "eftmesh.reason": "request_too_large"})


class _Call:
    __slots__ = ("method", "read")

    def __init__(self, method: str) -> None:
        self.method = method
        self.read = False


class _CountingExecutor(futures.ThreadPoolExecutor):
    """A worker pool that tells a `RefusalCounter` when an accepted call's task has ended."""

    def __init__(self, counter: RefusalCounter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._counter = counter

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        call = self._counter._take()
        if call is None:
            return super().submit(fn, *args, **kwargs)

        def task() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self._counter._finished(call)

        return super().submit(task)
