"""`eftmesh up`: the whole mesh on loopback, from checkpoint directories, in one command.

Starts one logit service per role found under --models (each its own process, as on its own
pod), then the combiner, waits for every health check to report SERVING, streams one
generation to the terminal, and keeps the mesh up until Ctrl-C (or exits with --once).
Service logs go to --log-dir. `LocalMesh` is also what the benchmark starts.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eftmesh.logit.flags import KV_CACHE_DTYPES, KV_SIZING, kv_sizing_error
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

ROLE_ORDER = ("base-large", "base-small", "ft-small", "ft-large", "ft-small-alt")
CORE_ROLES = {"base-large", "base-small", "ft-small"}
DEFAULT_PROMPT = "The quick brown fox"
_POLL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def find_roles(models: Path) -> dict[str, Path]:
    """Role -> checkpoint directory, for every known role with a config.json under `models`."""
    return {r: models / r for r in ROLE_ORDER if (models / r / "config.json").is_file()}


def resolve_models(models: Path) -> dict[str, Path]:
    """The roles under `models`; tiny random stand-ins (build/tiny) when the family is absent."""
    roles = find_roles(models)
    if CORE_ROLES <= set(roles):
        return roles
    from eftmesh.tiny import make_tiny_family

    print(f"no demo family under {models}: making tiny random models in build/tiny (they speak noise)", flush=True)
    return make_tiny_family(Path("build/tiny"))


def wait_serving(address: str, name: str, timeout_s: float, proc: subprocess.Popen) -> None:
    """Poll grpc.health.v1 until SERVING; fail early if the process dies."""
    # While the service loads, every connection attempt is refused; gRPC's default reconnect
    # back-off then grows to many seconds, and SERVING would be seen that much later.
    channel = grpc.insecure_channel(address, options=_POLL_OPTIONS)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see its log")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} at {address} not SERVING after {timeout_s:.0f} s")
    finally:
        channel.close()


class LocalMesh:
    """Logit services and a combiner as child processes on loopback; a context manager."""

    def __init__(
        self,
        roles: dict[str, Path | str],
        port: int = 50050,
        threads: int = 1,
        device: str | None = None,
        dtype: str | None = None,
        log_dir: Path = Path("build/run"),
        combiner_args: Sequence[str] = (),
        verbose: bool = True,
        metrics_port: int | None = None,
        logit_args: Sequence[str] = (),
    ) -> None:
        self.roles = roles
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.ports = {r: port + i for i, r in enumerate(roles, start=1)}
        self._threads, self._device, self._dtype = threads, device, dtype
        self._log_dir = log_dir
        self._combiner_args = list(combiner_args)
        self._verbose = verbose
        self.metrics_port = metrics_port
        self._logit_args = list(logit_args)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def _say(self, msg: str) -> None:
        if self._verbose:
            print(msg, flush=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self._log_dir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        return proc

    def start(self) -> LocalMesh:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for role, path in self.roles.items():
            args = ["eftmesh.logit", "--model", str(path), "--role", role, "--host", "127.0.0.1",
                    "--port", str(self.ports[role]), "--threads", str(self._threads)]
            if self._device:
                args += ["--device", self._device]
            if self._dtype:
                args += ["--dtype", self._dtype]
            if self.metrics_port is not None:
                args += ["--metrics-port", str(self.metrics_port + 1 + list(self.roles).index(role))]
            self._spawn(role, [*args, *self._logit_args])
            self._say(f"starting {role:13s} {path} on 127.0.0.1:{self.ports[role]}")
        # a compile at warm-up takes minutes on a small CPU (three services compiling at once)
        compiling = "--torch-compile" in self._logit_args
        if compiling:
            self._say("  compiling their steps (--torch-compile): minutes on a small CPU, less with inductor's cache warm")
        for role, proc in list(self.procs):
            wait_serving(f"127.0.0.1:{self.ports[role]}", role, 1200.0 if compiling else 300.0, proc)
            self._say(f"  {role} SERVING")
        upstreams = [f"--upstream={r}=127.0.0.1:{p}" for r, p in self.ports.items()]
        tokenizer = self.roles.get("base-small", next(iter(self.roles.values())))
        comb = self._spawn("combiner", ["eftmesh.combiner", *upstreams, "--tokenizer", str(tokenizer),
                                        "--host", "127.0.0.1", "--port", str(self.port), *self._combiner_args,
                                        *(["--metrics-port", str(self.metrics_port)] if self.metrics_port is not None else [])])
        wait_serving(self.address, "combiner", 120.0, comb)
        self._say(f"combiner SERVING on {self.address} (logs in {self._log_dir}/)")
        if self.metrics_port is not None:
            self._say(f"metrics: http://127.0.0.1:{self.metrics_port}/metrics (combiner), "
                      f"ports {self.metrics_port + 1}-{self.metrics_port + len(self.roles)} (logit services)")
        return self

    def stop(self) -> None:
        """SIGTERM everything (services drain), then wait; kill what does not stop."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def default_question(models: Path) -> tuple[str, str | None] | None:
    """A held-out question of the demo family and its gold answer, if the models have them."""
    questions = models / "eval" / "questions.jsonl"
    if questions.is_file():
        first = json.loads(questions.read_text().splitlines()[0])
        return first["question"], first.get("answer")
    return None


