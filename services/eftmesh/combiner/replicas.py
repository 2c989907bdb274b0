"""Replicas of one role, and which replica each session's KV cache lives on.

A logit service keeps a session's KV cache in its own memory, so every call of a generation
must reach the replica that holds it. One gRPC channel to a Service name sticks all of a
combiner's sessions to one replica (HTTP/2 keeps one connection), so replicas past the number
of combiner pods sit idle; a round-robin channel scatters a session's calls and loses its cache
at every step. A `ReplicaSet` keeps a channel per replica instead and pins each session to one:
the least-loaded healthy replica when the session starts, another one when its replica fails
(which costs that session one re-prefill there).

Upstream targets (`--upstream ROLE=TARGET`):

    host:port                   one replica (or a Service name: its one connection picks a pod)
    host:port,host:port,...     a fixed set of replicas
    dns:///name:port            every address `name` resolves to, resolved again every few
                                seconds: a Kubernetes headless Service lists its ready pods

No gRPC here beyond holding channels and stubs: the calls and their retries are upstream.py's.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"

Resolver = Callable[[str, int], list[str]]


def parse_target(target: str) -> tuple[str, list[str]]:
    """("dns", [name:port]) or ("static", [host:port, ...]); raises ValueError naming the fix."""
    if target.startswith(DNS_PREFIX):
        rest = target[len(DNS_PREFIX):]
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected dns:///NAME:PORT, got {target!r}")
        return "dns", [rest]
    parts = [p.strip() for p in target.split(",")]
    for p in parts:
        host, sep, port = p.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT, got {target!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"replica listed twice in {target!r}")
    return "static", parts


def resolve_dns(name: str, port: int) -> list[str]:
    """Every address `name` resolves to, as host:port ([v6]:port), sorted; [] if none."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    out = set()
    for family, _, _, _, sockaddr in infos:
        host = sockaddr[0]
        out.add(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
    return sorted(out)


@dataclass
class Replica:
    """One logit-service replica of a role."""

    address: str
    channel: Any
    stub: Any
    verified: bool = False  # answered Info and matches the role's model
    down_until: float = 0.0  # monotonic time before which no new session is sent here
    draining: bool = False  # no longer in the target's resolution: no new sessions
    sessions: set[str] = field(default_factory=set)

    def available(self, now: float) -> bool:
        return self.verified and not self.draining and now >= self.down_until


class ReplicaSet:
    """The replicas of one role and the session pins; thread-safe."""

    def __init__(
        self,
        role: str,
        target: str,
        make_stub: Callable[[str], tuple[Any, Any]],
        resolver: Resolver = resolve_dns,
        cooldown_s: float = 5.0,
    ) -> None:
        self.role, self.target = role, target
        self.kind, self._entries = parse_target(target)
        self._make_stub = make_stub
        self._resolver = resolver
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}
        self._pins: dict[str, Replica] = {}
        self._turn = itertools.count()
        self.refresh()

    # --- membership -------------------------------------------------------------------------

    def resolve(self) -> list[str]:
        """The target's replica addresses now."""
        if self.kind == "static":
            return list(self._entries)
        host, _, port = self._entries[0].rpartition(":")
        return self._resolver(host, int(port))

    def refresh(self) -> tuple[list[Replica], list[str]]:
        """Resolve again: add new replicas (unverified), drain the ones gone, close drained
        replicas that hold no session. Returns (added, closed addresses). A resolution that
        finds nothing keeps the current replicas (a DNS hiccup must not drop every session)."""
        addresses = self.resolve()
        added, closed = [], []
        with self._lock:
            if addresses:
                for a in addresses:
                    r = self._replicas.get(a)
                    if r is None:
                        channel, stub = self._make_stub(a)
                        r = self._replicas[a] = Replica(a, channel, stub)
                        added.append(r)
                    r.draining = False
                for a, r in self._replicas.items():
                    if a not in addresses:
                        r.draining = True
            for a, r in list(self._replicas.items()):
                if r.draining and not r.sessions:
                    closed.append(a)
                    del self._replicas[a]
                    r.channel.close()
        for r in added:
            log.info("%s: replica %s found", self.role, r.address)
        for a in closed:
            log.info("%s: replica %s gone, channel closed", self.role, a)
        return added, closed

    def replicas(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas.values())

    def unverified(self) -> list[Replica]:
        with self._lock:
            return [r for r in self._replicas.values() if not r.verified and not r.draining]

    def mark_verified(self, address: str) -> None:
        with self._lock:
            if address in self._replicas:
                self._replicas[address].verified = True

    # --- routing ----------------------------------------------------------------------------

    def _pick(self, exclude: Sequence[str] = ()) -> Replica:
        now = time.monotonic()
        candidates = [r for r in self._replicas.values() if r.available(now) and r.address not in exclude]
        if not candidates:  # every replica is down or draining: try the least recently failed
            candidates = [r for r in self._replicas.values() if r.verified and r.address not in exclude] or \
                [r for r in self._replicas.values() if r.verified] or list(self._replicas.values())
            if not candidates:
                raise LookupError(f"no replica of {self.role} at {self.target}")
            return min(candidates, key=lambda r: (r.draining, r.down_until))
        fewest = min(len(r.sessions) for r in candidates)
        tied = [r for r in candidates if len(r.sessions) == fewest]
        return tied[next(self._turn) % len(tied)]

    def route(self, session_id: str) -> Replica:
        """The replica holding `session_id`'s cache; a new session is pinned to the
        least-loaded available replica."""
        with self._lock:
            r = self._pins.get(session_id)
            if r is None:
                r = self._pick()
                r.sessions.add(session_id)
                self._pins[session_id] = r
            return r

    def repin(self, session_id: str, failed: Replica) -> Replica:
        """`failed` did not answer: keep new sessions off it for the cooldown and move this
        session to another replica (the same one if it is the only one)."""
        with self._lock:
            failed.down_until = time.monotonic() + self.cooldown_s
            failed.sessions.discard(session_id)
            r = self._pick(exclude=[failed.address]) if len(self._replicas) > 1 else failed
            r.sessions.add(session_id)
            self._pins[session_id] = r
        if r is not failed:
            log.warning("%s: session %s moved from %s to %s", self.role, session_id, failed.address, r.address)
        return r

    def unpin(self, session_id: str) -> Replica | None:
        """Forget the session; returns the replica that held it (to release its cache there)."""
        with self._lock:
            r = self._pins.pop(session_id, None)
            if r is not None:
                r.sessions.discard(session_id)
            return r

    def load(self) -> dict[str, int]:
        """Sessions pinned per replica address."""
        with self._lock:
            return {a: len(r.sessions) for a, r in self._replicas.items()}

    def close(self) -> None:
        with self._lock:
            for r in self._replicas.values():
                r.channel.close()
            self._replicas.clear()
            self._pins.clear()
