"""The logit services' replicas, watched: connection, verification, health and replica state.

`ReplicaMonitor` is the one writer of what the combiner concludes about every replica of every
role: its `ReplicaState` (replicas.py: unverified until its Info matches the role's tokenizer,
vocabulary, chat template and --max-k; then live, draining or down), why, since when, and
until when it gets no new session. The call path (upstream.py, `GrpcScorer`) reads that state
and reports what its calls found (`_lost`, `_suspect`); the target's resolution (ReplicaSet)
says only which replicas exist and which are ready.

Lifecycle. `start()` tries every upstream once and returns; a monitor thread then keeps at it,
with no deadline unless `connect_timeout_s` is set, logging which roles it still waits for.
Every `health_interval_s` it asks each verified replica for its gRPC health (grpc.health.v1)
and calls `on_health(True)` once every role has a live replica, `on_health(False)` as soon as
one role has none. A call for a role with no live replica fails UNAVAILABLE at once instead of
waiting for the replica to come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.combiner.replicas import Replica, ReplicaSet, ReplicaState, Resolver, resolve_dns
from eftmesh.combiner.scoring import BlockCap, ModelSpec, replica_mismatch
from eftmesh.common import rowswire, tracing
from eftmesh.common.errors import EftMeshError, Unavailable
from eftmesh.common.metrics import CombinerMetrics, meter
from eftmesh.common.tls import channel as tls_channel, target_host
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

log = logging.getLogger(__name__)

LIVE, DRAINING, DOWN, UNVERIFIED = (ReplicaState.LIVE, ReplicaState.DRAINING, ReplicaState.DOWN,
                                    ReplicaState.UNVERIFIED)


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


class ReplicaMonitor:
    """Every role's `ReplicaSet`, and the one writer of each replica's state (`Replica.state`,
    `why`, `live_at`, `misses`, `suspect_until`, `down_until`), kept by the health rounds and
    by what calls report."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        policy: UpstreamPolicy = UpstreamPolicy(),
        tracer_provider: TracerProvider | None = None,
        resolver: Resolver = resolve_dns,
        metrics: CombinerMetrics | None = None,
    ) -> None:
        self.policy = policy
        self.metrics = metrics or CombinerMetrics(meter(None, "eftmesh.combiner"))
        self.addresses = dict(addresses)
        # Health checks go over the untraced channel under each replica's (the same connection).
        self._health_stubs: dict[str, health_pb2_grpc.HealthStub] = {}
        options = policy.channel_options()

        def make_stub(address: str, server_name: str | None = None) -> tuple[grpc.Channel, logit_pb2_grpc.LogitServiceStub]:
            raw = tls_channel(address, policy.tls, options, server_name)
            self._health_stubs[address] = health_pb2_grpc.HealthStub(raw)
            channel = tracing.traced_channel(raw, tracer_provider)
            return channel, rows_stub(channel)

        self._stop = threading.Event()
        self._wake = threading.Event()  # a membership change: check at once, not at the next tick
        self.replicas = {
            role: ReplicaSet(role, target, lambda a, name=target_host(target): make_stub(a, name), resolver=resolver,
                             on_change=lambda rs: self._wake.set(), prefix_slack=policy.prefix_slack)
            for role, target in self.addresses.items()
        }
        self.models: dict[str, ModelSpec] = _Models(self.addresses)
        self._lock = threading.Lock()  # held while a replica's state is written
        self._monitor: threading.Thread | None = None
        self._check: Callable[[Mapping[str, ModelSpec]], None] = lambda models: None
        self._checked: set[str] = set()
        self.on_health: Callable[[bool], None] = lambda serving: None
        self.on_fatal: Callable[[EftMeshError], None] = lambda err: None
        # The combiner's block cap (scoring.BlockCap, shared with the decoder and the servicer),
        # which a new replica's --max-k must reach; None: the role's first replica's max_k.
        self.k_cap: BlockCap | None = None
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
                if r.state is LIVE and not r.draining and r.address != exclude]

    def _set_state(self, role: str, replica: Replica, state: ReplicaState, why: str = "",
                   observed_at: float | None = None) -> None:
        """Record a replica's state; keep new sessions off it while it is not live.

        `observed_at` is when the probe that saw `state` was sent: a probe sent before the
        replica was last seen live (a call's rejoin found it back meanwhile) is stale, and a
        stale "down" must not take a replica that came back out again."""
        now = time.monotonic()
        with self._lock:
            if state is not LIVE and observed_at is not None and observed_at < replica.live_at:
                return
            if replica.state is UNVERIFIED and state is DOWN:
                state = UNVERIFIED  # never verified: not answering keeps it so (the reason is kept)
            before, replica.state, replica.why = replica.state, state, why
            if state in (LIVE, DRAINING):  # it answered
                replica.misses = 0
            if state is LIVE:
                replica.live_at = now
                replica.down_until = replica.suspect_until
            else:
                replica.down_until = max(replica.down_until, now + max(self.policy.replica_cooldown_s,
                                                                       3 * self.policy.health_interval_s))
        if before is not state and before is not UNVERIFIED:
            log.log(logging.INFO if state is LIVE else logging.WARNING, "%s replica %s is %s%s",
                    role, replica.address, state.value, f" ({why})" if why else "")
        if state is DOWN and before is not DOWN:
            self._on_down(role, replica)

    def _on_down(self, role: str, replica: Replica) -> None:
        """Called when a replica is marked down: the call path cancels its calls in flight."""

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
            whys = sorted({r.why for r in self.replicas[role].replicas()} - {""})
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
                if not r.verified or stub is None:
                    info.append((role, r, self._info_future(r, 2.0 if first else self.policy.health_timeout_s)))
                else:
                    checks.append((role, r, stub.Check.future(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=self.policy.health_timeout_s)))
                    if r.state is DOWN:  # coming back: may be a new process, so verify it again
                        info.append((role, r, self._info_future(r, self.policy.health_timeout_s)))
        fresh: dict[str, ModelSpec] = {}
        verified: dict[tuple[str, str], bool] = {}
        for role, r, fut in info:
            try:
                got = fut.result()
            except grpc.RpcError as e:
                self._set_state(role, r, DOWN, brief(e), observed_at=sent)
                verified[(role, r.address)] = False
                continue
            spec = ModelSpec.from_info(role, self.addresses[role], got)
            r.batch_release = bool(getattr(got, "batch_release", False))
            r.release_many = bool(getattr(got, "release_many", False))
            if not dict.__contains__(self.models, role):
                self.models.setdefault(role, spec)
                fresh[role] = spec
            ok = self._matches(role, spec, r.address)
            verified[(role, r.address)] = ok
            if ok and not r.verified:
                self._set_state(role, r, LIVE)
            elif not ok:
                self._set_state(role, r, UNVERIFIED, "serves another model or a smaller --max-k")
        for role, r, fut in checks:
            if verified.get((role, r.address)) is False:
                fut.cancel()
                continue
            try:
                status = fut.result().status
            except grpc.RpcError as e:
                self._on_probe_error(role, r, e, sent)
                continue
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
        self._after_round()

    def _after_round(self) -> None:
        """Called after each health round: the call path releases there what it left behind."""

    def _info_future(self, r: Replica, timeout: float) -> Any:
        return r.stub.Info.future(logit_pb2.LogitServiceInfoRequest(), timeout=timeout)

    def _on_probe_error(self, role: str, r: Replica, e: grpc.RpcError, sent: float) -> None:
        code = e.code()
        if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            # It answered: health is served elsewhere (another port), or it is saturated.
            self._set_state(role, r, LIVE)
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Slow is not gone (a saturated server queues the check): down after three timeouts
            # in a row. A dead process or a closed port is UNAVAILABLE at once.
            with self._lock:
                r.misses += 1
                if r.misses < 3:
                    return
        self._set_state(role, r, DOWN, brief(e), observed_at=sent)

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
        with self._lock:
            replica.suspect_until = time.monotonic() + max(self.policy.replica_cooldown_s,
                                                           3 * self.policy.health_interval_s)
        self._lost(role, replica, why)

    def _lost(self, role: str, replica: Replica, why: str) -> None:
        """A call found `replica` gone: mark it down now (the next health check may bring it
        back) and report a role left with no live replica at once."""
        self._set_state(role, replica, DOWN, why)
        if not self._live_replicas(role):
            self._report(False)

    def _matches(self, role: str, spec: ModelSpec, address: str) -> bool:
        """Whether a replica may serve `role` (scoring.replica_mismatch); logs why not."""
        want = self.models[role]
        # The role's first replica is exempt from the --max-k check: its --max-k is what cap_k
        # lowers the cap to, right after this check.
        cap = None if spec is want else (self.k_cap.value if self.k_cap is not None else want.max_k)
        why = replica_mismatch(want, spec, cap)
        if why is not None:
            log.error("%s replica %s %s: not used", role, address, why)
        return why is None

    def refresh(self) -> None:
        """One monitor round now: re-resolve every role's target, verify replicas not yet
        verified (Info), check the others' health."""
        self._tick()

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
        replica.batch_release = bool(getattr(info, "batch_release", False))  # (perhaps a new version)
        replica.release_many = bool(getattr(info, "release_many", False))
        self._set_state(role, replica, LIVE)
        self._report(not self.missing_roles())
        return True

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.policy.health_timeout_s + 1.0)
        for rs in self.replicas.values():
            rs.close()


def brief(err: grpc.RpcError) -> str:
    """A call error in a few words, for logs of who the combiner waits for."""
    return f"{err.code().name}: {err.details()}"


def rows_stub(channel: grpc.Channel) -> logit_pb2_grpc.LogitServiceStub:
    """A LogitService stub whose batched calls read their answers' rows where gRPC received
    them (`rowswire.deserializer`: a `RowsAnswer`, the rows not copied) instead of as messages."""
    stub = logit_pb2_grpc.LogitServiceStub(channel)
    for method, answer in (("ScoreBatch", logit_pb2.ScoreBatchResponse), ("DraftBatch", logit_pb2.DraftBatchResponse)):
        request = getattr(logit_pb2, f"{method}Request")
        setattr(stub, method, channel.unary_unary(f"/{rowswire.LOGIT_SERVICE}/{method}", request_serializer=request.SerializeToString,
                                                  response_deserializer=rowswire.deserializer(answer),
                                                  _registered_method=True))
    return stub
