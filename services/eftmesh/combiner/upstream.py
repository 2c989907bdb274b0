"""The logit services over gRPC: connection, compatibility check, health, and the batched calls.

Each scheduler step sends a role one ScoreBatch (or DraftBatch) per replica that holds some of
the step's sessions (replicas.py pins each session to the replica with its cache). An item
whose cache is gone (NOT_FOUND: evicted, expired, or a replica that restarted) is re-sent its
whole prefix; an unreachable replica (UNAVAILABLE), or one that refuses new sessions because it
is draining (per-item UNAVAILABLE "draining: ..."), loses its sessions to another live replica
of the role. Losing a logit replica mid-generation therefore costs a re-prefill, not the request.

Lifecycle. `start()` tries every upstream once and returns; a monitor thread then keeps at it,
with no deadline unless `connect_timeout_s` is set, logging which roles it still waits for.
Every `health_interval_s` it asks each verified replica for its gRPC health (grpc.health.v1)
and calls `on_health(True)` once every role has a live replica, `on_health(False)` as soon as
one role has none. A call for a role with no live replica fails UNAVAILABLE at once instead of
waiting for the replica to come back.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner.deadlines import CallDeadlines, DeadlinePolicy
from eftmesh.combiner.replicas import Replica, ReplicaSet, Resolver, resolve_dns
from eftmesh.combiner.scoring import C, DraftCall, ModelSpec, Outcome, ScoreCall, with_resend
from eftmesh.common import tensors, tracing
from eftmesh.common.convert import sampling_to_pb
from eftmesh.common.errors import (
    DRAINING_PREFIX,
    EftMeshError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from eftmesh.common.metrics import CombinerMetrics, meter
from eftmesh.common.serving import CHANNEL_OPTIONS
from eftmesh.core.mixing import floor_rows_
from eftmesh.common.tls import ClientTLS, channel as tls_channel, target_host
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

log = logging.getLogger(__name__)

# Reconnect quickly after a replica goes away: gRPC's default first back-off is 1 s.
_UPSTREAM_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# A logit service that stops taking new sessions (SIGTERM) refuses a new session's item with
# UNAVAILABLE and a message starting with DRAINING_PREFIX; its live sessions go on being served.

# Releases of a session moved off a replica, until one finds it gone (see _release_orphans).
ORPHAN_RELEASES = 3

# Replica states, from the health probe and from the calls.
LIVE = "live"  # answers and takes new sessions
DRAINING = "draining"  # answers, serves the sessions it holds, takes no new ones
DOWN = "down"  # does not answer (or not verified yet)


@dataclass(frozen=True)
class UpstreamPolicy:
    """Timeouts, retries and health checking of the logit services."""

    # The longest a call to a logit service may take (and the cap of the derived deadlines).
    call_timeout_s: float = 30.0
    # A call past `margin` x what the role's calls take (at least `floor`) is given up on while
    # another live replica of the role can take its sessions over (deadlines.py).
    deadline_margin: float = 10.0
    deadline_floor_s: float = 1.0
    # Moves of one call's sessions to another replica after UNAVAILABLE or a draining refusal.
    retries: int = 3
    # How long start-up waits for every upstream before giving up; 0 = no deadline (the
    # combiner serves NOT_SERVING meanwhile).
    connect_timeout_s: float = 0.0
    # How often replica targets are resolved again (dns:///...) and new replicas verified.
    resolve_interval_s: float = 5.0
    # How long a replica that failed a call gets no new sessions.
    replica_cooldown_s: float = 5.0
    # How often every replica's health is checked, and each check's timeout.
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    # How long a call that finds a role's only live replica gone waits for it to come back
    # (a quick restart) before failing UNAVAILABLE; calls for a role already known to have no
    # live replica fail at once.
    rejoin_wait_s: float = 1.5
    # How often start-up logs the upstreams it still waits for.
    wait_log_interval_s: float = 5.0
    # TLS to the logit services (a CA bundle, and a client certificate for mTLS); None: plaintext.
    # Unless it names one, a replica's certificate must carry its role's target host name.
    tls: ClientTLS | None = None


class UpstreamError(EftMeshError):
    """An upstream logit service refused a call; keeps its status code, names the role."""

    def __init__(self, role: str, err: grpc.RpcError) -> None:
        self.code = err.code()
        super().__init__(f"upstream {role}: {err.details()}")


class _Models(dict):
    """role -> `ModelSpec` of every role that has answered. A configured role that has not
    answered yet is `in` it (a request naming it is valid), but looking it up raises
    Unavailable naming the roles still awaited, so such a request fails fast and says why."""

    def __init__(self, addresses: Mapping[str, str]) -> None:
        super().__init__()
        self._addresses = dict(addresses)

    def __contains__(self, role: object) -> bool:
        return role in self._addresses

    def __missing__(self, role: str) -> ModelSpec:
        if role not in self._addresses:
            raise KeyError(role)
        waiting = [f"{r} at {a}" for r, a in self._addresses.items() if not dict.__contains__(self, r)]
        raise Unavailable(f"upstream {role} has not answered yet; the combiner is waiting for {', '.join(waiting)}")


class GrpcScorer:
    """`Scorer` over logit services reached by gRPC: a `ReplicaSet` per role, each session
    pinned to the replica that holds its KV cache, every replica's health watched."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        policy: UpstreamPolicy = UpstreamPolicy(),
        tracer_provider: TracerProvider | None = None,
        fanout_threads_per_role: int = 16,
        resolver: Resolver = resolve_dns,
        metrics: CombinerMetrics | None = None,
    ) -> None:
        self.policy = policy
        self.metrics = metrics or CombinerMetrics(meter(None, "eftmesh.combiner"))
        self.addresses = dict(addresses)
        # Health checks go over the untraced channel under each replica's (the same connection).
        self._health_stubs: dict[str, health_pb2_grpc.HealthStub] = {}

        def make_stub(address: str, server_name: str | None = None) -> tuple[grpc.Channel, logit_pb2_grpc.LogitServiceStub]:
            raw = tls_channel(address, policy.tls, _UPSTREAM_OPTIONS, server_name)
            self._health_stubs[address] = health_pb2_grpc.HealthStub(raw)
            channel = tracing.traced_channel(raw, tracer_provider)
            return channel, logit_pb2_grpc.LogitServiceStub(channel)

        self._stop = threading.Event()
        self._wake = threading.Event()  # a membership change: check at once, not at the next tick
        self.replicas = {
            role: ReplicaSet(role, target, lambda a, name=target_host(target): make_stub(a, name), resolver=resolver, cooldown_s=policy.replica_cooldown_s,
                             on_change=lambda rs: self._wake.set())
            for role, target in self.addresses.items()
        }
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(self.replicas) * fanout_threads_per_role), thread_name_prefix="upstream")
        self.models: dict[str, ModelSpec] = _Models(self.addresses)
        self._lock = threading.Lock()
        self.deadlines = CallDeadlines(DeadlinePolicy(policy.deadline_margin, policy.deadline_floor_s,
                                                      policy.call_timeout_s))
        # (role, address) -> until when a replica that missed a deadline gets no new session,
        # whatever its health says (a hung model can leave the health service answering)
        self._suspect_until: dict[tuple[str, str], float] = {}
        # (role, address) -> session id -> Release attempts: sessions moved off a replica,
        # released there once it answers again (else they would hold its KV cache until expiry)
        self._orphans: dict[tuple[str, str], dict[str, int]] = {}
        self._state: dict[tuple[str, str], str] = {}  # (role, address) -> LIVE / DRAINING / DOWN
        self._why: dict[tuple[str, str], str] = {}  # (role, address) -> why it is not live
        self._live_at: dict[tuple[str, str], float] = {}  # (role, address) -> when last seen live (monotonic)
        self._misses: dict[tuple[str, str], int] = {}  # consecutive health checks that timed out
        self._monitor: threading.Thread | None = None
        self._check: Callable[[Mapping[str, ModelSpec]], None] = lambda models: None
        self._checked: set[str] = set()
        self.on_health: Callable[[bool], None] = lambda serving: None
        self.on_fatal: Callable[[EftMeshError], None] = lambda err: None
        # The combiner's current block cap (its servicer's defaults.speculation.max_k, which
        # cap_k lowers to the smallest --max-k); None: the role's first replica's max_k.
        self.k_cap: Callable[[], int] | None = None
        self.fatal: EftMeshError | None = None
        self._serving: bool | None = None
        self._report_lock = threading.RLock()
        self._all_live = threading.Event()

    # --- start-up and health --------------------------------------------------------------------

    def start(
        self,
        check: Callable[[Mapping[str, ModelSpec]], None] = lambda models: None,
        on_health: Callable[[bool], None] | None = None,
        on_fatal: Callable[[EftMeshError], None] | None = None,
    ) -> None:
        """Try every upstream once, then watch them in the background.

        `check(models)` is run on the models of the roles that answered (all of them at once
        if every role answered the first try, else each role as it first answers); what it
        raises is fatal. Raised here when found in the first try; afterwards `on_fatal(err)` is
        called and the monitor stops. `on_health(serving)` is called whenever "every role has
        a live replica" changes (first with True or False at the end of the first try)."""
        self._check = check
        if on_health is not None:
            self.on_health = on_health
        if on_fatal is not None:
            self.on_fatal = on_fatal
        started = time.monotonic()
        self._tick(first=True)
        if self.fatal is not None:
            raise self.fatal
        self._monitor = threading.Thread(target=self._monitor_loop, args=(started,), name="upstream-health", daemon=True)
        self._monitor.start()

    def connect(self, timeout: float | None = None) -> dict[str, ModelSpec]:
        """`start()` without a compatibility check, then wait until every role has a live
        replica (Unavailable after `timeout` s, naming the roles missing). Returns `models`."""
        if self._monitor is None:
            self.start()
        if not self.wait_live(timeout):
            raise Unavailable(f"no live replica of {', '.join(self.missing_roles())} within {timeout} s")
        return self.models

    def wait_live(self, timeout: float | None = None) -> bool:
        """Wait until every role has a live replica; False if `timeout` passed first."""
        return self._all_live.wait(timeout)

    def live_roles(self) -> list[str]:
        """Roles with at least one live (verified, healthy, not draining) replica."""
        with self._lock:
            return [role for role in self.replicas if self._live_replicas(role)]

    def missing_roles(self) -> list[str]:
        """Roles with no live replica: a request needing one of them fails UNAVAILABLE."""
        live = set(self.live_roles())
        return [role for role in self.replicas if role not in live]

    def _live_replicas(self, role: str, exclude: str | None = None) -> list[Replica]:
        return [r for r in self.replicas[role].replicas()
                if r.verified and not r.draining and r.address != exclude
                and self._state.get((role, r.address)) == LIVE]

    def _set_state(self, role: str, replica: Replica, state: str, why: str = "",
                   observed_at: float | None = None) -> None:
        """Record a replica's state; keep new sessions off it while it is not live.

        `observed_at` is when the probe that saw `state` was sent: a probe sent before the
        replica was last seen live (a call's rejoin found it back meanwhile) is stale, and a
        stale "down" must not take a replica that came back out again."""
        key = (role, replica.address)
        with self._lock:
            if state != LIVE and observed_at is not None and observed_at < self._live_at.get(key, float("-inf")):
                return
            before = self._state.get(key)
            if state == LIVE:
                self._live_at[key] = time.monotonic()
            self._state[key] = state
            self._why[key] = why
        if state == LIVE:
            replica.down_until = self._suspect_until.get(key, 0.0)
        else:
            replica.down_until = max(replica.down_until, time.monotonic() + max(self.policy.replica_cooldown_s,
                                                                              3 * self.policy.health_interval_s))
        if before is not None and before != state:
            log.log(logging.INFO if state == LIVE else logging.WARNING, "%s replica %s is %s%s",
                    role, replica.address, state, f" ({why})" if why else "")

    def _monitor_loop(self, started: float) -> None:
        last_wait_log = time.monotonic()
        while True:
            self._wake.wait(self.policy.health_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._tick()
            except Exception:  # a resolver or probe bug must not kill the loop that heals the mesh
                if self._stop.is_set():
                    return
                log.exception("checking upstream replicas failed")
            if self.fatal is not None:
                return
            missing = [r for r in self.replicas if not dict.__contains__(self.models, r)]
            if missing and self.policy.connect_timeout_s > 0 and time.monotonic() - started > self.policy.connect_timeout_s:
                self._die(Unavailable(f"upstream(s) {self._waiting_for(missing)} did not answer within "
                                      f"{self.policy.connect_timeout_s:.0f} s"))
                return
            if missing and time.monotonic() - last_wait_log >= self.policy.wait_log_interval_s:
                last_wait_log = time.monotonic()
                log.info("waiting for upstreams: %s", self._waiting_for(missing))

    def _waiting_for(self, roles: Sequence[str]) -> str:
        parts = []
        for role in roles:
            whys = sorted({self._why.get((role, r.address), "") for r in self.replicas[role].replicas()} - {""})
            parts.append(f"{role} at {self.addresses[role]}" + (f" ({'; '.join(whys)})" if whys else ""))
        return ", ".join(parts)

    def _die(self, err: EftMeshError) -> None:
        self.fatal = err
        self._report(False)
        self.on_fatal(err)

    def _tick(self, first: bool = False) -> None:
        """One round: resolve the targets (every `resolve_interval_s`, or now while a role has
        no live replica), verify new replicas (Info), check the others' health, and report."""
        now = time.monotonic()
        due = first or now - getattr(self, "_resolved_at", 0.0) >= self.policy.resolve_interval_s
        for role, rs in self.replicas.items():
            if due or not self._live_replicas(role):
                rs.refresh()
        if due:
            self._resolved_at = now
        # Every call of the round in flight at once: a black-holed replica costs one timeout.
        sent = time.monotonic()
        info: list[tuple[str, Replica, Any]] = []
        checks: list[tuple[str, Replica, Any]] = []
        for role, rs in self.replicas.items():
            for r in rs.replicas():
                if r.draining:
                    continue
                stub = self._health_stubs.get(r.address)
                state = self._state.get((role, r.address))
                if not r.verified or stub is None:
                    info.append((role, r, self._info_future(r, 2.0 if first else self.policy.health_timeout_s)))
                else:
                    checks.append((role, r, stub.Check.future(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=self.policy.health_timeout_s)))
                    if state == DOWN:  # coming back: may be a new process, so verify it again
                        info.append((role, r, self._info_future(r, self.policy.health_timeout_s)))
        fresh: dict[str, ModelSpec] = {}
        verified: dict[tuple[str, str], bool] = {}
        for role, r, fut in info:
            try:
                got = fut.result()
            except grpc.RpcError as e:
                self._set_state(role, r, DOWN, _brief(e), observed_at=sent)
                verified[(role, r.address)] = False
                continue
            spec = ModelSpec.from_info(role, self.addresses[role], got)
            if not dict.__contains__(self.models, role):
                self.models.setdefault(role, spec)
                fresh[role] = spec
            ok = self._matches(role, spec, r.address)
            verified[(role, r.address)] = ok
            if ok and not r.verified:
                self.replicas[role].mark_verified(r.address)
                self._set_state(role, r, LIVE)
            elif not ok:
                self._set_state(role, r, DOWN, "serves another model or a smaller --max-k")
        for role, r, fut in checks:
            if verified.get((role, r.address)) is False:
                fut.cancel()
                continue
            try:
                status = fut.result().status
            except grpc.RpcError as e:
                self._on_probe_error(role, r, e, sent)
                continue
            self._misses.pop((role, r.address), None)
            if status == health_pb2.HealthCheckResponse.SERVING:
                self._set_state(role, r, LIVE)
            else:
                self._set_state(role, r, DRAINING, "health " + health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                                observed_at=sent)
        if fresh:
            with_all = first and all(dict.__contains__(self.models, role) for role in self.replicas)
            try:
                self._check(dict(self.models) if with_all else fresh)
            except EftMeshError as e:
                self._die(e)
                return
        self._report(not self.missing_roles())
        self._release_orphans()

    def _info_future(self, r: Replica, timeout: float) -> Any:
        return r.stub.Info.future(logit_pb2.LogitServiceInfoRequest(), timeout=timeout)

    def _on_probe_error(self, role: str, r: Replica, e: grpc.RpcError, sent: float) -> None:
        code = e.code()
        if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            # It answered: health is served elsewhere (another port), or it is saturated.
            self._misses.pop((role, r.address), None)
            self._set_state(role, r, LIVE)
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Slow is not gone (a saturated server queues the check): down after three timeouts
            # in a row. A dead process or a closed port is UNAVAILABLE at once.
            misses = self._misses[(role, r.address)] = self._misses.get((role, r.address), 0) + 1
            if misses < 3:
                return
        self._set_state(role, r, DOWN, _brief(e), observed_at=sent)

    def _report(self, serving: bool) -> None:
        with self._report_lock:  # callbacks in the order of the states they report
            self._report_locked(serving)

    def _report_locked(self, serving: bool) -> None:
        if serving:
            self._all_live.set()
        else:
            self._all_live.clear()
        changed, self._serving = serving != self._serving, serving
        if not changed:
            return
        if serving:
            log.info("every role has a live replica: %s", ", ".join(self.replicas))
        else:
            missing = self.missing_roles()
            log.warning("no live replica of %s", self._waiting_for(missing) if missing else "(stopped)")
        self.on_health(serving)

    def _suspect(self, role: str, replica: Replica, why: str) -> None:
        """A call to `replica` missed its derived deadline: no new session there for the
        cooldown, even if its health answers (a hung model can leave that running), and down
        until its health says otherwise."""
        key = (role, replica.address)
        with self._lock:
            self._suspect_until[key] = time.monotonic() + max(self.policy.replica_cooldown_s,
                                                               3 * self.policy.health_interval_s)
        self._lost(role, replica, why)

    def _orphan(self, role: str, replica: Replica, session_id: str) -> None:
        with self._lock:
            self._orphans.setdefault((role, replica.address), {}).setdefault(session_id, 0)

    def _release_orphans(self) -> None:
        """Release, on each replica that is live again, the sessions moved off it. A call that
        hung there may still run when it wakes and re-create its session, so a session is
        released until a Release finds it gone (at most ORPHAN_RELEASES times)."""
        with self._lock:
            snapshot = {key: list(sids) for key, sids in self._orphans.items()}
        for (role, address), sids in snapshot.items():
            if self._state.get((role, address)) not in (LIVE, DRAINING):
                continue
            replica = next((r for r in self.replicas[role].replicas() if r.address == address), None)
            if replica is None:  # it left the role: nothing to release
                with self._lock:
                    self._orphans.pop((role, address), None)
                continue
            for sid in sids:
                if self.replicas[role].pinned(sid) is replica:  # it moved back there: in use
                    with self._lock:
                        self._orphans.get((role, address), {}).pop(sid, None)
                    continue
                try:
                    fut = replica.stub.Release.future(logit_pb2.ReleaseRequest(session_id=sid),
                                                      timeout=self.policy.health_timeout_s)
                except ValueError:  # its channel was closed meanwhile
                    continue
                fut.add_done_callback(lambda f, key=(role, address), sid=sid: self._released(key, sid, f))

    def _released(self, key: tuple[str, str], sid: str, fut: Any) -> None:
        try:
            held = fut.result().released
        except (grpc.RpcError, grpc.FutureCancelledError):
            return  # not answering yet: the next round tries again
        with self._lock:
            sids = self._orphans.get(key, {})
            tries = sids.get(sid, 0) + 1
            if not held or tries >= ORPHAN_RELEASES:
                sids.pop(sid, None)
                if not sids:
                    self._orphans.pop(key, None)
            elif sid in sids:
                sids[sid] = tries

    def _lost(self, role: str, replica: Replica, why: str) -> None:
        """A call found `replica` gone: mark it down now (the next health check may bring it
        back) and report a role left with no live replica at once."""
        self._set_state(role, replica, DOWN, why)
        if not self._live_replicas(role):
            self._report(False)

    def _matches(self, role: str, spec: ModelSpec, address: str) -> bool:
        want = self.models[role]
        same = (spec.tokenizer_fingerprint, spec.vocab_size) == (want.tokenizer_fingerprint, want.vocab_size)
        if not same:
            log.error("%s replica %s serves %s (tokenizer %s, %d rows), unlike the role's %s (%s, %d): not used",
                      role, address, spec.model_id, spec.tokenizer_fingerprint, spec.vocab_size,
                      want.model_id, want.tokenizer_fingerprint, want.vocab_size)
            return False
        # Replicas of a role must render chats alike: the combiner renders with the template the
        # role's first replica reported, and a replica with another would have been meant to
        # serve another format (a rolling update of the template is a new role, or all at once).
        if spec.chat_template != want.chat_template:
            log.error("%s replica %s reports another chat template than the role's (%s): not used", role, address,
                      "none" if not spec.chat_template else f"{len(spec.chat_template)} characters")
            return False
        # A replica whose Draft takes fewer tokens than the blocks the combiner asks for would fail
        # every draft it is given with INVALID_ARGUMENT. The role's first replica is exempt: its
        # --max-k is what cap_k lowers the cap to, right after this check.
        if spec is not want and spec.max_k > 0:
            cap = self.k_cap() if self.k_cap is not None else want.max_k
            if spec.max_k < cap:
                log.error("%s replica %s takes drafts of at most %d tokens (--max-k), less than the combiner's "
                          "block cap of %d: not used", role, address, spec.max_k, cap)
                return False
        return True

    def refresh(self) -> None:
        """One monitor round now: re-resolve every role's target, verify replicas not yet
        verified (Info), check the others' health."""
        self._tick()

    def score_batch(self, role: str, calls: Sequence[ScoreCall]) -> list[Outcome]:
        def build(cs: Sequence[ScoreCall], zero: bool) -> logit_pb2.ScoreBatchRequest:
            return logit_pb2.ScoreBatchRequest(items=[
                logit_pb2.ScoreItem(session_id=c.session_id, start=s, tokens=c.tokens[s:], rows=c.rows)
                for c in cs for s in [0 if zero else c.start]
            ])

        return with_resend(calls, lambda cs, zero: self._batched(role, "ScoreBatch", cs, build, zero))

    def draft_batch(self, role: str, calls: Sequence[DraftCall]) -> list[Outcome]:
        def build(cs: Sequence[DraftCall], zero: bool) -> logit_pb2.DraftBatchRequest:
            return logit_pb2.DraftBatchRequest(items=[
                logit_pb2.DraftItem(session_id=c.session_id, start=s, tokens=c.tokens[s:], k=c.k,
                                    sampling=sampling_to_pb(c.sampling), seed=c.seed, vocab_limit=c.vocab_limit)
                for c in cs for s in [0 if zero else c.start]
            ])

        return with_resend(calls, lambda cs, zero: self._batched(role, "DraftBatch", cs, build, zero))

    def _batched(
        self,
        role: str,
        method: str,
        calls: Sequence[C],
        build: Callable[[Sequence[C], bool], Any],
        zero: bool,
        attempt: int = 0,
    ) -> list[Outcome]:
        """One `method` call per replica holding some of `calls`' sessions (concurrently when
        there are several). A session whose replica is down (known from the health checks, or
        found by the call: UNAVAILABLE, or CANCELLED by its shutdown), or which a draining
        replica refuses, moves to another live replica of the role and is re-sent from position
        0 there, up to `retries` times; with no live replica left it fails UNAVAILABLE at once
        (never waiting for the replica to come back). A draining replica still serves the
        sessions whose cache it holds."""
        rs = self.replicas[role]
        out: list[Outcome] = [Outcome() for _ in calls]
        groups: dict[str, tuple[Replica, list[int]]] = {}
        gone: dict[str, tuple[Replica, list[int]]] = {}
        for i, c in enumerate(calls):
            r = rs.route(c.session_id)
            state = self._state.get((role, r.address), DOWN)
            if state == LIVE or (state == DRAINING and c.start > 0 and not zero):
                groups.setdefault(r.address, (r, []))[1].append(i)
            else:
                gone.setdefault(r.address, (r, []))[1].append(i)

        def move(replica: Replica, idx: list[int], why: str, rejoin: bool = False) -> None:
            """Re-send `idx` on another live replica of the role (with `rejoin`, on this one if
            it comes back within `rejoin_wait_s`), or fail them UNAVAILABLE."""
            part = [calls[i] for i in idx]
            for c in part:
                if rs.repin(c.session_id, replica) is not replica:
                    self._orphan(role, replica, c.session_id)
            if attempt < self.policy.retries and (self._live_replicas(role, exclude=replica.address)
                                                  or rejoin and self._rejoin(role, replica)):
                log.warning("%s at %s %s; re-sending %d sessions from position 0 on another replica (retry %d)",
                            role, replica.address, why, len(part), attempt + 1)
                got = self._batched(role, method, part, build, True, attempt + 1)
            else:
                err = self._no_replica_error(role, replica, why, attempt)
                got = [Outcome(error=err) for _ in part]
            for i, o in zip(idx, got):
                out[i] = o

        def one(replica: Replica, idx: list[int]) -> None:
            part = [calls[i] for i in idx]
            started = time.perf_counter()
            attrs = {"eftmesh.role": role, "rpc.method": method}
            tokens = sum(len(c.tokens) - (0 if zero else c.start) for c in part)
            other = bool(self._live_replicas(role, exclude=replica.address))
            timeout, derived = self.deadlines.deadline(role, tokens, failover=other)
            try:
                # A blocking call, not .future(): a future's answer comes through the channel's
                # own thread, ~0.2-0.3 ms more per call here. The derived timeout bounds the wait
                # on a hung replica instead of a cancellation from the health monitor.
                resp = getattr(replica.stub, method)(build(part, zero), timeout=timeout)
            except grpc.RpcError as e:
                code = e.code()
                # every attempt is timed, failed ones too (a re-sent call is another attempt)
                self.metrics.upstream_duration.record(time.perf_counter() - started, {
                    **attrs, "rpc.grpc.status_code": code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"})
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.metrics.upstream_failovers.add(len(part), {**_cause("error"), "eftmesh.role": role,
                                                                    "rpc.grpc.status_code": code.name})
                    self._lost(role, replica, _brief(e))
                    move(replica, idx, f"is unavailable ({e.details()})", rejoin=True)
                    return
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and derived:
                    # Hung, not gone: give up on it for now and let the other replica serve.
                    self.metrics.upstream_failovers.add(len(part), {**_cause("timeout"), "eftmesh.role": role,
                                                                    "rpc.grpc.status_code": code.name})
                    why = f"did not answer within {timeout:.2f} s ({self.policy.deadline_margin:g}x its role's calls)"
                    self._suspect(role, replica, why)
                    move(replica, idx, why)
                    return
                got = [Outcome(error=_call_error(role, replica, e, attempt, timeout)) for _ in part]
            else:
                elapsed = time.perf_counter() - started
                self.deadlines.record(role, elapsed, tokens)
                self.metrics.upstream_duration.record(elapsed, {**attrs, "rpc.grpc.status_code": "OK"})
                self.metrics.upstream_bytes.add(len(resp.logits.data), {"eftmesh.role": role})
                got = _outcomes(role, resp)
                refused = [i for i, o in zip(idx, got) if isinstance(o.error, ReplicaDraining)]
                if refused:
                    self.metrics.upstream_failovers.add(len(refused), {**_cause("drain"), "eftmesh.role": role,
                                                                       "rpc.grpc.status_code": "UNAVAILABLE"})
                    if self._state.get((role, replica.address)) == LIVE:
                        self._set_state(role, replica, DRAINING, "refuses new sessions")
                        if not self._live_replicas(role):
                            self._report(False)
                    got = [o for i, o in zip(idx, got) if i not in refused]
                    idx = [i for i in idx if i not in refused]
                    move(replica, refused, "is draining")
            for i, o in zip(idx, got):
                out[i] = o

        for replica, idx in gone.values():
            why = self._why.get((role, replica.address)) or self._state.get((role, replica.address), DOWN)
            if any(calls[i].start > 0 and not zero for i in idx):  # sessions it held move: a failover
                self.metrics.upstream_failovers.add(len(idx), {**_cause("health"), "eftmesh.role": role})
            move(replica, idx, f"is not live ({why})")
        jobs = list(groups.values())
        pending = [self._pool.submit(contextvars.copy_context().run, one, r, idx) for r, idx in jobs[1:]]
        if jobs:
            one(*jobs[0])
        for f in pending:
            f.result()
        return out

    def _rejoin(self, role: str, replica: Replica) -> bool:
        """Wait up to `rejoin_wait_s` for a replica that just failed a call to answer Info
        again (a quick restart); True, and the replica live again, if it did and still serves
        the role's model."""
        try:
            info = replica.stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=self.policy.rejoin_wait_s,
                                     wait_for_ready=True)
        except (grpc.RpcError, ValueError):  # ValueError: its channel was closed meanwhile
            return False
        if not self._matches(role, ModelSpec.from_info(role, self.addresses[role], info), replica.address):
            return False
        self._set_state(role, replica, LIVE)
        self._report(not self.missing_roles())
        return True

    def _no_replica_error(self, role: str, replica: Replica, why: str, attempt: int) -> Unavailable:
        missing = self.missing_roles()
        if role in missing:
            return Unavailable(f"upstream {role} has no live replica ({self.addresses[role]}: {replica.address} {why})")
        return Unavailable(f"upstream {role}: {replica.address} {why}, and {attempt} re-sends found no other replica")

    def release(self, sessions: Mapping[str, str]) -> None:
        for role, sid in sessions.items():
            replica = self.replicas[role].unpin(sid)
            if replica is None:
                continue
            try:
                fut = replica.stub.Release.future(logit_pb2.ReleaseRequest(session_id=sid), timeout=5.0)
            except ValueError:  # its channel was closed meanwhile: nothing to release
                continue
            # Best effort: a replica that is gone has nothing to release.
            fut.add_done_callback(lambda f: f.exception())

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.policy.health_timeout_s + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for rs in self.replicas.values():
            rs.close()


_ITEM_ERRORS: dict[int, type[EftMeshError]] = {
    grpc.StatusCode.NOT_FOUND.value[0]: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: ResourceExhausted,
}


class ReplicaDraining(Unavailable):
    """A draining logit service refused a new session (the combiner moves it elsewhere)."""


class UpstreamItemError(EftMeshError):
    """An upstream refused one item of a batched call; keeps its status code, names the role."""

    def __init__(self, role: str, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"upstream {role}: {message}")


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _outcomes(role: str, resp: Any) -> list[Outcome]:
    """Per-item outcomes of a ScoreBatch / DraftBatch response; rows sliced from its one tensor,
    floored (`core.mixing.floor_rows_`) as everything the combiner mixes."""
    block = tensors.from_pb(resp.logits) if resp.logits.shape else None  # [sum rows, vocab]
    if block is not None and not resp.floored:  # an older logit service: floor here (a copy: the wire's bytes are read-only)
        block = floor_rows_(block.clone())
    out, at = [], 0
    for r in resp.results:
        if r.code == grpc.StatusCode.UNAVAILABLE.value[0] and r.message.startswith(DRAINING_PREFIX):
            out.append(Outcome(error=ReplicaDraining(f"upstream {role}: {r.message}")))
        elif r.code:
            kind = _ITEM_ERRORS.get(r.code)
            err = kind(f"upstream {role}: {r.message}") if kind else UpstreamItemError(role, _CODES[r.code], r.message)
            out.append(Outcome(error=err))
        else:
            out.append(Outcome(rows=block[at:at + r.rows], drafts=list(r.drafts)))
            at += r.rows
    return out


def _brief(err: grpc.RpcError) -> str:
    """A call error in a few words, for logs of who the combiner waits for."""
    return f"{err.code().name}: {err.details()}"


def _cause(cause: str) -> dict[str, str]:
    """The failover counter's cause attribute: error (a failed call), timeout (a derived
    deadline missed), health (the replica was marked down), drain (it refuses new sessions)."""
    return {"eftmesh.cause": cause}


def _call_error(role: str, replica: Replica, err: grpc.RpcError, attempt: int, timeout: float) -> EftMeshError:
    code = err.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # our own timeout: the upstream's silence, not the client's deadline
        return Unavailable(f"upstream {role} at {replica.address} did not answer within {timeout:.1f} s "
                           "(--call-timeout)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"upstream {role} at {replica.address} is unavailable: {err.details()}")
    return UpstreamError(role, err)


def check_compatible(models: Mapping[str, ModelSpec], fingerprint: str, vocab_size: int,
                     eos_token_id: int | None = None, tokenizer: str = "the combiner's --tokenizer") -> None:
    """Refuse to mix models whose tokenizers differ or whose vocabularies cannot be aligned.

    Output layers may be wider than the tokenizer (padding rows, dropped before mixing);
    narrower ones, or a different token-to-id map, are a real mismatch. A refusal names each
    role that differs, its model, both fingerprints, and what its Info shows to differ
    (tokenizer size, EOS id); when neither does, the token-to-id map, the added or special
    tokens or the BOS id differ (or the service runs an eftmesh version that fingerprints
    tokenizers otherwise).
    """
    differ = {r: m for r, m in models.items() if m.tokenizer_fingerprint != fingerprint}
    if differ:
        lines = []
        for r, m in differ.items():
            what = []
            if m.tokenizer_vocab_size != vocab_size:
                what.append(f"{m.tokenizer_vocab_size} tokens vs {vocab_size}")
            if eos_token_id is not None and m.eos_token_id != eos_token_id:
                what.append(f"EOS id {m.eos_token_id} vs {eos_token_id}")
            if not what:
                what.append("same size and EOS id, so the token-to-id map, the added or special tokens or the "
                            "BOS id differ (or it runs an eftmesh version that fingerprints tokenizers otherwise)")
            lines.append(f"{r} ({m.model_id}): tokenizer {m.tokenizer_fingerprint}, " + ", ".join(what))
        raise FailedPrecondition(
            f"every model must share the tokenizer of {tokenizer} (fingerprint {fingerprint}); "
            "these differ: " + "; ".join(lines)
        )
    narrow = {r: m for r, m in models.items() if m.vocab_size < vocab_size}
    if narrow:
        lines = [f"{r} ({m.model_id}): {m.vocab_size} rows" for r, m in narrow.items()]
        raise FailedPrecondition(
            f"output layers must cover the tokenizer's {vocab_size} tokens; these are narrower: " + "; ".join(lines)
        )
