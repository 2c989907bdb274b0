"""OpenTelemetry set-up, done once at a service's entry point.

Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
variable) is set; the exporter reads the standard `OTEL_*` variables itself. When neither is
set and no exporter is given, no tracer provider is created and no interceptor is installed:
tracing then costs nothing on the hot path.

Health checks (/grpc.health.v1.Health/*: kubelet probes every few seconds, the combiner's
watches of its upstreams) and server reflection (/grpc.reflection.*: grpcurl, ghz) are kept
out of traces on both sides: they would drown the generations in noise and cost a span each.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import client_interceptor, filters, intercept_channel, server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

OTLP_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

# gRPC services whose calls are never traced (service-name prefixes, as in the method path).
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


# The instrumentation's filter: True means "trace this call".
_FILTER = filters.negate(filters.any_of(*(filters.service_prefix(p) for p in UNTRACED_SERVICES)))


def otlp_requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for OTLP export."""
    return any(environ.get(k) for k in OTLP_ENV)


def make_tracer_provider(
    service_name: str, *, otlp: bool, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """A provider for one service, or None when tracing is off.

    Args:
        service_name: the `service.name` resource attribute, e.g. "eftmesh-logit-base-large".
        otlp: export over OTLP/gRPC (endpoint and headers from the OTEL_* variables).
        exporter: an extra exporter, exported synchronously (tests use an in-memory one).
    """
    if not otlp and exporter is None:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def server_interceptors(provider: TracerProvider | None) -> list[grpc.ServerInterceptor]:
    """The OpenTelemetry server interceptor (health and reflection calls left out), or nothing
    when tracing is off."""
    return [] if provider is None else [server_interceptor(tracer_provider=provider, filter_=_FILTER)]


def traced_channel(channel: grpc.Channel, provider: TracerProvider | None) -> grpc.Channel:
    """Wrap a client channel so that calls are traced and carry the trace context."""
    if provider is None:
        return channel
    # OpenTelemetry's own channel wrapper: unlike grpc.intercept_channel it traces .future() calls.
    return intercept_channel(channel, client_interceptor(tracer_provider=provider, filter_=_FILTER))


def tracer(provider: TracerProvider | None, name: str) -> trace.Tracer:
    """A tracer from `provider`, or the no-op tracer when tracing is off."""
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(name)
