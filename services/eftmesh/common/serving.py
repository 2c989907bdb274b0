"""What every eftmesh gRPC server shares: interceptors, health, reflection, graceful stop.

Health is answered twice, from one `HealthServicer` (so both always agree): on the main port,
for clients such as grpcurl, and on a health port of its own, served by a second small gRPC
server with its own threads and no concurrency limit. The main port's `maximum_concurrent_rpcs`
and worker threads are shared with the real calls, so a saturated server answers health
there with RESOURCE_EXHAUSTED or late; the health port cannot be starved that way, and it is
the one Kubernetes' gRPC probes should use.
"""

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
from eftmesh.common.tls import ServerTLS

log = logging.getLogger(__name__)

# Messages carry [rows, vocab] float32 blocks: 64 MiB allows 16 rows of a 1M vocabulary.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# Where the health port goes when not given: the main port plus this (50051 -> 51051).
HEALTH_PORT_OFFSET = 1000
# The health service name liveness probes ask: SERVING while the process answers, whatever the
# overall status ("" goes NOT_SERVING when, e.g., a combiner has no live replica of a role: a
# restart would not bring that replica back). It follows a drain to NOT_SERVING like every name.
LIVENESS_SERVICE = "liveness"

# Threads of the health-only server: a Check takes microseconds and Watch does not hold one.
HEALTH_WORKERS = 2


@dataclass(frozen=True)
class ServerConfig:
    """Network and concurrency settings of one gRPC server.

    `health_port`: the port of the health-only server. None (the default): the main port +
    HEALTH_PORT_OFFSET (a free port when the main port is 0, or when that one is taken, with
    a warning); 0: a free port; a negative value: no health-only server (health on the main
    port only).
    """

    host: str = "0.0.0.0"
    port: int = 50051
    workers: int = 16
    max_concurrent_rpcs: int = 64
    grace_s: float = 20.0
    health_port: int | None = None
    # Extra gRPC server options of the main server, e.g. grpc.max_connection_age_ms.
    options: tuple[tuple[str, int | str], ...] = ()
    # TLS (mTLS with a client CA) on the main port; None: plaintext. The health-only port
    # stays plaintext: kubelet gRPC probes cannot speak TLS, and it serves health alone.
    tls: ServerTLS | None = None
    # Server reflection (what grpcurl and ghz use to find the API without proto files);
    # --no-reflection turns it off.
    reflection: bool = True

    def resolved_health_port(self) -> int | None:
        """The port to bind the health-only server on (0: any free one); None: no such server."""
        if self.health_port is None:
            return self.port + HEALTH_PORT_OFFSET if 0 < self.port <= 65535 - HEALTH_PORT_OFFSET else 0
        return None if self.health_port < 0 else self.health_port


def health_port_arg(value: str) -> int | None:
    """argparse type of `--health-port`: a port number, 0 (a free port), or "off"."""
    return -1 if value.strip().lower() in {"off", "none", "-1"} else int(value)


HEALTH_PORT_HELP = (
    "port of a health-only gRPC server (grpc.health.v1 alone, its own threads, outside "
    "--max-concurrent-rpcs) for Kubernetes gRPC probes; 0 picks a free one, 'off' disables it "
    f"(default: --port + {HEALTH_PORT_OFFSET}, a free one when --port is 0). "
    "Health is also served on --port"
)


