"""Chaos with real processes: a replica of each role killed (SIGKILL) or frozen (SIGSTOP for
20 s, and for 40 s: past the 30 s --call-timeout) in the middle of 16 concurrent greedy streams.

Two replicas of every role, each a process of its own; the combiner in-process over them,
routing to the least-loaded replica (8 sessions on each). Half the streams speculate (ft-small
drafts), half do not. Per fault, the issue's bar:

- every stream completes, token-identical to a fault-free run on the same mesh;
- no stream's longest gap between two chunks after the fault exceeds 2 s (the streams on the
  faulty replica pay a derived deadline and a re-prefill elsewhere, not the fault's length);
- streams on the healthy replicas are not held up: their next chunks after the fault take at
  most 2x what the same chunks took in a fault-free round run just before (a step does not wait for a
  straggler, `--upstream-straggler-factor`);
- while a replica is frozen, new requests are served at once by the others;
- within 10 s of SIGCONT, the woken replica holds no session (those moved off it are released
  there; its sessions gauge is scraped from its Prometheus port).

Slow (about four minutes: the freezes last as long as the issue asks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_ports, start_combiner, wait_for
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.combiner.server import CombinerServer
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.skipif(sys.platform != "linux", reason="signals")]

ROLES = ("base-large", "base-small", "ft-small")
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "It was a dark night",
           "A long way from home", "The rain in Spain", "Call me Ishmael", "All happy families",
           "It was the best of times", "Far out in the uncharted", "Mother died today", "Happy families are",
           "The sky above the port", "Someone must have slandered", "Last night I dreamt", "In a hole in the ground"]
NEW = 48  # the combiner's --max-new-tokens-cap is 64 here
WARM = 4  # chunks every stream has before the fault
AFTER = 24  # tokens of a healthy stream timed after the fault: enough that one slow step
# (the moved sessions' re-prefill, a scheduling hiccup on a loaded machine) does not read as
# a healthy stream held up (at 12, one such step of ~1 s read as 2.5x once beside a CPU hog)
FREEZE_S = {"sigstop-20s": 20.0, "sigstop-40s": 40.0}
MAX_GAP_S = 2.0


@dataclass
class Replica:
    role: str
    proc: subprocess.Popen
    port: int
    metrics: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ChaosMesh:
    combiner: CombinerServer
    replicas: dict[str, list[Replica]]
    expected: dict[str, str]  # prompt -> fault-free text

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.combiner.server.port}"


def spawn(path, role: str, port: int, metrics: int, log_dir: Path) -> Replica:
    log = log_dir / f"{role}-{port}.log"
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "eftmesh.logit", "--model", str(path), "--role", role,
                                 "--host", "127.0.0.1", "--port", str(port), "--health-port", "off", "--threads", "1",
                                 "--metrics-port", str(metrics)], stdout=out, stderr=subprocess.STDOUT)
    return Replica(role, proc, port, metrics, log)


def wait_serving(r: Replica) -> None:
    with grpc.insecure_channel(r.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 180
        while True:
            if r.proc.poll() is not None:
                tail = "\n".join(r.log.read_text().splitlines()[-15:])
                raise AssertionError(f"{r.role} on port {r.port} exited with {r.proc.returncode}; its log ends:\n{tail}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{r.role} never became SERVING"
            time.sleep(0.2)


def serving(r: Replica, path, log_dir: Path) -> Replica:
    """`r` once SERVING; started again on other ports if the ones it was given were taken by
    then (a port found free is released for the replica to bind, and another process on the
    machine, a client's connection even, can take it first: a CI run lost the fixture so)."""
    for attempt in range(3):
        try:
            wait_serving(r)
            return r
        except AssertionError:
            if r.proc.poll() is None or attempt == 2 or not re.search(
                    r"cannot bind|Address already in use", r.log.read_text()):
                raise
        r = spawn(path, r.role, *free_ports(2), log_dir)
    raise AssertionError("unreachable")


def sessions_held(r: Replica) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics}/metrics", timeout=5).read().decode()
    m = re.search(r"^eftmesh_logit_sessions\S*\s+([0-9.e+]+)$", text, re.M)
    assert m, "no eftmesh_logit_sessions gauge"
    return int(float(m.group(1)))