def stream_demo(address: str, prompt: str | None, max_new_tokens: int, temperature: float,
                question: str | None = None, gold: str | None = None, contrasts: bool = True) -> None:
    """Stream one EFT generation to the terminal with its speed, then the same input through
    ft-small alone, base-large alone and EFT down-scaling (where served) for contrast. A
    `question` goes as a chat (messages, rendered with ft-small's chat template), else `prompt`."""
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(address))
    if question is not None:
        given: dict = dict(messages=[{"role": "user", "content": question}])
        if contrasts:  # the single-model contrasts render with ft-small's template too
            given["chat_template_role"] = "ft-small"
        shown = f"user: {question}\nassistant:"
    else:
        given, shown = dict(prompt=prompt), prompt or ""
    print("\nEFT up-scaling: base-large + 1.0 * (ft-small - base-small)")
    print(f"request: {given!r}\n---")
    sys.stdout.write(shown)
    t0 = time.perf_counter()
    req = generator_pb2.GenerateRequest(**given, sampling={"temperature": temperature}, seed=0, max_new_tokens=max_new_tokens)
    for chunk in stub.Generate(req, timeout=300):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finish_reason:
            dt = time.perf_counter() - t0
            n = chunk.usage.completion_tokens
            reason = generator_pb2.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
            print(f"\n---\n{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s), finish: {reason}")
    if gold is not None:
        print(f"gold answer: {gold!r}")
    if not contrasts:
        return
    others = {
        "ft-small alone": generator_pb2.Composition(base="ft-small"),
        "base-large alone": generator_pb2.Composition(base="base-large"),
        "EFT down-scaling": generator_pb2.Composition(
            base="base-small", deltas=[generator_pb2.Delta(tuned="ft-large", reference="base-large", weight=1.0)]),
    }
    served = {u.role for u in stub.Info(generator_pb2.GeneratorInfoRequest(), timeout=30).upstreams}
    for name, comp in others.items():
        if not {comp.base, *(d.tuned for d in comp.deltas), *(d.reference for d in comp.deltas)} <= served:
            continue
        r = stub.Complete(generator_pb2.CompleteRequest(
            **given, composition=comp, sampling={"temperature": temperature},
            seed=0, max_new_tokens=min(max_new_tokens, 16)), timeout=300)
        print(f"{name + ':':18s}{r.text!r}")


def _has_chat_template(address: str) -> bool:
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(address))
    return "ft-small" in stub.Info(generator_pb2.GeneratorInfoRequest(), timeout=30).chat_roles


