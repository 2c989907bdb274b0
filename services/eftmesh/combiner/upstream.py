"""The logit services over gRPC: connection, compatibility check, and the batched calls.

Each scheduler step sends a role one ScoreBatch (or DraftBatch) per replica that holds some of
the step's sessions (replicas.py pins each session to the replica with its cache). An item
whose cache is gone (NOT_FOUND: evicted, expired, or a replica that restarted) is re-sent its
whole prefix; an unreachable replica (UNAVAILABLE) loses its sessions to another replica of
the role, or is waited for when it is the only one. Losing a logit replica mid-generation
therefore costs a re-prefill, not the request.
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
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner.replicas import Replica, ReplicaSet, Resolver, resolve_dns
from eftmesh.combiner.scoring import C, DraftCall, ModelSpec, Outcome, ScoreCall, with_resend
from eftmesh.common import tensors, tracing
from eftmesh.common.convert import sampling_to_pb
from eftmesh.common.errors import (
    DeadlineExceeded,
    EftMeshError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from eftmesh.common.metrics import CombinerMetrics, meter
from eftmesh.common.serving import CHANNEL_OPTIONS
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

log = logging.getLogger(__name__)

# Reconnect quickly after a replica goes away: gRPC's default first back-off is 1 s.
_UPSTREAM_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class UpstreamPolicy:
    """Timeouts and retries for calls to logit services."""

    # Per-call timeout when the client set no deadline.
    call_timeout_s: float = 30.0
    # Retries of one role's call after UNAVAILABLE; each waits for the channel to be ready.
    retries: int = 3
    # How long start-up waits for every upstream to answer Info.
    connect_timeout_s: float = 120.0
    # How often replica targets are resolved again (dns:///...) and new replicas verified.
    resolve_interval_s: float = 5.0
    # How long a replica that failed a call gets no new sessions.
    replica_cooldown_s: float = 5.0


class UpstreamError(EftMeshError):
    """An upstream logit service refused a call; keeps its status code, names the role."""

    def __init__(self, role: str, err: grpc.RpcError) -> None:
        self.code = err.code()
        super().__init__(f"upstream {role}: {err.details()}")


class GrpcScorer:
    """`Scorer` over logit services reached by gRPC: a `ReplicaSet` per role, each session
    pinned to the replica that holds its KV cache."""

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

        def make_stub(address: str) -> tuple[grpc.Channel, logit_pb2_grpc.LogitServiceStub]:
            channel = tracing.traced_channel(grpc.insecure_channel(address, options=_UPSTREAM_OPTIONS), tracer_provider)
            return channel, logit_pb2_grpc.LogitServiceStub(channel)

        self.replicas = {
            role: ReplicaSet(role, target, make_stub, resolver=resolver, cooldown_s=policy.replica_cooldown_s)
            for role, target in self.addresses.items()
        }
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(self.replicas) * fanout_threads_per_role), thread_name_prefix="upstream")
        self.models: dict[str, ModelSpec] = {}
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def connect(self) -> dict[str, ModelSpec]:
        """Wait until a replica of every role answers Info (within the connect timeout); fill
        `models`, verify every other replica that answers against it, and start re-resolving
        the targets in the background."""
        deadline = time.monotonic() + self.policy.connect_timeout_s
        for role, rs in self.replicas.items():
            while True:
                errors = [e for r in rs.replicas() if (e := self._verify(role, r, 2.0, wait_for_ready=True))]
                if role in self.models:
                    break
                if time.monotonic() > deadline:
                    detail = errors[-1].details() if errors else "the name resolves to no address"
                    raise Unavailable(
                        f"upstream {role} at {self.addresses[role]} did not answer within "
                        f"{self.policy.connect_timeout_s:.0f} s: {detail}"
                    ) from None
                log.info("waiting for %s at %s", role, self.addresses[role])
                time.sleep(1.0)
                rs.refresh()
        self._refresher = threading.Thread(target=self._refresh_loop, name="upstream-refresh", daemon=True)
        self._refresher.start()
        return self.models

    def _verify(self, role: str, replica: Replica, timeout: float, wait_for_ready: bool = False) -> grpc.RpcError | None:
        """Ask a replica for Info; the first answer of a role defines its model, and a replica
        is used only once it serves the same tokenizer and vocabulary. Returns the call's error."""
        try:
            info = replica.stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            return e
        spec = ModelSpec.from_info(role, self.addresses[role], info)
        self.models.setdefault(role, spec)
        if self._matches(role, spec, replica.address):
            self.replicas[role].mark_verified(replica.address)
        return None

    def _matches(self, role: str, spec: ModelSpec, address: str) -> bool:
        want = self.models[role]
        same = (spec.tokenizer_fingerprint, spec.vocab_size) == (want.tokenizer_fingerprint, want.vocab_size)
        if not same:
            log.error("%s replica %s serves %s (tokenizer %s, %d rows), unlike the role's %s (%s, %d): not used",
                      role, address, spec.model_id, spec.tokenizer_fingerprint, spec.vocab_size,
                      want.model_id, want.tokenizer_fingerprint, want.vocab_size)
        return same

    def refresh(self) -> None:
        """Re-resolve every role's target and verify replicas not yet verified (Info); one
        that does not answer is tried again next time."""
        for role, rs in self.replicas.items():
            rs.refresh()
            for r in rs.unverified():
                self._verify(role, r, 1.0)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.policy.resolve_interval_s):
            try:
                self.refresh()
            except Exception:  # a resolver bug must not kill the loop that heals the mesh
                log.exception("refreshing upstream replicas failed")

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
        there are several). A replica that does not answer (UNAVAILABLE, or CANCELLED by its
        shutdown) loses its sessions to another replica of the role, re-sent from position 0
        (with one replica, the re-send waits for it to come back), up to `retries` times."""
        rs = self.replicas[role]
        groups: dict[str, tuple[Replica, list[int]]] = {}
        for i, c in enumerate(calls):
            r = rs.route(c.session_id)
            groups.setdefault(r.address, (r, []))[1].append(i)
        out: list[Outcome] = [Outcome() for _ in calls]

        def one(replica: Replica, idx: list[int]) -> None:
            part = [calls[i] for i in idx]
            started = time.perf_counter()
            try:
                resp = getattr(replica.stub, method)(
                    build(part, zero), timeout=self.policy.call_timeout_s, wait_for_ready=attempt > 0
                )
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and attempt < self.policy.retries:
                    log.warning("%s at %s unavailable (%s); re-sending %d sessions from position 0 (retry %d)",
                                role, replica.address, e.details(), len(part), attempt + 1)
                    self.metrics.upstream_failovers.add(len(part), {"eftmesh.role": role, "rpc.grpc.status_code": code.name})
                    for c in part:
                        rs.repin(c.session_id, replica)
                    got = self._batched(role, method, part, build, True, attempt + 1)
                else:
                    got = [Outcome(error=_call_error(role, replica, e, attempt)) for _ in part]
            else:
                self.metrics.upstream_duration.record(time.perf_counter() - started, {"eftmesh.role": role, "rpc.method": method})
                self.metrics.upstream_bytes.add(len(resp.logits.data), {"eftmesh.role": role})
                got = _outcomes(role, resp)
            for i, o in zip(idx, got):
                out[i] = o

        jobs = list(groups.values())
        pending = [self._pool.submit(contextvars.copy_context().run, one, r, idx) for r, idx in jobs[1:]]
        if jobs:
            one(*jobs[0])
        for f in pending:
            f.result()
        return out

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
        self._pool.shutdown(wait=False, cancel_futures=True)
        for rs in self.replicas.values():
            rs.close()


_ITEM_ERRORS: dict[int, type[EftMeshError]] = {
    grpc.StatusCode.NOT_FOUND.value[0]: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: ResourceExhausted,
}


class UpstreamItemError(EftMeshError):
    """An upstream refused one item of a batched call; keeps its status code, names the role."""

    def __init__(self, role: str, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"upstream {role}: {message}")


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _outcomes(role: str, resp: Any) -> list[Outcome]:
    """Per-item outcomes of a ScoreBatch / DraftBatch response; rows sliced from its one tensor."""
    block = tensors.from_pb(resp.logits) if resp.logits.shape else None  # [sum rows, vocab]
    out, at = [], 0
    for r in resp.results:
        if r.code:
            kind = _ITEM_ERRORS.get(r.code)
            err = kind(f"upstream {role}: {r.message}") if kind else UpstreamItemError(role, _CODES[r.code], r.message)
            out.append(Outcome(error=err))
        else:
            out.append(Outcome(rows=block[at:at + r.rows], drafts=list(r.drafts)))
            at += r.rows
    return out


def _call_error(role: str, replica: Replica, err: grpc.RpcError, attempt: int) -> EftMeshError:
    code = err.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"upstream {role} at {replica.address} did not answer in time")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"upstream {role} is unavailable after {attempt} retries: {err.details()}")
    return UpstreamError(role, err)


def check_compatible(models: Mapping[str, ModelSpec], fingerprint: str, vocab_size: int) -> None:
    """Refuse to mix models whose tokenizers differ or whose vocabularies cannot be aligned.

    Output layers may be wider than the tokenizer (padding rows, dropped before mixing);
    narrower ones, or a different token-to-id map, are a real mismatch.
    """
    differ = {r: m for r, m in models.items() if m.tokenizer_fingerprint != fingerprint}
    if differ:
        lines = [f"{r} ({m.model_id}): tokenizer {m.tokenizer_fingerprint}" for r, m in differ.items()]
        raise FailedPrecondition(
            f"every model must share the combiner's tokenizer {fingerprint}; these differ: " + "; ".join(lines)
        )
    narrow = {r: m for r, m in models.items() if m.vocab_size < vocab_size}
    if narrow:
        lines = [f"{r} ({m.model_id}): {m.vocab_size} rows" for r, m in narrow.items()]
        raise FailedPrecondition(
            f"output layers must cover the tokenizer's {vocab_size} tokens; these are narrower: " + "; ".join(lines)
        )
