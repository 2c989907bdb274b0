"""The logit services over gRPC: connection, compatibility check, and the per-step fan-out.

Each step issues every role's Score as a gRPC future, so the calls run concurrently on the
channels' own threads, then collects them. A role whose cache is gone (NOT_FOUND: evicted,
expired, or a replica that restarted) is re-sent its whole prefix; an unreachable role
(UNAVAILABLE) is retried with back-off within the caller's deadline, then re-prefilled.
Losing a logit replica mid-generation therefore costs a re-prefill, not the request.
"""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner.scoring import DraftCall, DraftResult, ModelSpec, ScoreCall
from eftmesh.common import tensors, tracing
from eftmesh.common.convert import sampling_to_pb
from eftmesh.common.errors import (
    DeadlineExceeded,
    EftMeshError,
    FailedPrecondition,
    Unavailable,
)
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
    """`Scorer` over logit services reached by gRPC, one channel per role."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        policy: UpstreamPolicy = UpstreamPolicy(),
        tracer_provider: TracerProvider | None = None,
        fanout_threads_per_role: int = 16,
    ) -> None:
        self.policy = policy
        self.addresses = dict(addresses)
        self._channels = {
            role: tracing.traced_channel(grpc.insecure_channel(addr, options=_UPSTREAM_OPTIONS), tracer_provider)
            for role, addr in self.addresses.items()
        }
        self._stubs = {role: logit_pb2_grpc.LogitServiceStub(ch) for role, ch in self._channels.items()}
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(self._stubs) * fanout_threads_per_role), thread_name_prefix="upstream")
        self.models: dict[str, ModelSpec] = {}

    def connect(self) -> dict[str, ModelSpec]:
        """Wait until every upstream answers Info (within the connect timeout); fill `models`."""
        deadline = time.monotonic() + self.policy.connect_timeout_s
        for role, stub in self._stubs.items():
            while True:
                try:
                    i = stub.Info(logit_pb2.LogitServiceInfoRequest(), timeout=5.0, wait_for_ready=True)
                    break
                except grpc.RpcError as e:
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"upstream {role} at {self.addresses[role]} did not answer within "
                            f"{self.policy.connect_timeout_s:.0f} s: {e.details()}"
                        ) from None
                    log.info("waiting for %s at %s (%s)", role, self.addresses[role], e.code().name)
                    time.sleep(1.0)
            self.models[role] = ModelSpec.from_info(role, self.addresses[role], i)
        return self.models

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
        stub = self._stubs[c.role]
        try:
            resp = stub.Score(self._score_request(c, c.start), timeout=_remaining(deadline, self.policy.call_timeout_s))
        except grpc.RpcError as e:
            resp = self._recover(
                c.role, c.session_id, len(c.tokens), e, deadline,
                lambda t: stub.Score(self._score_request(c, 0), timeout=t, wait_for_ready=True),
            )
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
        stub = self._stubs[call.role]
        try:
            resp = stub.Draft(
                self._draft_request(call, call.start), timeout=_remaining(deadline, self.policy.call_timeout_s)
            )
        except grpc.RpcError as e:
            resp = self._recover(
                call.role, call.session_id, len(call.tokens), e, deadline,
                lambda t: stub.Draft(self._draft_request(call, 0), timeout=t, wait_for_ready=True),
            )
        return DraftResult(list(resp.tokens), tensors.from_pb(resp.logprobs))

    def _recover(
        self,
        role: str,
        session_id: str,
        n_tokens: int,
        err: grpc.RpcError,
        deadline: float | None,
        resend: Callable[[float], R],
    ) -> R:
        """Retry one role's call after a lost cache or replica, re-sending the whole prefix.

        `resend(timeout)` repeats the call from start 0 and waits for the channel to be ready
        (a replica restarting, or the address resolving to another replica), bounded by the
        caller's deadline and the call timeout.
        """
        for attempt in range(self.policy.retries + 1):
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"upstream {role} did not answer before the deadline")
            # CANCELLED here is the server's doing (a replica shutting down mid-call): our own
            # calls are never cancelled by the client's cancellation.
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                if attempt == self.policy.retries:
                    break
                log.warning("%s unavailable (%s); retry %d with the whole prefix", role, err.details(), attempt + 1)
            elif code == grpc.StatusCode.NOT_FOUND:
                log.info("re-prefilling %s for %s (%d tokens)", role, session_id, n_tokens)
            else:
                raise UpstreamError(role, err)
            try:
                return resend(_remaining(deadline, self.policy.call_timeout_s))
            except grpc.RpcError as e:
                err = e
        raise Unavailable(
            f"upstream {role} at {self.addresses[role]} is unavailable after "
            f"{self.policy.retries} retries: {err.details()}"
        )

    def release(self, sessions: Mapping[str, str]) -> None:
        for role, sid in sessions.items():
            fut = self._stubs[role].Release.future(logit_pb2.ReleaseRequest(session_id=sid), timeout=5.0)
            # Best effort: a replica that is gone has nothing to release.
            fut.add_done_callback(lambda f: f.exception())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for ch in self._channels.values():
            ch.close()


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