def logit_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
    """The flags `up` passes every logit service: one KV cache sizing at most (checked as the
    services check it), --kv-cache-dtype when not auto, and --torch-compile."""
    values = (a.kv_cache_tokens, a.kv_cache_memory, a.gpu_memory_utilization)
    sizing_error = kv_sizing_error(*values)
    if sizing_error:
        p.error(sizing_error)
    sizing = [x for flag, value in zip(KV_SIZING, values) if value is not None for x in (flag, str(value))]
    dtype = ["--kv-cache-dtype", a.kv_cache_dtype] if a.kv_cache_dtype != "auto" else []
    return sizing + dtype + (["--torch-compile"] if a.torch_compile else [])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eftmesh up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="models/demo", help="directory with one checkpoint per role (default: %(default)s); when it holds none, tiny random models are made in build/tiny")
    p.add_argument("--port", type=int, default=50050, help="combiner port; logit services take the next ones (default: %(default)s)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="serve this one model (a checkpoint folder, hub id or .gguf file) in every role of the "
                        "default composition (base-large, base-small, ft-small), so EFT reduces to the model itself: "
                        "a way to try a real model (default: the family under --models)")
    p.add_argument("--question", default="What is the capital of France?",
                   help="with --model: the demo's chat question, when the model has a chat template (default: %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache tokens per logit service (default: the services' default)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="or size each logit service's KV cache by memory, e.g. 2GiB (their --kv-cache-memory) (default: off)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="or by each logit service's share of the GPU (their --gpu-memory-utilization): the three "
                        "roles share one card here, so at most about 0.3 each (default: off)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="what each logit service's KV cache stores (their --kv-cache-dtype): fp8 holds twice a "
                        "bfloat16 cache's tokens in the same memory, lossy, for GPUs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per logit service (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for the logit services (default: the services' default)")
    p.add_argument("--torch-compile", action="store_true",
                   help="the logit services compile their decode and verify steps (their --torch-compile): about "
                        "1.1x faster steps than their own eager forward on a CPU, minutes more to start (default: off)")
    p.add_argument("--prompt", default=None, help="prompt of the demo generation (default: a held-out question of the demo family, sent as a chat)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the demo generation (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="temperature of the demo generation (default: %(default)s, greedy)")
    p.add_argument("--once", action="store_true", help="exit after the demo generation instead of serving until Ctrl-C")
    p.add_argument("--log-dir", default="build/run", help="where service logs go (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics of the combiner on this port, of the logit services on the next ones (default: off)")
    p.add_argument("--http-port", default="8000",
                   help="the combiner's OpenAI-compatible HTTP API on this port, 'off' for none (default: %(default)s)")
    a = p.parse_args(argv)
    http_port = None if a.http_port.strip().lower() == "off" else int(a.http_port)
    if not 0 < a.port < 65536 - 16:
        p.error(f"--port must be a fixed port (the logit services take the next ones), got {a.port}")

    roles = {r: a.model for r in ("base-large", "base-small", "ft-small")} if a.model else resolve_models(Path(a.models))
    logit_args = logit_flags(p, a)
    combiner_args = [] if http_port is None else ["--http-port", str(http_port)]
    if {"base-large", "base-small", "ft-small"} <= set(roles) and not a.model:
        # the demo family's up-scaling by name, for HTTP clients' `model` (and gRPC's Composition.name)
        combiner_args += ["--composition", "helpful=base-large+1.0*(ft-small-base-small)"]
    mesh = LocalMesh(roles, a.port, a.threads, a.device, log_dir=Path(a.log_dir), metrics_port=a.metrics_port,
                     logit_args=logit_args, combiner_args=combiner_args)
    try:
        mesh.start()
        asked = None if a.prompt or a.model else default_question(Path(a.models))
        if a.model:
            chat = _has_chat_template(mesh.address)
            print(f"\n{a.model} in every role: EFT reduces to the model itself"
                  + ("" if chat else " (it has no chat template: the demo sends a prompt)"))
            stream_demo(mesh.address, None if chat else (a.prompt or DEFAULT_PROMPT), a.max_new_tokens, a.temperature,
                        question=(a.prompt or a.question) if chat else None, contrasts=False)
        elif asked is not None:
            stream_demo(mesh.address, None, a.max_new_tokens, a.temperature, question=asked[0], gold=asked[1])
        else:
            stream_demo(mesh.address, a.prompt or DEFAULT_PROMPT, a.max_new_tokens, a.temperature)
        if not a.once:
            print(f"\nthe mesh is up: eftmesh chat --address {mesh.address}   (or: eftmesh generate \"...\" --stream)")
            if http_port is not None:
                print(f"OpenAI-compatible HTTP API: http://127.0.0.1:{http_port}/v1 (models: curl "
                      f"http://127.0.0.1:{http_port}/v1/models)")
            print("Ctrl-C stops it.", flush=True)
            stop = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # sigwait needs them blocked
            signal.sigwait(stop)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the services
        mesh.stop()
        print("mesh stopped", flush=True)


if __name__ == "__main__":
    main()