def stream(address: str, prompt: str, new: int = NEW) -> tuple[str, list[tuple[float, int]]]:
    """Greedy text of a streamed Generate, and per chunk (arrival time, tokens so far)."""
    speculate = PROMPTS.index(prompt) % 2 == 0
    mode = generator_pb2.SPECULATION_MODE_ADAPTIVE if speculate else generator_pb2.SPECULATION_MODE_OFF
    with grpc.insecure_channel(address) as ch:
        req = generator_pb2.GenerateRequest(prompt=prompt, max_new_tokens=new, ignore_eos=True,
                                            sampling=tensor_pb2.SamplingParams(temperature=0.0),
                                            speculation=generator_pb2.Speculation(mode=mode))
        text, chunks, n = "", [], 0
        for chunk in generator_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=120):
            n += len(chunk.token_ids)
            chunks.append((time.monotonic(), n))
            text += chunk.text
        return text, chunks


def time_to(chunks: list[tuple[float, int]], tokens: int) -> float:
    """When the stream had its first `tokens` tokens."""
    return next(t for t, n in chunks if n >= tokens)


@pytest.fixture(scope="module")
def chaos(tiny_family, tmp_path_factory) -> ChaosMesh:
    # every port at once, so that no two of them can be the same (each replica: gRPC, metrics)
    ports = iter(free_ports(2 * 2 * len(ROLES)))
    logs = tmp_path_factory.mktemp("chaos-logs")
    replicas = {role: [spawn(tiny_family[role], role, next(ports), next(ports), logs) for _ in range(2)] for role in ROLES}
    cs = None
    try:
        for role, rs in replicas.items():
            for i in range(len(rs)):
                rs[i] = serving(rs[i], tiny_family[role], logs)
        targets = {role: ",".join(r.address for r in rs) for role, rs in replicas.items()}
        # least-loaded routing, so that about 8 of the 16 sessions are on each replica, as the
        # issue's bar was set: prefix-aware routing (slack 8) splits them by the hash of the
        # replicas' addresses, here random ports, and a kill then moves 4 to 12 sessions. A CI run
        # drew 11 on the victim for ft-small: the survivor went from 5 sessions to 16 (its drafts
        # included), and the healthy streams ran at 2.14-2.19x, evenly, with no gap over 0.25 s:
        # the role's lost capacity, not a hold-up, which is what the 2x bar is for
        cs = start_combiner(tiny_family["base-small"], dict.fromkeys(ROLES, 0), upstream_targets=targets,
                            policy=UpstreamPolicy(prefix_slack=None))
        assert cs.scorer.wait_live(60)
        address = f"127.0.0.1:{cs.server.port}"
        stream(address, PROMPTS[1], 8)  # the deadlines learn the roles' call times
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            ref = dict(zip(PROMPTS, pool.map(lambda p: stream(address, p), PROMPTS)))
        yield ChaosMesh(cs, replicas, {p: t for p, (t, _) in ref.items()})
    finally:
        if cs is not None:
            cs.stop(0)
        for rs in replicas.values():  # never leave a replica behind, frozen or not
            for r in rs:
                if r.proc.poll() is None:
                    os.kill(r.proc.pid, signal.SIGCONT)
                    r.proc.terminate()
        for rs in replicas.values():
            for r in rs:
                try:
                    r.proc.wait(10)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait(10)


SCENARIOS = [(role, fault) for fault in ("sigstop-20s", "sigstop-40s", "sigkill") for role in ROLES]


