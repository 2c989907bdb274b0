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
    k8s:///service.namespace:port
                                the endpoints of Kubernetes Service `service` in `namespace`
                                (its EndpointSlices, watched through the API: discovery.py);
                                `k8s:///service:port` is the combiner pod's own namespace, and
                                port may be the Service port's name. Ready endpoints get new
                                sessions; terminating and not-ready ones keep the sessions
                                pinned there but get no new ones; changes apply as the API
                                server reports them. The combiner needs get/list/watch on
                                discovery.k8s.io endpointslices.

Prefix-aware routing. A logit service caches full KV blocks by their tokens (prefix caching),
so a new generation is best sent where an earlier one with the same beginning went: its system
prompt, or its conversation's history, is prefilled there already. As SGLang's cache-aware
router does, a new session goes to the replica its prompt's first `ROUTE_PREFIX_TOKENS` tokens
hash to, unless that replica holds more than `slack` sessions beyond the least loaded one (then
to the least loaded). The hash is rendezvous (highest random weight) hashing over the available
replicas: stateless, so every combiner pod agrees without sharing anything, and when a replica
goes away only the prefixes that preferred it move. Prompts shorter than ROUTE_PREFIX_TOKENS are
keyed by all their tokens (a chat whose first turn is that short may find its second turn on
another replica: a one-time miss). Failover moves sessions to the least loaded replica.

No gRPC here beyond holding channels and stubs: the calls and their retries are upstream.py's.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import logging
import socket
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eftmesh.combiner.discovery import K8S_PREFIX, READY, parse_k8s_target

if TYPE_CHECKING:
    from eftmesh.combiner.discovery import EndpointSliceWatcher

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"

# How many of a prompt's first tokens choose its replica (prefix-aware routing): a few KV blocks,
# as long as a typical shared system prompt's start, short enough that a chat's later turns
# (which re-send the history) hash alike once the first turn is this long.
ROUTE_PREFIX_TOKENS = 64


def prefix_key(tokens: Sequence[int]) -> bytes:
    """The routing key of a prompt: a hash of its first ROUTE_PREFIX_TOKENS tokens."""
    return hashlib.blake2b(array("q", tokens[:ROUTE_PREFIX_TOKENS]).tobytes(), digest_size=16).digest()


def rendezvous(key: bytes, replicas: Sequence[Replica]) -> Replica:
    """The replica with the highest hash of (key, address): every caller agrees, and removing a
    replica moves only the keys it won."""
    return max(replicas, key=lambda r: hashlib.blake2b(key + r.address.encode(), digest_size=8).digest())

Resolver = Callable[[str, int], list[str]]


def parse_target(target: str) -> tuple[str, list[str]]:
    """("static", [host:port, ...]), ("dns", [name:port]) or ("k8s", [service.namespace:port]);
    raises ValueError naming the fix.

        HOST:PORT[,HOST:PORT...]          a fixed set of replicas
        dns:///NAME:PORT                  every address NAME resolves to (polled)
        k8s:///SERVICE[.NAMESPACE]:PORT   Service SERVICE's EndpointSlices, watched through the
                                          Kubernetes API (namespace: the pod's own if omitted;
                                          PORT: a number, or the name of the Service's port)
    """
    if target.startswith(K8S_PREFIX):
        parse_k8s_target(target)
        return "k8s", [target[len(K8S_PREFIX):]]
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
            raise ValueError(
                f"expected HOST:PORT[,HOST:PORT...], dns:///NAME:PORT or k8s:///SERVICE.NAMESPACE:PORT, got {target!r}")
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


class ReplicaState(enum.Enum):
    """What the combiner has concluded about a replica. `ReplicaMonitor` (monitor.py) alone
    writes it, from its Info, its health probes and what calls report."""

    UNVERIFIED = "unverified"  # found; its Info has not (yet) matched the role's model
    LIVE = "live"  # answers, and takes new sessions
    DRAINING = "draining"  # answers and serves the sessions it holds; takes no new ones
    DOWN = "down"  # does not answer (a failed call, a missed deadline, timed-out probes)


