"""Chaos with real processes: a logit replica frozen by SIGSTOP mid-generation (the way a GC
pause or a stuck driver looks from outside: its connections stay open, nothing answers).

Two base-large replicas in processes of their own, the small roles once each, a combiner over
them; six greedy streams. Every stream completes with the tokens of a fault-free run, none
waits more than the derived deadline and a re-prefill between two chunks, and once SIGCONT
wakes the replica, the sessions moved off it are released there (its sessions gauge, scraped
from its Prometheus port, returns to zero)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_combiner, start_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.skipif(sys.platform != "linux", reason="SIGSTOP")]

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "It was a dark night",
           "A long way from home", "The rain in Spain"]
NEW = 60  # the mesh fixture's --max-new-tokens-cap is 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(path, role: str) -> tuple[subprocess.Popen, int, int]:
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "eftmesh.logit", "--model", str(path), "--role", role,
                             "--host", "127.0.0.1", "--port", str(port), "--health-port", "off", "--threads", "1",
                             "--metrics-port", str(metrics)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{role} exited with {proc.returncode}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{role} never became SERVING"
            time.sleep(0.2)
    return proc, port, metrics


def sessions_held(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(r"^eftmesh_logit_sessions\S*\s+([0-9.e+]+)$", text, re.M)
    assert m, "no eftmesh_logit_sessions gauge"
    return int(float(m.group(1)))


def stream(address: str, prompt: str, started: list) -> tuple[str, float]:
    with grpc.insecure_channel(address) as ch:
        req = generator_pb2.GenerateRequest(prompt=prompt, max_new_tokens=NEW, ignore_eos=True,
                                            sampling=tensor_pb2.SamplingParams(temperature=0.0),
                                            speculation=generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_OFF))
        text, last, gap = "", time.monotonic(), 0.0
        for i, chunk in enumerate(generator_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=120)):
            now = time.monotonic()
            if i >= 3:  # the first chunks include the prefill and the warm-up of the deadlines
                gap = max(gap, now - last)
            if i == 3:
                started.append(prompt)
            last = now
            text += chunk.text
        return text, gap


def test_a_replica_frozen_by_sigstop_costs_its_streams_a_re_prefill_and_nobody_a_stall(mesh, tiny_family):
    reference = f"127.0.0.1:{mesh.combiner.server.port}"
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = dict(zip(PROMPTS, (t for t, _ in pool.map(lambda p: stream(reference, p, []), PROMPTS))))
    large = [spawn(tiny_family["base-large"], "base-large") for _ in range(2)]
    others = {r: start_logit(tiny_family[r], r) for r in ("base-small", "ft-small")}
    target = ",".join(f"127.0.0.1:{port}" for _, port, _ in large)
    cs = start_combiner(tiny_family["base-small"], {"base-large": 0, **{r: ls.server.port for r, ls in others.items()}},
                        upstream_targets={"base-large": target})
    frozen = None
    try:
        address = f"127.0.0.1:{cs.server.port}"
        started: list[str] = []
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = {p: pool.submit(stream, address, p, started) for p in PROMPTS}
            deadline = time.monotonic() + 60
            while len(started) < len(PROMPTS) and not any(f.done() for f in futures.values()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            load = cs.scorer.replicas["base-large"].load()
            busiest = max(large, key=lambda x: load.get(f"127.0.0.1:{x[1]}", 0))
            held_at_stop = load.get(f"127.0.0.1:{busiest[1]}", 0)
            frozen = busiest[0]
            os.kill(frozen.pid, signal.SIGSTOP)
            got = {p: f.result(timeout=90) for p, f in futures.items()}
        still_stopped = frozen.poll() is None
        os.kill(frozen.pid, signal.SIGCONT)
        assert held_at_stop >= 1, "no session was on the frozen replica: the test proved nothing"
        assert still_stopped
        assert {p: t for p, (t, _) in got.items()} == expected
        gaps = {p: round(g, 2) for p, (_, g) in got.items()}
        assert max(gaps.values()) < 3.0, gaps
        deadline = time.monotonic() + 10
        while sessions_held(busiest[2]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sessions_held(busiest[2]) == 0, "sessions left on the woken replica"
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        cs.stop(0)
        for proc, _, _ in large:
            proc.terminate()
            proc.wait(10)
        for ls in others.values():
            ls.server.stop(0).wait()
