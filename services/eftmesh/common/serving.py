"""What every eftmesh gRPC server shares: interceptors, health, reflection, graceful stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.common import tracing
from eftmesh.common.interceptor import ErrorMappingInterceptor

log = logging.getLogger(__name__)

# Messages carry [rows, vocab] float32 blocks: 64 MiB allows 16 rows of a 1M vocabulary.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class ServerConfig:
    """Network and concurrency settings of one gRPC server."""

    host: str = "0.0.0.0"
    port: int = 50051
    workers: int = 16
    max_concurrent_rpcs: int = 64
    grace_s: float = 20.0


class Server:
    """A gRPC server with health, reflection and the shared interceptors.

    Health starts NOT_SERVING; call `set_serving()` once the service can do real work.
    """

    def __init__(
        self,
        cfg: ServerConfig,
        register: Iterable[Callable[[grpc.Server], None]],
        service_names: Iterable[str],
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.cfg = cfg
        self._names = list(service_names)
        self._signalled = threading.Event()
        interceptors = [*tracing.server_interceptors(tracer_provider), ErrorMappingInterceptor()]
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=CHANNEL_OPTIONS,
            # Over this many in-flight RPCs, new ones get RESOURCE_EXHAUSTED at once.
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        for reg in register:
            reg(self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
        )
        self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {cfg.host}:{cfg.port}")

    def _set_all(self, status: int) -> None:
        for name in ["", *self._names]:
            self.health.set(name, status)

    def start(self) -> None:
        self.grpc.start()
        log.info("listening on %s:%d", self.cfg.host, self.port)

    def set_serving(self) -> None:
        self._set_all(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float | None = None) -> threading.Event:
        """Stop taking calls (health NOT_SERVING) and drain in-flight ones within the grace."""
        self.health.enter_graceful_shutdown()
        return self.grpc.stop(self.cfg.grace_s if grace_s is None else grace_s)

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to a graceful stop. Call before `start`, so that a signal
        that arrives while the model warms up still drains instead of killing the process."""

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: draining for up to %.0f s", signum, self.cfg.grace_s)
            self._signalled.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait_for_signal(self) -> None:
        """Block until SIGTERM or SIGINT, then drain and stop."""
        self._signalled.wait()
        self.stop().wait()
        log.info("stopped")


def exit_now(tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None = None) -> None:
    """Flush spans, metrics and logs, then leave without interpreter teardown.

    After the drain there is nothing left to clean up, and tearing down an interpreter with
    torch loaded takes seconds: a pod's termination should not wait for that.
    """
    if tracer_provider is not None:
        tracer_provider.shutdown()
    if meter_provider is not None:
        meter_provider.shutdown(timeout_millis=5000)
    logging.shutdown()
    os._exit(0)