@dataclass
class Replica:
    """One logit-service replica of a role.

    Two facts, two writers: `membership` is what the target's resolution says (ReplicaSet
    writes it); `state` and the fields after it are what the combiner concluded (the monitor
    writes them, under its lock). Routing reads both."""

    address: str
    channel: Any
    stub: Any
    membership: str = READY  # ready | terminating | not_ready | gone (k8s:///; else ready or gone)
    state: ReplicaState = ReplicaState.UNVERIFIED
    why: str = ""  # why it is not live, in a few words (logs, errors)
    live_at: float = float("-inf")  # monotonic time it was last seen live
    misses: int = 0  # health probes in a row that timed out
    suspect_until: float = 0.0  # missed a call's deadline: no new session before this, whatever its health says
    down_until: float = 0.0  # monotonic time before which no new session is sent here
    sessions: set[str] = field(default_factory=set)
    batch_release: bool = False  # its Info says ScoreBatch and DraftBatch take `release` (upstream.py)
    release_many: bool = False  # its Info says one Release takes many sessions (`session_ids`; releases.py)

    @property
    def draining(self) -> bool:
        """Not ready in the target's resolution (gone, terminating): no new sessions."""
        return self.membership != READY

    @property
    def verified(self) -> bool:
        """Its Info matched the role's model (it may be down since)."""
        return self.state is not ReplicaState.UNVERIFIED

    def available(self, now: float) -> bool:
        return self.state is ReplicaState.LIVE and not self.draining and now >= self.down_until