class Server:
    """A gRPC server with health, reflection and the shared interceptors, and a health-only
    server on its own port (`health_port`; None when disabled) sharing the same health state.

    Health starts NOT_SERVING; call `set_serving()` once the service can do real work.
    """

    def __init__(
        self,
        cfg: ServerConfig,
        register: Iterable[Callable[[grpc.Server], None]],
        service_names: Iterable[str],
        tracer_provider: TracerProvider | None = None,
        interceptors: Iterable[grpc.ServerInterceptor] = (),
        executor: Callable[..., futures.ThreadPoolExecutor] = futures.ThreadPoolExecutor,
    ) -> None:
        """`interceptors`: more server interceptors (e.g. `auth.BearerTokenInterceptor`), run
        after tracing and before the error mapping, so that a refused call never reaches it.
        `executor`: builds the worker pool (e.g. `metrics.RefusalCounter.executor`)."""
        self.cfg = cfg
        self._names = list(service_names)
        self.signalled = threading.Event()
        interceptors = [*tracing.server_interceptors(tracer_provider), *interceptors, ErrorMappingInterceptor()]
        self.grpc = grpc.server(
            executor(max_workers=cfg.workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            # cfg.options override the defaults (gRPC keeps the first of duplicate keys).
            options=list({**dict(CHANNEL_OPTIONS), **dict(cfg.options)}.items()),
            # Over this many in-flight RPCs, new ones get RESOURCE_EXHAUSTED at once.
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        for reg in register:
            reg(self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if cfg.reflection:
            reflection.enable_server_reflection(
                [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
            )
        self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _bind(self.grpc, cfg.host, cfg.port, "--port",
                          cfg.tls.credentials() if cfg.tls is not None else None)
        self.health_grpc: grpc.Server | None = None
        self.health_port: int | None = None
        want = cfg.resolved_health_port()
        if want is not None:
            # No interceptors (health stays out of traces), no concurrency limit: a probe is
            # never refused for load, and its own threads are never busy with a Score.
            self.health_grpc = grpc.server(
                futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix="health"),
                # Only the error mapping: malformed bytes get INVALID_ARGUMENT here too.
                interceptors=[ErrorMappingInterceptor()],
                # No port sharing: two processes' probes must never answer for one another.
                options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            try:
                self.health_port = _bind(self.health_grpc, cfg.host, want, "--health-port")
            except OSError:
                if cfg.health_port is not None or want == 0:
                    raise
                # Only the derived default may move: a port given explicitly is where probes look.
                log.warning("health port %d (--port + %d) is taken: serving health on a free port instead",
                            want, HEALTH_PORT_OFFSET)
                self.health_port = _bind(self.health_grpc, cfg.host, 0, "--health-port")

    def _set_all(self, status: int) -> None:
        for name in ["", *self._names]:
            self.health.set(name, status)

    def start(self) -> None:
        if self.health_grpc is not None:
            self.health_grpc.start()
        self.grpc.start()
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s:%d (%s; health also on port %s, plaintext)", self.cfg.host, self.port,
                 self.cfg.tls.describe() if self.cfg.tls is not None else "plaintext", self.health_port)

    def set_serving(self) -> None:
        self._set_all(health_pb2.HealthCheckResponse.SERVING)

    def set_health(self, serving: bool) -> None:
        """SERVING or NOT_SERVING on both ports, reversibly (after a drain or stop began, the
        health servicer ignores this and stays NOT_SERVING)."""
        self._set_all(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    def set_not_serving(self) -> None:
        """Health NOT_SERVING on both ports, for good (nothing can set SERVING again): the
        start of a drain, while calls are still taken."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace_s: float | None = None) -> threading.Event:
        """Stop taking calls (health NOT_SERVING) and drain in-flight ones within the grace.

        The health port keeps answering (NOT_SERVING) until the main server has stopped, so
        that probes see a draining pod, not a dead one; the event is set once both have."""
        self.set_not_serving()
        main = self.grpc.stop(self.cfg.grace_s if grace_s is None else grace_s)
        side = self.health_grpc
        if side is None:
            return main
        done = threading.Event()

        def wait_both() -> None:
            main.wait()
            side.stop(0).wait()
            done.set()

        threading.Thread(target=wait_both, name="server-stop", daemon=True).start()
        return done

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to a graceful stop. Call before `start`, so that a signal
        that arrives while the model warms up still drains instead of killing the process."""

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: draining for up to %.0f s", signum, self.cfg.grace_s)
            self.signalled.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait_for_signal(self) -> None:
        """Block until SIGTERM or SIGINT, then drain and stop."""
        self.signalled.wait()
        self.stop().wait()
        log.info("stopped")


def _bind(server: grpc.Server, host: str, port: int, flag: str,
          credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind a port, TLS with `credentials`, else plaintext; the bound port (0 picks a free one)."""
    try:
        address = f"{host}:{port}"
        bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError as e:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot bind {host}:{port} ({flag}): {e}") from None
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port} ({flag})")
    return bound


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
