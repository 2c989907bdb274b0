"""Entry point of a logit service: `python -m eftmesh.logit --model PATH --role ROLE`.

Flags are parsed once into a frozen `LogitConfig` here; nothing reads the environment at
import time (OTLP export is the one exception, by the OpenTelemetry convention: it turns on
when OTEL_EXPORTER_OTLP_ENDPOINT is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.common import loading, memory, metrics, rowswire, tls, tracing
from eftmesh.common.serving import HEALTH_PORT_HELP, Server, ServerConfig, exit_now, health_port_arg
from eftmesh.core import fused
from eftmesh.logit import deletion_cost
from eftmesh.logit.engine import EngineConfig, ModelEngine
from eftmesh.logit.kvsize import parse_size
from eftmesh.logit.native import MODEL_IMPLS
from eftmesh.logit.placement import DTYPES, parse_device_map, parse_max_memory
from eftmesh.logit.buckets import GRAPH_MODES, GraphConfig
from eftmesh.logit.flags import KV_CACHE_DTYPES, kv_sizing_error
from eftmesh.logit.servicer import LogitServicer, add_to_server

log = logging.getLogger("eftmesh.logit")

# After the drain (sessions all released, or the grace over), calls still in flight get this
# long before the server stops: a pod needs a termination grace of preStop + --grace + this.
FINAL_GRACE_S = 1.0
# How often a drain logs the sessions it still waits for.
DRAIN_LOG_EVERY_S = 5.0


@dataclass(frozen=True)
class LogitConfig:
    """Everything one logit service needs, fixed at start-up."""

    model: str
    role: str
    server: ServerConfig
    # --revision of a hub --model; --tokenizer (default: the model's own) and its revision.
    revision: str | None = None
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    device: str = "cpu"
    device_map: str = "none"  # none, auto or a JSON object of module names to devices
    max_memory: str = ""  # with a device map: "0=70GiB,1=70GiB"
    dtype: str = "float32"
    # sessions, KV cache, batching and step execution (the engine's own config, built once here)
    engine: EngineConfig = EngineConfig()
    threads: int | None = None
    trust_remote_code: bool = False
    otlp: bool = False
    otlp_metrics: bool = False
    metrics_port: int | None = None
    deletion_cost_interval_s: float = 0.0
    # gRPC server reflection on the main port (grpcurl without .proto files).
    reflection: bool = True
    # Info's model_id: the checkpoint path or hub id (True), or the role (False).
    expose_model_id: bool = True
    # A Jinja chat template file that replaces the tokenizer's ("": the tokenizer's own).
    chat_template_file: str = ""


def parse_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> LogitConfig:
    p = argparse.ArgumentParser(
        prog="eftmesh-logit",
        description="Serve one causal LM's next-token log-probabilities over gRPC (eftmesh.v1.LogitService).",
    )
    p.add_argument("--model", required=True,
                   help="a checkpoint folder (with config.json), a .gguf file (dequantised to float; needs "
                        "pip install 'eftmesh[real-models]') or a hub id (owner/name, or owner/name/file.gguf), "
                        "loaded with AutoModelForCausalLM.from_pretrained")
    p.add_argument("--revision", default=None, help="with a hub id --model: the branch, tag or commit to load (default: main)")
    p.add_argument("--tokenizer", default=None,
                   help="load the tokenizer from this folder, .gguf file or hub id instead of --model's (default: --model)")
    p.add_argument("--tokenizer-revision", default=None,
                   help="with a hub id --tokenizer: its revision (default: --revision when --tokenizer is not given)")
    p.add_argument("--role", required=True, help="role name this model plays in the mesh, e.g. base-large")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (default: %(default)s)")
    p.add_argument("--health-port", type=health_port_arg, default=None, help=HEALTH_PORT_HELP)
    tls.add_server_args(p, client_ca=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--device-map", default="none",
                   help="shard the model over several devices: none (all on --device), auto (accelerate spreads the "
                        "layers over the visible GPUs) or a JSON object of module names to devices; weights load "
                        "straight onto their devices (default: %(default)s)")
    p.add_argument("--max-memory", default="", help='with --device-map auto: memory per device for weights, e.g. "0=70GiB,1=70GiB" (leave room for the KV cache)')
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of the weights (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=256, help="KV caches held at once; the least recently used is evicted beyond this (default: %(default)s)")
    p.add_argument("--session-idle-timeout", type=float, default=300.0, help="seconds before an unused session's cache is dropped (default: %(default)s)")
    p.add_argument("--max-context", type=int, default=None, help="cap on tokens per session (default: the model's own limit)")
    p.add_argument("--max-k", type=int, default=32, help="largest k one Draft call may ask for (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64, help="most sessions' steps (decode or verify) run in one batched forward (default: %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help=f"tokens the paged KV cache holds, shared by all sessions; allocated at start (default: {EngineConfig.kv_cache_tokens})")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="size the KV cache by memory instead: bytes it may take, e.g. 4GiB, 512MiB or 16GB (KiB/MiB/GiB/TiB, "
                        "or KB/MB/GB/TB in powers of 1000); it holds as many tokens as fit, at the model's own 2 x layers "
                        "x kv heads x head dim x dtype bytes per token (measured at start, logged); give it or "
                        "--kv-cache-tokens, not both (default: off)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="or size it by a share of the GPU (vLLM's flag, its meaning): this process may use F x the "
                        "card's memory (0 < F <= 1), and the KV cache gets what the weights, the largest forward's "
                        "activations and the CUDA graphs leave of it, all measured at start and logged; e.g. 0.9 on a "
                        "dedicated GPU, 0.3 each for three roles on one card; one CUDA device only; give one of "
                        "--kv-cache-tokens, --kv-cache-memory and this (default: off: a mesh's roles may share a card, "
                        "and a token count keeps autoscaling's KV target meaningful)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="what the paged KV cache stores (vLLM's flag): auto, the model's dtype; fp8 (= fp8_e4m3) or "
                        "fp8_e5m2, one byte per value at scale 1 (values clamped to the format's range): half a "
                        "bfloat16 cache's bytes per token, so twice the tokens in the same memory, at a small cost "
                        "in accuracy (logits no longer exact); for GPUs (a CPU's float8 casts are slow) "
                        "(default: %(default)s)")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV cache block (default: %(default)s)")
    p.add_argument("--session-active-window", type=float, default=1.0, help="seconds after its last use during which a session counts as in flight and is never evicted for room; a call that needs its blocks gets RESOURCE_EXHAUSTED instead (default: %(default)s)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="share full KV blocks between sessions whose tokens agree (a chat's history, a common system "
                        "prompt): a new session takes the longest cached prefix and runs only the rest; unused cached "
                        "blocks are evicted least recently used first, before idle sessions (default: on)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="most padded tokens in one prefill forward; longer prompts run alone (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads (default: %(default)s)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=64, help="in-flight RPCs before new ones get RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--grace", type=float, default=20.0,
                   help="seconds SIGTERM keeps serving the sessions held (new ones are refused UNAVAILABLE 'draining:', "
                        "health NOT_SERVING) before it stops; it exits as soon as the last one is released (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; OTLP metrics follow OTEL_EXPORTER_OTLP_ENDPOINT)")
    p.add_argument("--deletion-cost-interval", type=float, default=None,
                   help="seconds between updates of this pod's controller.kubernetes.io/pod-deletion-cost annotation to the "
                        "sessions it holds, so that a scale-in removes the pod holding the fewest (PATCHed only when changed; "
                        "needs POD_NAME, POD_NAMESPACE and RBAC to patch pods); 0: off (default: "
                        f"{deletion_cost.DEFAULT_INTERVAL_S:.0f} in a Kubernetes pod, 0 elsewhere)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default: it runs arbitrary code)")
    p.add_argument("--no-reflection", dest="reflection", action="store_false", help="do not serve gRPC server reflection (on by default, so grpcurl works without .proto files; it only lists the services and their messages)")
    p.add_argument("--chat-template", default="", metavar="FILE",
                   help="Jinja chat template file that replaces the tokenizer's own (for a model that ships none, or a "
                        "fixed one); the combiner renders chat messages with it (default: the tokenizer's)")
    p.add_argument("--hide-model-path", dest="expose_model_id", action="store_false", help="Info reports the role as model_id instead of --model (a local path or hub id) (default: --model is reported)")
    p.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="auto",
                   help="how decode and verify steps run: auto captures a CUDA graph per (batch, query, context) bucket "
                        "at warm-up when the model is on one CUDA device and replays it (eager elsewhere, for "
                        "prefills and shapes past the buckets, and everywhere if the capture fails: logged); off runs every step eagerly; static runs the "
                        "captured path's static shapes without capturing (debugging, and CI on a CPU) (default: %(default)s)")
    p.add_argument("--cuda-graph-max-batch", type=int, default=32,
                   help="largest batch bucket captured (buckets 1, 2, 4, 8, then multiples of 8) (default: %(default)s)")
    p.add_argument("--cuda-graph-max-query", type=int, default=8,
                   help="largest query length captured (decode 1; a verify of k drafts k + 1; buckets are powers of "
                        "two) (default: %(default)s)")
    p.add_argument("--cuda-graph-max-context", type=int, default=4096,
                   help="largest context captured, in tokens (buckets are powers of two from 64; longer contexts run "
                        "eagerly) (default: %(default)s)")
    p.add_argument("--torch-compile", action="store_true",
                   help="compile the static-shaped decode and verify steps with torch.compile (inductor) at warm-up, "
                        "on a CPU as on a GPU (where the compiled step is then captured): fewer, fused kernels and, on a "
                        "CPU, far less Python per step; costs minutes of start-up on a small CPU (cached on disk for the "
                        "next start, TORCHINDUCTOR_CACHE_DIR); a failed compile is logged and steps run uncompiled "
                        "(default: off)")
    p.add_argument("--model-impl", choices=MODEL_IMPLS, default="auto",
                   help="whose forward runs the model: auto runs eftmesh's own implementation of the architecture "
                        "where it has one (GPT-2 and Llama: the same ops as transformers', bitwise equal in float32, "
                        "without its per-layer Python) and transformers' otherwise; native insists (an error names "
                        "what it does not cover); transformers always runs transformers' modeling code "
                        "(default: %(default)s)")
    a = p.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        graphs = GraphConfig(a.cuda_graphs, a.cuda_graph_max_batch, a.cuda_graph_max_query, a.cuda_graph_max_context,
                             compile=a.torch_compile)
    except ValueError as e:
        p.error(str(e))
    kv_memory = None
    sizing_error = kv_sizing_error(a.kv_cache_tokens, a.kv_cache_memory, a.gpu_memory_utilization)
    if sizing_error:
        p.error(sizing_error)
    if a.kv_cache_memory is not None:
        try:
            kv_memory = parse_size(a.kv_cache_memory)
        except ValueError as e:
            p.error(f"--kv-cache-memory: {e}")
    if a.kv_cache_tokens is not None and a.kv_cache_tokens < 1:
        p.error(f"--kv-cache-tokens must be >= 1, got {a.kv_cache_tokens}")
    if a.deletion_cost_interval is not None and a.deletion_cost_interval < 0:
        p.error(f"--deletion-cost-interval must be >= 0, got {a.deletion_cost_interval}")
    return LogitConfig(
        model=a.model,
        role=a.role,
        revision=a.revision,
        tokenizer=a.tokenizer,
        tokenizer_revision=a.tokenizer_revision,
        server=ServerConfig(host=a.host, port=a.port, workers=a.workers, max_concurrent_rpcs=a.max_concurrent_rpcs, grace_s=a.grace,
                            health_port=a.health_port, tls=tls.server_from_args(p, a)),
        device=a.device,
        device_map=a.device_map,
        max_memory=a.max_memory,
        dtype=a.dtype,
        engine=EngineConfig(
            max_sessions=a.max_sessions,
            session_idle_timeout_s=a.session_idle_timeout,
            max_context=a.max_context,
            max_k=a.max_k,
            max_batch=a.max_batch,
            kv_cache_tokens=EngineConfig.kv_cache_tokens if a.kv_cache_tokens is None else a.kv_cache_tokens,
            kv_cache_memory=kv_memory,
            gpu_memory_utilization=a.gpu_memory_utilization,
            kv_block_size=a.kv_block_size,
            prefill_tokens=a.prefill_tokens,
            session_active_s=a.session_active_window,
            prefix_cache=a.prefix_cache,
            graphs=graphs,
            model_impl=a.model_impl,
            kv_cache_dtype=a.kv_cache_dtype,
        ),
        threads=a.threads,
        trust_remote_code=a.trust_remote_code,
        otlp=tracing.otlp_requested(env),
        otlp_metrics=metrics.otlp_requested(env),
        metrics_port=a.metrics_port,
        deletion_cost_interval_s=(deletion_cost.default_interval(env) if a.deletion_cost_interval is None
                                  else a.deletion_cost_interval),
        reflection=a.reflection,
        expose_model_id=a.expose_model_id,
        chat_template_file=a.chat_template,
    )


@dataclass
class LogitServer:
    """A built logit service: the gRPC server and the engine behind it."""

    server: Server
    engine: ModelEngine
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    deletion_cost_interval_s: float = 0.0
    deletion_cost_updater: deletion_cost.DeletionCost | None = None

    def start(self) -> None:
        """Bind, warm the model up with a real forward pass, then report SERVING; then keep the
        pod's deletion cost (with --deletion-cost-interval)."""
        self.server.start()
        self.engine.warmup()
        if self.engine.device.type == "cpu":  # drafts are sampled where their rows are: here, by compiled kernels
            fused.warm(draws_only=True)
        self.server.set_serving()
        engine = self.engine
        self.deletion_cost_updater = deletion_cost.start_from_env(lambda: engine.live_sessions, self.deletion_cost_interval_s)

    @property
    def replica(self) -> str:
        """This replica's name in drain messages: host (the pod's name in Kubernetes) and port."""
        return f"{socket.gethostname()}:{self.server.port}"

    def drain(self, grace_s: float | None = None, poll_s: float = 0.05) -> threading.Event:
        """Drain, then stop: health NOT_SERVING on both ports, no new session (those items get
        UNAVAILABLE "draining: ..."), the sessions held served until all are released or
        `grace_s` (default: the server's grace) is over; then the server stops, calls still in
        flight getting FINAL_GRACE_S. Blocks until the server stops taking calls; the event
        is set once it has stopped.
        """
        grace = self.server.cfg.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self.engine.start_draining(self.replica)
        self.server.set_not_serving()
        held = self.engine.live_sessions
        log.info("draining: NOT_SERVING, no new sessions; waiting up to %.0f s for %d held sessions", grace, held)
        next_log = time.monotonic() + DRAIN_LOG_EVERY_S
        while held and (now := time.monotonic()) < deadline:
            if now >= next_log:
                log.info("draining: %d sessions held, %.0f s of grace left", held, deadline - now)
                next_log = now + DRAIN_LOG_EVERY_S
            time.sleep(poll_s)
            held = self.engine.live_sessions
        if held:
            log.warning("draining: grace over with %d sessions held; stopping", held)
        else:
            log.info("draining: no session left; stopping")
        if self.deletion_cost_updater is not None:
            self.deletion_cost_updater.stop(0)
        return self.server.stop(FINAL_GRACE_S)


