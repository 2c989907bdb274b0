"""Shared fixtures: tiny random models made in the test, and a real mesh over loopback."""

from __future__ import annotations

import os
from pathlib import Path

# The compiled sampler kernels (core/fused.py) cached on disk for every process the tests start
# (set before eftmesh is imported: fused.py reads it then): hundreds of services would each
# compile them for 1-3.6 s. numba keys its cache on fused.py's own source; a constant it imports
# (draws.DRAW_BLOCK) changed elsewhere needs `rm -r build/numba-cache`.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "build" / "numba-cache"))

from collections import defaultdict
from collections.abc import Callable, Iterator
import dataclasses
import time
from dataclasses import dataclass

import grpc
import pytest

from eftmesh.combiner.server import CombinerConfig, CombinerServer
from eftmesh.combiner.server import build as build_combiner
from eftmesh.combiner.servicer import Defaults
from eftmesh.combiner.server import DEFAULT_COMPOSITION
from eftmesh.common.serving import ServerConfig
from eftmesh.core.sampling import SamplingConfig
from eftmesh.tiny import make_tiny_family
from eftmesh.logit.engine import EngineConfig
from eftmesh.logit.server import LogitConfig, LogitServer
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import generator_pb2_grpc, logit_pb2_grpc


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny random GPT-2 checkpoints (base-large, base-small, ft-small), one tokenizer."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny"))


def start_logit(path: Path, role: str, port: int = 0, health_port: int | None = None, **kwargs) -> LogitServer:
    """A started logit service on loopback (port 0 picks a free port; `health_port` as
    ServerConfig's); keyword arguments set LogitConfig's fields, or its EngineConfig's
    (kv_cache_tokens=..., max_batch=...)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = EngineConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
    server = ServerConfig(host="127.0.0.1", port=port, grace_s=1.0, health_port=health_port)
    cfg = LogitConfig(model=str(path), role=role, server=server, engine=engine, **kwargs)
    ls = build_logit(cfg)
    ls.start()
    return ls


def mark_live(rs, address: str) -> None:
    """What the replica monitor does once a replica's Info matched and its health answered, for
    tests of a `ReplicaSet` alone (no monitor, no network)."""
    from eftmesh.combiner.replicas import ReplicaState

    next(r for r in rs.replicas() if r.address == address).state = ReplicaState.LIVE


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll `cond` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def idle(logits: dict[str, LogitServer]) -> Callable[[], bool]:
    """True once no logit service holds a session or a KV block (Release is fire-and-forget)."""
    return lambda: all(len(ls.engine.sessions) == 0 and ls.engine.pool.used_blocks == 0 for ls in logits.values())


@dataclass
class Mesh:
    logits: dict[str, LogitServer]
    combiner: CombinerServer
    channel: grpc.Channel

    @property
    def generator(self) -> generator_pb2_grpc.GeneratorStub:
        return generator_pb2_grpc.GeneratorStub(self.channel)

    def logit_stub(self, role: str) -> logit_pb2_grpc.LogitServiceStub:
        ch = grpc.insecure_channel(f"127.0.0.1:{self.logits[role].server.port}")
        return logit_pb2_grpc.LogitServiceStub(ch)


def start_combiner(tokenizer: Path, ports: dict[str, int], tracer_provider=None,
                   upstream_targets: dict[str, str] | None = None, meter_provider=None, defaults: Defaults | None = None,
                   **kwargs) -> CombinerServer:
    """A started combiner over loopback logit services; `upstream_targets` overrides a role's
    target (a replica list, a dns:/// name)."""
    cfg = CombinerConfig(
        upstreams={r: f"127.0.0.1:{p}" for r, p in ports.items()} | (upstream_targets or {}),
        tokenizer=str(tokenizer),
        defaults=defaults or Defaults(DEFAULT_COMPOSITION, SamplingConfig(temperature=1.0, top_p=1.0), 16, 64),
        server=ServerConfig(host="127.0.0.1", port=0, grace_s=1.0),
        **kwargs,
    )
    cs = build_combiner(cfg, tracer_provider=tracer_provider, meter_provider=meter_provider)
    cs.start()
    return cs


@pytest.fixture(scope="session")
def mesh(tiny_family: dict[str, Path]) -> Iterator[Mesh]:
    """Three logit services and a combiner on loopback, shared by the tests that only read."""
    logits = {role: start_logit(path, role) for role, path in tiny_family.items()}
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in logits.items()})
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    yield Mesh(logits, cs, channel)
    channel.close()
    cs.stop(0)
    for ls in logits.values():
        ls.server.stop(0).wait()


def held_sessions(logits: dict[str, LogitServer]) -> dict[str, list[str]]:
    """Role -> the sessions its service holds, each with its length and idle seconds."""
    out = {}
    for role, ls in logits.items():
        store, now = ls.engine.sessions, time.monotonic()
        out[role] = [f"{sid} ({s.length} tokens, idle {now - s.last_used:.1f} s)" for sid, s in list(store._sessions.items())]
    return {r: v for r, v in out.items() if v}


@pytest.fixture(autouse=True)
def _shared_mesh_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test on the shared mesh must leave it as it found it: no session, no KV block, within
    a few seconds of its end (Release is fire-and-forget). One that does not fails here, in its
    own teardown, naming what it left; the sessions are then released so that the tests after
    it start clean instead of failing for it (their idle checks would see its leftovers)."""
    yield
    if "mesh" not in request.fixturenames:
        return
    mesh: Mesh = request.getfixturevalue("mesh")
    if wait_for(idle(mesh.logits), 10.0):
        return
    left = held_sessions(mesh.logits)
    for ls in mesh.logits.values():
        for sid in list(ls.engine.sessions._sessions):
            ls.engine.release(sid)
    pytest.fail(f"this test left sessions on the shared mesh: {left}")


def collect(*readers) -> dict[str, list]:
    """Metric name -> data points, from one collection of each InMemoryMetricReader."""
    out: dict[str, list] = defaultdict(list)
    for reader in readers:
        data = reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out[m.name].extend(m.data.data_points)
    return out


def points(data: dict[str, list], name: str, **attrs) -> list:
    """The data points of `name` whose attributes include `attrs`."""
    return [p for p in data[name] if all(p.attributes.get(k) == v for k, v in attrs.items())]


# --- Free ports: tests never bind a fixed port (two runs, or a run beside `make run`, collide).
# Servers built here take port 0 and report the one they got; these are for what cannot: a
# port chosen before its server starts (a Prometheus endpoint, a service started late on a
# port a combiner already dials), or the launcher's base port (`eftmesh up --port P`: the
# combiner on P, the logit services on P+1..). A port is free when checked, not reserved.


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now (all bound at once, then released)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` now."""
    return free_ports(1, host)[0]


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A port p with p .. p+n-1 all free on `host` now: the base port of a launcher that puts
    its services on consecutive ports (eftmesh up, LocalMesh)."""
    import socket

    for _ in range(50):
        base = free_port(host)
        if base + n > 65536:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports on {host}")
