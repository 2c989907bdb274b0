"""The logit services over gRPC: connection, compatibility check, and the per-step fan-out.

Each step issues every role's call concurrently (blocking calls on a thread pool), each to the
replica that holds the session's cache (replicas.py). A role whose cache is gone (NOT_FOUND:
evicted, expired, or a replica that restarted) is re-sent its whole prefix; an unreachable
replica (UNAVAILABLE) loses the session to another replica of the role, or is retried with
back-off within the caller's deadline when it is the only one. Losing a logit replica
mid-generation therefore costs a re-prefill, not the request.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner.replicas import Replica, ReplicaSet, Resolver, resolve_dns
from eftmesh.combiner.scoring import DraftCall, DraftResult, ModelSpec, ScoreCall
from eftmesh.common import tensors, tracing
from eftmesh.common.convert import sampling_to_pb
from eftmesh.common.errors import (
    DeadlineExceeded,
    EftMeshError,
    FailedPrecondition,
    Unavailable,
)
from eftmesh.common.metrics import CombinerMetrics, meter
from eftmesh.common.serving import CHANNEL_OPTIONS
from eftmesh.v1 import logit_pb2, logit_pb2_grpc

log = logging.getLogger(__name__)

R = TypeVar("R")

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


def _remaining(deadline: float | None, cap: float) -> float:
    """Timeout for the next upstream call: what is left of the deadline, at most `cap`."""
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed while waiting for the logit services")
    return min(left, cap)


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

    def _score_request(self, c: ScoreCall, start: int) -> logit_pb2.ScoreRequest:
        return logit_pb2.ScoreRequest(
            session_id=c.session_id, start=start, tokens=c.tokens[start:], rows=c.rows
        )

    def _draft_request(self, c: DraftCall, start: int) -> logit_pb2.DraftRequest:
        return logit_pb2.DraftRequest(
            session_id=c.session_id, start=start, tokens=c.tokens[start:], k=c.k,
            sampling=sampling_to_pb(c.sampling), seed=c.seed, vocab_limit=c.vocab_limit,
        )

    def _score_one(self, c: ScoreCall, deadline: float | None) -> torch.Tensor:
        replica = self.replicas[c.role].route(c.session_id)
        started = time.perf_counter()
        try:
            resp = replica.stub.Score(self._score_request(c, c.start), timeout=_remaining(deadline, self.policy.call_timeout_s))
        except grpc.RpcError as e:
            resp = self._recover(
                c.role, c.session_id, len(c.tokens), replica, e, deadline,
                lambda stub, t: stub.Score(self._score_request(c, 0), timeout=t, wait_for_ready=True),
            )
        self.metrics.upstream_duration.record(time.perf_counter() - started, {"eftmesh.role": c.role, "rpc.method": "Score"})
        return tensors.from_pb(resp.logprobs)

    def score(self, calls: Sequence[ScoreCall], deadline: float | None) -> list[torch.Tensor]:
        # Blocking calls on pool threads, the first one on this thread: grpcio's blocking path
        # polls its completion queue directly, and measured here it fans out in about half
        # the time of `.future()` (whose results arrive through an extra thread hand-off).
        # Each call runs in a copy of this context, so trace context reaches every call.
        pending = [
            self._pool.submit(contextvars.copy_context().run, self._score_one, c, deadline) for c in calls[1:]
        ]
        out = [self._score_one(calls[0], deadline)] if calls else []
        return out + [f.result() for f in pending]

    def draft(self, call: DraftCall, deadline: float | None) -> DraftResult:
        replica = self.replicas[call.role].route(call.session_id)
        started = time.perf_counter()
        try:
            resp = replica.stub.Draft(
                self._draft_request(call, call.start), timeout=_remaining(deadline, self.policy.call_timeout_s)
            )
        except grpc.RpcError as e:
            resp = self._recover(
                call.role, call.session_id, len(call.tokens), replica, e, deadline,
                lambda stub, t: stub.Draft(self._draft_request(call, 0), timeout=t, wait_for_ready=True),
            )
        self.metrics.upstream_duration.record(time.perf_counter() - started, {"eftmesh.role": call.role, "rpc.method": "Draft"})
        return DraftResult(list(resp.tokens), tensors.from_pb(resp.logprobs))

    def _recover(
        self,
        role: str,
        session_id: str,
        n_tokens: int,
        replica: Replica,
        err: grpc.RpcError,
        deadline: float | None,
        resend: Callable[[Any, float], R],
    ) -> R:
        """Retry one role's call after a lost cache or replica, re-sending the whole prefix.

        A lost cache (NOT_FOUND) is rebuilt on the same replica. A replica that does not
        answer (UNAVAILABLE, or CANCELLED by its shutdown) loses the session to another
        replica of the role when there is one; with one replica, `resend(stub, timeout)`
        waits for it to come back. Both are bounded by the caller's deadline and the call
        timeout.
        """
        rs = self.replicas[role]
        for attempt in range(self.policy.retries + 1):
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"upstream {role} did not answer before the deadline")
            # CANCELLED here is the server's doing (a replica shutting down mid-call): our own
            # calls are never cancelled by the client's cancellation.
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                if attempt == self.policy.retries:
                    break
                log.warning("%s at %s unavailable (%s); retry %d with the whole prefix",
                            role, replica.address, err.details(), attempt + 1)
                replica = rs.repin(session_id, replica)
            elif code == grpc.StatusCode.NOT_FOUND:
                log.info("re-prefilling %s for %s (%d tokens) on %s", role, session_id, n_tokens, replica.address)
            else:
                raise UpstreamError(role, err)
            self.metrics.upstream_failovers.add(1, {"eftmesh.role": role, "rpc.grpc.status_code": code.name})
            try:
                return resend(replica.stub, _remaining(deadline, self.policy.call_timeout_s))
            except grpc.RpcError as e:
                err = e
        raise Unavailable(
            f"upstream {role} at {self.addresses[role]} is unavailable after "
            f"{self.policy.retries} retries: {err.details()}"
        )

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