def read_chat_template(path: str) -> str:
    """The template in `path`, checked to parse as Jinja; ValueError naming the flag otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {path}: cannot read it: {e}") from None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {path}: not a Jinja template: line {e.lineno}: {e.message}") from None
    return text


def build(cfg: LogitConfig, engine: ModelEngine | None = None, tracer_provider: TracerProvider | None = None,
          meter_provider: MeterProvider | None = None) -> LogitServer:
    """Load the model (unless given), build the server, warm up; health turns SERVING after."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if engine is None:
        engine = ModelEngine.from_pretrained(
            cfg.model,
            role=cfg.role,
            revision=cfg.revision,
            tokenizer=cfg.tokenizer,
            tokenizer_revision=cfg.tokenizer_revision,
            device=cfg.device,
            device_map=parse_device_map(cfg.device_map),
            max_memory=parse_max_memory(cfg.max_memory),
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            config=cfg.engine,
        )
    if tracer_provider is None:
        tracer_provider = tracing.make_tracer_provider(f"eftmesh-logit-{cfg.role}", otlp=cfg.otlp)
    if meter_provider is None:
        meter_provider = metrics.make_meter_provider(f"eftmesh-logit-{cfg.role}", otlp=cfg.otlp_metrics,
                                                     prometheus_port=cfg.metrics_port, prometheus_host=cfg.server.host)
    if cfg.chat_template_file:
        engine.info = dataclasses.replace(engine.info, chat_template=read_chat_template(cfg.chat_template_file))
    store = engine.sessions
    servicer = LogitServicer(engine, metrics.LogitMetrics(
        metrics.meter(meter_provider, "eftmesh.logit"), cfg.role, lambda: len(store), lambda: store.evictions,
        lambda: engine.kv_tokens_used, lambda: engine.pool.capacity_tokens, engine.prefix_cache))
    if not cfg.expose_model_id:
        servicer.public_model_id = cfg.role
    server = Server(
        dataclasses.replace(cfg.server, reflection=cfg.reflection),
        [lambda s: add_to_server(servicer, s)],
        [rowswire.LOGIT_SERVICE],
        tracer_provider,
    )
    return LogitServer(server, engine, tracer_provider, meter_provider,
                       deletion_cost_interval_s=cfg.deletion_cost_interval_s)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    memory.keep_freed_memory()  # before the step's buffers are first made (common/memory.py)
    try:  # before the model loads: a bad TLS file is a message naming its flag, not a traceback
        tls.check_server(cfg.server.tls)
        if cfg.chat_template_file:
            read_chat_template(cfg.chat_template_file)
    except ValueError as e:
        log.error("refusing to start: %s", e)
        raise SystemExit(2) from None
    log.info("loading %s%s as %s on %s (%s)", cfg.model, f" at revision {cfg.revision}" if cfg.revision else "",
             cfg.role, cfg.device, cfg.dtype)
    try:  # a --model or --tokenizer that does not load is a message saying what was tried, not a traceback
        ls = build(cfg)
    except loading.LoadError as e:
        log.error("refusing to start: %s", e)
        raise SystemExit(2) from None
    ls.server.install_signal_handlers()
    ls.start()
    i = ls.engine.info
    log.info("%s serving on port %d (health port %s): vocab %d, context %d, tokenizer %s", cfg.role, ls.server.port,
             ls.server.health_port, i.vocab_size, i.max_context, i.tokenizer_fingerprint)
    ls.server.signalled.wait()
    ls.drain().wait()
    log.info("stopped")
    exit_now(ls.tracer_provider, ls.meter_provider)