@pytest.mark.parametrize(("role", "fault"), SCENARIOS, ids=[f"{r}-{f}" for r, f in SCENARIOS])
def test_a_replica_that_dies_or_hangs_costs_its_streams_a_re_prefill_and_nobody_a_stall(chaos, role, fault):
    cs, live = chaos.combiner, [r for r in chaos.replicas[role] if r.proc.poll() is None]
    assert len(live) == 2, f"{role} needs two live replicas for this scenario"
    # a replica woken by the scenario before is back in the combiner's eyes
    assert wait_for(lambda: len(cs.scorer._live_replicas(role)) == 2, 15), f"{role}: a replica is not live again"
    scheduler, pins = cs.decoder.scheduler, cs.scorer.replicas[role]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        # a fault-free round right before the fault is the healthy streams' yardstick: the
        # machine's load then is the load during the fault (a reference taken minutes before, at
        # the module's start, read as 2.4x on a busy CI runner and as 0.6x on a quiet one)
        reference = dict(zip(PROMPTS, pool.map(lambda p: stream(chaos.address, p), PROMPTS)))
        assert {p: t for p, (t, _) in reference.items()} == chaos.expected
        futures = {p: pool.submit(stream, chaos.address, p) for p in PROMPTS}
        deadline = time.monotonic() + 60
        # every stream is a few tokens in: the generations are all in the running batch
        while sum(1 for g in list(scheduler._running) if g.sink.usage.completion_tokens >= WARM) < len(PROMPTS):
            assert time.monotonic() < deadline and not any(f.done() for f in futures.values()), "streams never warmed up"
            time.sleep(0.005)
        load = pins.load()
        victim = max(live, key=lambda r: load.get(r.address, 0))
        gens = list(scheduler._running) + list(scheduler._held)
        on_victim = {g.req.prompt for g in gens if (p := pins.pinned(g.sessions[role])) and p.address == victim.address}
        frozen_at = time.monotonic()
        os.kill(victim.proc.pid, signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP)
        try:
            got = {p: f.result(timeout=120) for p, f in futures.items()}
            if fault in FREEZE_S:  # new requests while it is still frozen are served by the others
                wave = time.monotonic()
                fresh = list(pool.map(lambda p: stream(chaos.address, p, 8), PROMPTS[:4]))
                fresh_s = time.monotonic() - wave
                still_frozen = victim.proc.poll() is None and time.monotonic() - frozen_at < FREEZE_S[fault]
                time.sleep(max(0.0, frozen_at + FREEZE_S[fault] - time.monotonic()))
        finally:
            if fault in FREEZE_S:
                os.kill(victim.proc.pid, signal.SIGCONT)
    woke = time.monotonic()
    assert 0 < len(on_victim) < len(PROMPTS), f"sessions on the {role} victim: {len(on_victim)}: the test proves nothing"
    # least-loaded routing splits them evenly (the fixture): the survivor at most doubles its load
    assert len(on_victim) <= len(PROMPTS) // 2 + 1, f"{len(on_victim)} of {len(PROMPTS)} sessions on the {role} victim"
    assert {p: t for p, (t, _) in got.items()} == chaos.expected
    gaps = {p: max(b - a for (a, _), (b, _) in zip(chunks, chunks[1:]) if b > frozen_at) for p, (_, chunks) in got.items()}
    assert max(gaps.values()) <= MAX_GAP_S, {p: round(g, 2) for p, g in gaps.items()}
    slowdown = {}
    for p, (_, chunks) in got.items():
        if p in on_victim:
            continue
        last, at = max(((t, n) for t, n in chunks if t <= frozen_at), default=chunks[0])
        until = min(at + AFTER, NEW)
        ref = reference[p][1]  # the fault-free round's time for the same tokens
        slowdown[p] = (time_to(chunks, until) - last) / max(time_to(ref, until) - time_to(ref, at), 1e-3)
    print(f"\n{role} {fault}: {len(on_victim)} streams on the victim, longest gap {max(gaps.values()):.2f} s, "
          f"healthy streams' slowdown at most {max(slowdown.values()):.2f}x")
    assert max(slowdown.values()) <= 2.0, {p: round(s, 2) for p, s in slowdown.items()}
    if fault not in FREEZE_S:
        return
    assert still_frozen, "the freeze ended before the new requests were served: the check proved nothing"
    assert all(text for text, _ in fresh) and fresh_s <= 5.0, f"new requests took {fresh_s:.1f} s while {role} froze"
    while sessions_held(victim) and time.monotonic() - woke < 10:
        time.sleep(0.2)
    assert sessions_held(victim) == 0, "sessions left on the woken replica 10 s after SIGCONT"