class ReplicaSet:
    """The replicas of one role and the session pins; thread-safe.

    A k8s:/// target is followed by an `EndpointSliceWatcher` (`watcher`, or one made here with
    the in-cluster ServiceAccount), which calls `refresh()` on every change it sees, then
    `on_change(self)` (e.g. to verify new replicas at once). `close()` stops it."""

    def __init__(
        self,
        role: str,
        target: str,
        make_stub: Callable[[str], tuple[Any, Any]],
        resolver: Resolver = resolve_dns,
        watcher: EndpointSliceWatcher | None = None,
        on_change: Callable[[ReplicaSet], None] | None = None,
        sync_timeout_s: float = 2.0,
        prefix_slack: int | None = 8,
    ) -> None:
        """`prefix_slack`: prefix-aware routing's bound (a new session goes to its prefix's
        replica unless that holds more than this many sessions beyond the least loaded one);
        None routes every new session to the least loaded replica."""
        self.role, self.target = role, target
        self.kind, self._entries = parse_target(target)
        self._make_stub = make_stub
        self._resolver = resolver
        self.prefix_slack = prefix_slack
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # one refresh at a time: a stale one never wins
        self._replicas: dict[str, Replica] = {}
        self._pins: dict[str, Replica] = {}
        self._turn = itertools.count()
        self._on_change = on_change
        self.watcher: EndpointSliceWatcher | None = None
        if self.kind == "k8s":
            if watcher is None:
                from eftmesh.combiner.discovery import EndpointSliceWatcher

                watcher = EndpointSliceWatcher(parse_k8s_target(target))
            self.watcher = watcher
            watcher.add_listener(self._endpoints_changed)
            watcher.start()
            if not watcher.wait_synced(sync_timeout_s):
                log.warning("%s: no EndpointSlices of %s yet (the API server has not answered); waiting",
                            role, target)
        self.refresh()

    # --- membership -------------------------------------------------------------------------

    def resolve(self) -> list[str]:
        """The target's replica addresses now (for k8s:///, the ready ones)."""
        states = self.resolve_states()
        return [a for a, s in (states or {}).items() if s == READY]

    def resolve_states(self) -> dict[str, str] | None:
        """{address: ready | terminating | not_ready} now; None while a k8s:/// watch has not
        listed yet (nothing known, nothing to change)."""
        if self.kind == "static":
            return dict.fromkeys(self._entries, READY)
        if self.kind == "k8s":
            assert self.watcher is not None
            return self.watcher.endpoints() if self.watcher.synced else None
        host, _, port = self._entries[0].rpartition(":")
        return dict.fromkeys(self._resolver(host, int(port)), READY)

    def refresh(self) -> tuple[list[Replica], list[str]]:
        """Resolve again: add new ready replicas (unverified), drain the ones gone, terminating
        or not ready (their pinned sessions stay; no new ones), close drained replicas that hold
        no session. Returns (added, closed addresses). A DNS resolution that finds nothing keeps
        the current replicas (a DNS hiccup must not drop every session); an EndpointSlice watch
        is taken at its word, and keeps its last state while the API server is away."""
        with self._refreshing:
            states = self.resolve_states()
            added, closed, drained = [], [], []
            with self._lock:
                if states is not None and (states or self.kind == "k8s"):
                    for a, state in states.items():
                        r = self._replicas.get(a)
                        if r is None and state == READY:
                            channel, stub = self._make_stub(a)
                            r = self._replicas[a] = Replica(a, channel, stub)
                            added.append(r)
                        if r is not None:
                            if state != READY and not r.draining:
                                drained.append((r, state, len(r.sessions)))
                            r.membership = state
                    for a, r in self._replicas.items():
                        if a not in states:
                            if not r.draining:
                                drained.append((r, "gone", len(r.sessions)))
                            r.membership = "gone"
                for a, r in list(self._replicas.items()):
                    if r.draining and not r.sessions:
                        closed.append(a)
                        del self._replicas[a]
                        r.channel.close()
        for r in added:
            log.info("%s: replica %s found", self.role, r.address)
        for r, state, n in drained:
            log.info("%s: replica %s %s: no new sessions, %d pinned stay", self.role, r.address, state, n)
        for a in closed:
            log.info("%s: replica %s gone, channel closed", self.role, a)
        return added, closed

    def _endpoints_changed(self) -> None:
        """The watcher saw a change: apply it now, then tell the owner."""
        self.refresh()
        if self._on_change is not None:
            self._on_change(self)

    def replicas(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas.values())

    # --- routing ----------------------------------------------------------------------------

    def _pick(self, exclude: Sequence[str] = (), prefix: bytes | None = None) -> Replica:
        now = time.monotonic()
        candidates = [r for r in self._replicas.values() if r.available(now) and r.address not in exclude]
        if not candidates:  # every replica is down or draining: try the least recently failed
            candidates = [r for r in self._replicas.values() if r.verified and r.address not in exclude] or \
                [r for r in self._replicas.values() if r.verified] or list(self._replicas.values())
            if not candidates:
                raise LookupError(f"no replica of {self.role} at {self.target}")
            return min(candidates, key=lambda r: (r.draining, r.down_until))
        fewest = min(len(r.sessions) for r in candidates)
        if prefix is not None and self.prefix_slack is not None and len(candidates) > 1:
            preferred = rendezvous(prefix, candidates)
            if len(preferred.sessions) <= fewest + self.prefix_slack:
                log.debug("%s: prefix %s -> %s (its replica)", self.role, prefix.hex()[:8], preferred.address)
                return preferred
            log.debug("%s: prefix %s -> the least loaded replica: %s holds %d sessions, more than %d + %d",
                      self.role, prefix.hex()[:8], preferred.address, len(preferred.sessions), fewest,
                      self.prefix_slack)
        tied = [r for r in candidates if len(r.sessions) == fewest]
        return tied[next(self._turn) % len(tied)]

    def route(self, session_id: str, prefix: bytes | None = None) -> Replica:
        """The replica holding `session_id`'s cache; a new session is pinned to its `prefix`'s
        replica (prefix_key; within the slack), else to the least-loaded available replica."""
        with self._lock:
            r = self._pins.get(session_id)
            if r is None:
                r = self._pick(prefix=prefix)
                r.sessions.add(session_id)
                self._pins[session_id] = r
            return r

    def repin(self, session_id: str, failed: Replica) -> Replica:
        """`failed` did not answer (the monitor has marked it): move this session to another
        replica (the same one if it is the only one)."""
        with self._lock:
            failed.sessions.discard(session_id)
            r = self._pick(exclude=[failed.address]) if len(self._replicas) > 1 else failed
            r.sessions.add(session_id)
            self._pins[session_id] = r
        if r is not failed:
            log.warning("%s: session %s moved from %s to %s", self.role, session_id, failed.address, r.address)
        return r

    def pinned(self, session_id: str) -> Replica | None:
        """The replica the session is pinned to now, if any."""
        with self._lock:
            return self._pins.get(session_id)

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
        if self.watcher is not None:
            self.watcher.stop()
        with self._lock:
            for r in self._replicas.values():
                r.channel.close()
            self._replicas.clear()
            self._pins.clear()
