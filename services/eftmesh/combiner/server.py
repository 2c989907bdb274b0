"""Entry point of the combiner: `python -m eftmesh.combiner --upstream ROLE=HOST:PORT ...`.

Flags are parsed once into a frozen `CombinerConfig`. At start the combiner opens its port with
gRPC health NOT_SERVING and waits for its upstreams with no deadline (by default), logging which
it still waits for; requests meanwhile fail UNAVAILABLE at once, naming the missing roles. Each
upstream, once it answers, must share the combiner's tokenizer (fingerprint) and cover its
vocabulary: a mismatch is a refusal to start (exit code 2), naming the models that differ and
what differs. --max-k is capped to the upstreams' smallest, with a warning, so that no request
fails for a limit of the logit services. Health is SERVING while every role has a live replica.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner import compositions
from eftmesh.combiner.decoder import Decoder
from eftmesh.combiner.scheduler import SchedulerConfig
from eftmesh.combiner.convert import Defaults, SpeculationDefaults
from eftmesh.combiner.servicer import GeneratorServicer
from eftmesh.combiner.replicas import parse_target
from eftmesh.combiner.scoring import BlockCap, ModelSpec, check_compatible
from eftmesh.combiner.deadlines import DeadlinePolicy
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.combiner.upstream import GrpcScorer
from eftmesh.common import auth, convert, cpus, loading, memory, metrics, tls, tracing
from eftmesh.common.errors import EftMeshError
from eftmesh.common.serving import HEALTH_PORT_HELP, Server, ServerConfig, exit_now, health_port_arg
from eftmesh.common.tls import ServerTLS
from eftmesh.common.tokenizer import fingerprint
from eftmesh.core import fused, fusedrows
from eftmesh.core.mixing import Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

if TYPE_CHECKING:
    from eftmesh.combiner.http import HttpServer

log = logging.getLogger("eftmesh.combiner")

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
DEFAULT_COMPOSITION = Composition("base-large", (Delta("ft-small", "base-small", 1.0),))


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP API's settings (flags --http-port, --http-host; TLS, tokens and the request
    size limit are the gRPC port's)."""

    host: str = "0.0.0.0"
    port: int = 8000
    tls: ServerTLS | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    max_in_flight: int = 256  # requests at once (gRPC's --max-concurrent-rpcs); more get 429
    grace_s: float = 30.0


@dataclass(frozen=True)
class CombinerConfig:
    """Everything the combiner needs, fixed at start-up."""

    upstreams: dict[str, str]
    tokenizer: str
    defaults: Defaults
    server: ServerConfig
    policy: UpstreamPolicy = UpstreamPolicy()
    max_concurrent_generations: int = 64
    scheduler: SchedulerConfig = SchedulerConfig()
    otlp: bool = False
    otlp_metrics: bool = False
    metrics_port: int | None = None
    # Clients' connections are closed (GOAWAY) after this long, so that long-lived clients
    # spread again over combiner pods; 0 = never.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 30.0
    # Largest request a client may send: a prompt and its settings, not rows (those travel
    # between combiner and logit services under their own 64 MiB limit). Over it gRPC answers
    # RESOURCE_EXHAUSTED before anything is read.
    max_request_bytes: int = 4 * 1024 * 1024
    # gRPC server reflection on the main port (grpcurl without .proto files).
    reflection: bool = True
    # Bearer tokens required on the Generator API (one per line, re-read on change); None: open.
    auth_tokens_file: str | None = None
    # --tokenizer-revision: the revision of a hub id --tokenizer.
    tokenizer_revision: str | None = None
    # The compiled kernels' threads (--threads; torch then keeps one intra-op thread); None leaves
    # torch's default and the kernels on the calling thread (in-process builds: tests, benchmarks).
    threads: int | None = None
    # The OpenAI-compatible HTTP API (--http-port); None: off.
    http: HttpConfig | None = None


def _upstream(text: str) -> tuple[str, str]:
    role, sep, addr = text.partition("=")
    if not sep or not role or ":" not in addr:
        raise argparse.ArgumentTypeError(f"expected ROLE=HOST:PORT, got {text!r}")
    try:
        parse_target(addr)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{role}: {e}") from None
    return role, addr


def _delta(text: str) -> Delta:
    parts = text.split(",")
    try:
        tuned, ref, weight = parts[0], parts[1], float(parts[2]) if len(parts) > 2 else 1.0
        return Delta(tuned, ref, weight)
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"expected TUNED,REFERENCE[,WEIGHT], got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> CombinerConfig:
    p = argparse.ArgumentParser(
        prog="eftmesh-combiner",
        description="Mix logit services by the EFT formula and serve generations (eftmesh.v1.Generator).",
    )
    p.add_argument("--upstream", type=_upstream, action="append", required=True, metavar="ROLE=HOST:PORT", help="a logit service and the role it plays; repeat once per role. The target may list replicas (HOST:PORT,HOST:PORT) or be dns:///NAME:PORT (every address NAME resolves to, e.g. a headless Service) or k8s:///SERVICE.NAMESPACE:PORT (the Service's EndpointSlices, watched through the Kubernetes API): each session then stays on one replica")
    p.add_argument("--tokenizer", required=True,
                   help="the tokenizer every model shares: a checkpoint or tokenizer folder, a .gguf file (needs pip "
                        "install 'eftmesh[real-models]') or a hub id, e.g. one logit service's --model")
    p.add_argument("--tokenizer-revision", "--revision", dest="tokenizer_revision", default=None,
                   help="with a hub id --tokenizer: the branch, tag or commit to load (default: main)")
    p.add_argument("--default-base", default=DEFAULT_COMPOSITION.base, help="base role of the default composition (default: %(default)s)")
    p.add_argument("--default-delta", type=_delta, action="append", metavar="TUNED,REFERENCE[,WEIGHT]", help="a delta of the default composition; repeatable (default: ft-small,base-small,1.0)")
    p.add_argument("--no-default-delta", action="store_true", help="the default composition is plain decoding of --default-base")
    p.add_argument("--temperature", type=float, default=1.0, help="default sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="default top-k; 0 disables (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="default top-p; the EFT paper found 0.9-0.95 stabilises up-scaling (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default max_new_tokens (default: %(default)s)")
    p.add_argument("--max-new-tokens-cap", type=int, default=1024, help="largest max_new_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--speculation", default="adaptive", choices=["off", "fixed", "adaptive"], help="default speculative mode: draft with the first delta's tuned model and verify with the rest (default: %(default)s)")
    p.add_argument("--k", type=int, default=4, help="k, the tokens drafted per block, in fixed mode (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=16, help="largest k a request may ask for, and adaptive mode's cap (default: %(default)s)")
    p.add_argument("--draft-cost-ratio", type=float, default=0.1, help="adaptive mode's c: one draft token's cost over one verify step; make bench measures it (default: %(default)s)")
    p.add_argument("--max-concurrent-generations", type=int, default=64, help="generations accepted at once, running or queued; more get RESOURCE_EXHAUSTED at once (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, help="generations stepped together (continuous batching); the rest of --max-concurrent-generations wait in the queue (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens admitted into the batch per step, so a joining prompt stalls the running generations little; "
                        "a prompt counts only the tokens the logit services' prefix caches likely do not hold (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=2048, metavar="TOKENS",
                   help="most tokens one generation sends a logit service per step: a longer prompt (or re-prefill) runs "
                        "in pieces of this many tokens, one per step, beside the running generations' decode steps, so "
                        "it delays them by a piece per step instead of by its whole prefill (chunked prefill, vLLM's and "
                        "SGLang's default; the same output); 0: every prompt in one step (default: %(default)s)")
    p.add_argument("--no-prefill-first", dest="prefill_first", action="store_false", help="run a newcomer's prefill beside the running generations' decode step (vLLM V1's policy) instead of in a step of its own before it (vLLM V0's, TGI's): the running streams never wait a step for an arrival (smoother inter-token latency; speculative streams, which finish apart, lose fewer steps), and the newcomer's first token waits for the batch's step too (longer TTFT). Measured in docs/benchmarks.md (default: prefill first on)")
    p.add_argument("--stream-interval", type=int, default=1, metavar="TOKENS",
                   help="a streaming generation's tokens go out this many at a time (the first and the last at once); "
                        "each message costs the combiner ~0.15-0.2 ms of CPU, so at many concurrent streams a larger "
                        "interval buys throughput for burstier streams (vLLM's and SGLang's --stream-interval) "
                        "(default: %(default)s: every step)")
    p.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a generation may wait for a batch slot or KV cache room before RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--call-timeout", type=float, default=30.0, help="the longest one upstream call may take; past it a role with no other live replica fails UNAVAILABLE (default: %(default)s)")
    p.add_argument("--upstream-deadline-margin", type=float, default=10.0,
                   help="a call to a replica is given up on after this many times what the role's calls take (per call, "
                        "and per token for long prompts), and its sessions move to another live replica of the role "
                        "(re-prefilled there); only while such a replica exists (default: %(default)s)")
    p.add_argument("--upstream-deadline-floor", type=float, default=1.0,
                   help="the shortest such derived deadline, in seconds (default: %(default)s)")
    p.add_argument("--upstream-straggler-factor", type=float, default=2.0,
                   help="a step stops waiting for a replica's call after this many times what the role's calls take "
                        "(at least 20 ms) and goes on without that call's generations, which sit the step out until "
                        "the call answers or is given up on; only while another live replica of the role exists "
                        "(default: %(default)s)")
    p.add_argument("--prefix-routing-slack", type=int, default=8, metavar="N",
                   help="prefix-aware routing over a role's replicas: a new generation goes to the replica its prompt's "
                        "first 64 tokens hash to (rendezvous hashing over the live replicas, so every combiner agrees), "
                        "where its shared system prompt or conversation history is likely cached, unless that replica "
                        "holds more than N sessions beyond the least loaded one; -1 turns it off (least loaded only) "
                        "(default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="retries of an upstream call after UNAVAILABLE (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; OTLP metrics follow OTEL_EXPORTER_OTLP_ENDPOINT)")
    p.add_argument("--resolve-interval", type=float, default=5.0, help="seconds between resolutions of dns:/// upstream targets, which find new and gone replicas (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=0.0, help="seconds to wait at start for every upstream to answer before exiting with code 2; 0 = wait forever. Meanwhile the port is open, health NOT_SERVING, and requests get UNAVAILABLE (default: %(default)s)")
    p.add_argument("--max-connection-age", type=float, default=300.0, help="seconds after which a client's connection is closed (GOAWAY, in-flight calls get --max-connection-age-grace to finish) so long-lived clients rebalance over combiner pods; 0 = never (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="largest request message a client may send; larger ones get RESOURCE_EXHAUSTED before they are read (default: %(default)s)")
    p.add_argument("--max-connection-age-grace", type=float, default=30.0, help="seconds in-flight calls of a connection closed by --max-connection-age may still take (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50050, help="port to bind; 0 picks a free one (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=None, help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health/ready) on this port, with the same TLS certificate, bearer tokens, --max-request-bytes and admission control as gRPC; 0 picks a free one (default: off)")
    p.add_argument("--http-host", default=None, help="address the HTTP API binds (default: --host)")
    p.add_argument("--composition", action="append", default=[], metavar="NAME=SPEC",
                   help="a named composition, usable by name from both APIs (gRPC Composition.name, HTTP model) and listed by GET /v1/models, "
                        "e.g. helpful=base-large+1.0*(ft-small-base-small); SPEC is BASE[(+|-)[WEIGHT*](TUNED-REFERENCE)...]; repeatable "
                        "(grammar: docs/api.md)")
    p.add_argument("--health-port", type=health_port_arg, default=None, help=HEALTH_PORT_HELP)
    p.add_argument("--no-reflection", dest="reflection", action="store_false", help="do not serve gRPC server reflection (on by default, so grpcurl works without .proto files; it only lists the services and their messages)")
    tls.add_server_args(p, client_ca=False)
    tls.add_client_args(p, prefix="upstream", what="the logit services")
    p.add_argument("--auth-tokens-file", default=None, metavar="FILE", help="require 'authorization: Bearer <token>' on the Generator API, the token one of this file's lines (several at once for rotation; re-read when it changes); health and reflection stay open (default: no authentication)")
    p.add_argument("--workers", type=int, default=None, help="gRPC worker threads; each streaming generation holds one, so there must be more than --max-concurrent-generations for overload to be refused at once rather than queued (default: --max-concurrent-generations + 32)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256, help="in-flight RPCs before new ones get RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for in-flight generations (default: %(default)s)")
    p.add_argument("--threads", type=cpus.threads_arg(cpus.MIXING_THREADS_CAP), default="auto",
                   help="threads the compiled kernels share each step's rows among (the mix, draws, verification; "
                        "threads that wait, not spin; torch keeps one intra-op thread); auto: the CPUs this process may "
                        f"use (affinity, cgroup quota), at most {cpus.MIXING_THREADS_CAP} (128k vocabulary, 16 streams, "
                        "k = 4, 2 vCPUs shared with the logit services: 1 -> 2 threads took 0.35-0.45 -> 0.23-0.28 ms "
                        "per token; docs/configuration.md) (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        deadlines = DeadlinePolicy(a.upstream_deadline_margin, a.upstream_deadline_floor, a.call_timeout,
                                   straggler_factor=a.upstream_straggler_factor)
    except ValueError as e:
        p.error(str(e))
    if len(upstreams := dict(a.upstream)) != len(a.upstream):
        p.error("each role may be given once in --upstream")
    deltas = () if a.no_default_delta else tuple(a.default_delta or DEFAULT_COMPOSITION.deltas)
    try:
        composition = Composition(a.default_base, deltas)
        # float32, as the wire carries it (every request's settings are; a drafter's cut is reused only so)
        sampling = convert.sampling_from_pb(convert.sampling_to_pb(SamplingConfig(a.temperature, a.top_k, a.top_p)), SamplingConfig())
        speculation = SpeculationDefaults(a.speculation, a.k, a.max_k, a.draft_cost_ratio)
    except ValueError as e:
        p.error(str(e))
    named: dict[str, Composition] = {}
    for text in a.composition:
        try:
            name, comp = compositions.parse_named(text, upstreams)
        except ValueError as e:
            p.error(f"--composition: {e}")
        if name in named:
            p.error(f"--composition: {name!r} is given twice")
        named[name] = comp
    missing = [r for r in composition.roles if r not in upstreams]
    if missing:
        p.error(f"the default composition ({composition.describe()}) needs roles with no --upstream: {', '.join(missing)}")
    workers = a.workers if a.workers is not None else a.max_concurrent_generations + 32
    if workers <= a.max_concurrent_generations:
        p.error("--workers must exceed --max-concurrent-generations: a request past the limit needs a free "
                "worker to be refused with RESOURCE_EXHAUSTED, or it waits in gRPC's queue instead")
    if a.max_batch < 1 or a.prefill_tokens < 1 or not a.queue_timeout > 0 or a.max_request_bytes < 1024:
        p.error("--max-batch and --prefill-tokens must be >= 1, --queue-timeout > 0, --max-request-bytes >= 1024")
    if a.stream_interval < 1:
        p.error(f"--stream-interval must be >= 1 (tokens), got {a.stream_interval}")
    if a.prefill_chunk < 0:
        p.error(f"--prefill-chunk must be >= 0 (0: off), got {a.prefill_chunk}")
    if not 1 <= a.max_new_tokens <= a.max_new_tokens_cap:
        p.error("--max-new-tokens must be in [1, --max-new-tokens-cap]")
    if a.prefix_routing_slack < -1:
        p.error(f"--prefix-routing-slack must be >= 0 (sessions), or -1 to turn prefix-aware routing off; "
                f"got {a.prefix_routing_slack}")
    if a.connect_timeout < 0 or a.max_connection_age < 0 or a.max_connection_age_grace < 0:
        p.error("--connect-timeout, --max-connection-age and --max-connection-age-grace must be >= 0 (0 = off)")
    env = os.environ if environ is None else environ
    return CombinerConfig(
        upstreams=upstreams,
        tokenizer=a.tokenizer,
        defaults=Defaults(composition, sampling, a.max_new_tokens, a.max_new_tokens_cap, speculation, named),
        server=ServerConfig(host=a.host, port=a.port, workers=workers, max_concurrent_rpcs=a.max_concurrent_rpcs, grace_s=a.grace,
                            health_port=a.health_port, tls=tls.server_from_args(p, a)),
        policy=UpstreamPolicy(deadlines=deadlines, retries=a.retries, connect_timeout_s=a.connect_timeout,
                              resolve_interval_s=a.resolve_interval, tls=tls.client_from_args(p, a, "upstream"),
                              prefix_slack=None if a.prefix_routing_slack < 0 else a.prefix_routing_slack),
        max_concurrent_generations=a.max_concurrent_generations,
        scheduler=SchedulerConfig(max_batch=a.max_batch, prefill_tokens=a.prefill_tokens, prefill_chunk=a.prefill_chunk,
                                  queue_timeout_s=a.queue_timeout, stream_interval=a.stream_interval, prefill_first=a.prefill_first),
        otlp=tracing.otlp_requested(env),
        otlp_metrics=metrics.otlp_requested(env),
        metrics_port=a.metrics_port,
        max_connection_age_s=a.max_connection_age,
        max_connection_age_grace_s=a.max_connection_age_grace,
        max_request_bytes=a.max_request_bytes,
        reflection=a.reflection,
        auth_tokens_file=a.auth_tokens_file,
        tokenizer_revision=a.tokenizer_revision,
        threads=a.threads,
        http=None if a.http_port is None else HttpConfig(
            host=a.http_host or a.host, port=a.http_port, tls=tls.server_from_args(p, a),
            max_request_bytes=a.max_request_bytes, max_in_flight=a.max_concurrent_rpcs, grace_s=a.grace),
    )


def connection_age_options(age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """gRPC server options that close each client connection after `age_s` (0 = never)."""
    if age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace_s * 1000))]


@dataclass
class CombinerServer:
    """A built combiner: the gRPC server, the decoder, and its upstream connections."""

    server: Server
    decoder: Decoder
    scorer: GrpcScorer
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    check: Callable[[Mapping[str, ModelSpec]], None] = lambda models: None
    servicer: GeneratorServicer | None = None
    http: HttpServer | None = None  # eftmesh.combiner.http.HttpServer, with --http-port

    def start(self, on_fatal: Callable[[EftMeshError], None] | None = None) -> None:
        """Open the port (health NOT_SERVING), try every upstream once, and go on waiting for
        the missing ones in the background; health follows "every role has a live replica".
        A model that does not fit (tokenizer, vocabulary) raises here if it answered at once,
        else `on_fatal(err)` is called when it does (the server stays NOT_SERVING)."""
        self.server.start()
        if self.http is not None:
            self.http.start()
        try:
            self.scorer.start(self.check, on_health=self._set_health, on_fatal=on_fatal)
        except BaseException:
            self.stop(0)
            raise

    def _set_health(self, serving: bool) -> None:
        self.server.set_health(serving)

    def wait_serving(self, timeout: float | None = None) -> bool:
        """Wait until every role has a live replica; False if `timeout` passed first."""
        return self.scorer.wait_live(timeout)

    def stop(self, grace_s: float | None = None) -> None:
        """Drain both APIs at once (each within the grace period), then close."""
        http = self.http.stop() if self.http is not None else None
        self.server.stop(grace_s).wait()
        if http is not None:
            http.wait()
        self.decoder.close()
        self.scorer.close()


def build(cfg: CombinerConfig, tracer_provider: TracerProvider | None = None,
          meter_provider: MeterProvider | None = None) -> CombinerServer:
    """Build the server (bound, not started); `CombinerServer.start` connects to the upstreams."""
    if cfg.threads:
        # torch keeps one intra-op thread: idle OpenMP threads spin, and its per-step tensors are
        # small (one stream at 128k: two made the work per token up to 6x as long, configuration.md)
        torch.set_num_threads(1)
        fusedrows.set_threads(cfg.threads)
    if tracer_provider is None:
        tracer_provider = tracing.make_tracer_provider("eftmesh-combiner", otlp=cfg.otlp)
    tokenizer = loading.load_tokenizer(cfg.tokenizer, cfg.tokenizer_revision, flag="--tokenizer")
    fused.warm()  # the sampler's compiled kernels, before any request needs them
    fp, vocab = fingerprint(tokenizer), len(tokenizer)
    if meter_provider is None:
        meter_provider = metrics.make_meter_provider("eftmesh-combiner", otlp=cfg.otlp_metrics,
                                                     prometheus_port=cfg.metrics_port, prometheus_host=cfg.server.host)
    measures = metrics.CombinerMetrics(metrics.meter(meter_provider, "eftmesh.combiner"))
    scorer = GrpcScorer(cfg.upstreams, cfg.policy, tracer_provider, metrics=measures)
    tracer = tracing.tracer(tracer_provider, "eftmesh.combiner")
    # the block cap: --max-k, lowered by cap_k as the roles answer; one value for all who need it
    cap = BlockCap(cfg.defaults.speculation.max_k)
    decoder = Decoder(scorer, tokenizer, vocab, cfg.scheduler, cap, tracer, measures)
    servicer = GeneratorServicer(decoder, cfg.defaults, fp, cfg.max_concurrent_generations, tracer, measures)
    scorer.k_cap = cap  # new replicas must take blocks this large
    # gRPC's own refusals of generations (--max-concurrent-rpcs, --max-request-bytes), counted
    refusals = metrics.RefusalCounter(measures.rejected, {f"/{SERVICE_NAME}/{m}": m for m in ("Generate", "Complete")})
    try:
        tokens = auth.TokenFile(cfg.auth_tokens_file) if cfg.auth_tokens_file else None
        extra = [refusals, *([auth.BearerTokenInterceptor(tokens, [SERVICE_NAME])] if tokens is not None else [])]
        server = Server(
            dataclasses.replace(
                cfg.server,
                options=(*cfg.server.options, ("grpc.max_receive_message_length", cfg.max_request_bytes),
                         *connection_age_options(cfg.max_connection_age_s, cfg.max_connection_age_grace_s)),
                reflection=cfg.reflection,
            ),
            [lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            tracer_provider,
            interceptors=extra,
            executor=refusals.executor,
        )
        refusals.attach(server.grpc)
        http = None
        if cfg.http is not None:  # imported here: the HTTP stack is needed only with --http-port
            from eftmesh.combiner.http import HttpApi, HttpServer

            http = HttpServer(HttpApi(servicer, tokenizer, cfg.http, tracer, ready=lambda: scorer.wait_live(0),
                                      tokens=tokens))
    except BaseException:
        decoder.close()
        scorer.close()
        raise
    def check(models: Mapping[str, ModelSpec]) -> None:
        check_compatible(models, fp, vocab, tokenizer.eos_token_id)
        cap_k(cap, cfg.defaults.speculation, scorer.models)

    return CombinerServer(server, decoder, scorer, tracer_provider, meter_provider, check=check, servicer=servicer,
                          http=http)


def cap_k(cap: BlockCap, spec: SpeculationDefaults, models: Mapping[str, ModelSpec]) -> None:
    """Cap the combiner's --max-k (and --k under it) to the smallest --max-k of the logit
    services that answered, saying so: any role may be a request's draft role, and a k larger
    than its Draft takes would fail every such request with the upstream's INVALID_ARGUMENT.
    Run as each role first answers; Info reports the cap."""
    said = {r: m.max_k for r, m in dict(models).items() if m.max_k > 0}
    if not said:
        return
    least = min(said.values())
    before = cap.value
    if not cap.lower_to(least):
        return
    roles = ", ".join(f"{r} ({k})" for r, k in sorted(said.items()) if k == least)
    log.warning("--max-k %d is more than the logit services' --max-k allows: capped to %d, the --max-k "
                "of %s%s", before, least, roles,
                f"; the fixed mode's --k {spec.k} too" if spec.k > least else "")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    memory.keep_freed_memory()  # before the step's buffers are first made (common/memory.py)
    try:  # a bad TLS or token file is a message naming its flag, not a traceback from deep in build()
        tls.check_server(cfg.server.tls)
        tls.check_client(cfg.policy.tls, "upstream")
        if cfg.auth_tokens_file:
            auth.check_token_file(cfg.auth_tokens_file, "--auth-tokens-file")
    except ValueError as e:
        log.error("refusing to start: %s", e)
        raise SystemExit(2) from None
    try:
        cs = build(cfg)
    except loading.LoadError as e:  # an unloadable --tokenizer: one line naming the flag and what was tried
        log.error("refusing to start: %s", e)
        raise SystemExit(2) from None

    def refuse(e: EftMeshError) -> None:  # a refusal to start is a message, not a traceback
        log.error("refusing to start: %s", e)
        cs.server.stop(0)
        logging.shutdown()
        os._exit(2)  # from the upstream monitor's thread: SystemExit would end only that thread

    cs.server.install_signal_handlers()
    try:
        cs.start(on_fatal=refuse)
    except EftMeshError as e:
        log.error("refusing to start: %s", e)
        raise SystemExit(2) from None
    log.info("combiner listening on port %d; roles %s; default %s; %d mixing thread(s); %s", cs.server.port,
             ", ".join(cfg.upstreams), cfg.defaults.composition.describe(), cfg.threads or 1,
             "serving" if cs.wait_serving(0) else "NOT_SERVING until every role has a live replica")
    cs.server.signalled.wait()
    cs.stop()
    log.info("stopped")
    exit_now(cs.tracer_provider, cs.meter_provider)
