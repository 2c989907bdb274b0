"""The logit services over gRPC: the batched calls of each step.

Each scheduler step sends a role one ScoreBatch (or DraftBatch) per replica that holds some of
the step's sessions (replicas.py pins each session to the replica with its cache). An item
whose cache is gone (NOT_FOUND: evicted, expired, or a replica that restarted) is re-sent its
whole prefix; an unreachable replica (UNAVAILABLE), one that misses its derived deadline
(deadlines.py), or one that refuses new sessions because it is draining (per-item UNAVAILABLE
"draining: ..."), loses its sessions to another live replica of the role. Losing or hanging a
logit replica mid-generation therefore costs a re-prefill, not the request. Replica state,
health and verification live in monitor.py (`ReplicaMonitor`, which `GrpcScorer` extends).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import grpc
import torch
from opentelemetry.sdk.trace import TracerProvider

from eftmesh.combiner.deadlines import CallDeadlines
from eftmesh.combiner.monitor import DOWN, DRAINING, LIVE, ReplicaMonitor, brief
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.combiner.releases import SessionReleases
from eftmesh.combiner.replicas import Replica, Resolver, prefix_key, resolve_dns
from eftmesh.combiner.scoring import C, DraftCall, Outcome, ScoreCall, with_resend
from eftmesh.common import rowswire, tensors
from eftmesh.common.convert import sampling_to_pb
from eftmesh.common.errors import DRAINING_PREFIX, EftMeshError, NotFound, ResourceExhausted, Unavailable
from eftmesh.common.metrics import CombinerMetrics
from eftmesh.core.mixing import floor_rows_
from eftmesh.v1 import logit_pb2

log = logging.getLogger(__name__)


class GrpcScorer(SessionReleases, ReplicaMonitor):
    """`Scorer` over logit services reached by gRPC: a `ReplicaSet` per role, each session
    pinned to the replica that holds its KV cache, every replica's health watched
    (`ReplicaMonitor`)."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        policy: UpstreamPolicy = UpstreamPolicy(),
        tracer_provider: TracerProvider | None = None,
        fanout_threads_per_role: int = 16,
        resolver: Resolver = resolve_dns,
        metrics: CombinerMetrics | None = None,
    ) -> None:
        super().__init__(addresses, policy, tracer_provider, resolver, metrics)
        self._init_releases()
        self._inflight: dict[tuple[str, str], set[Any]] = {}  # (role, address) -> cancellable calls
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(self.replicas) * fanout_threads_per_role), thread_name_prefix="upstream")
        self.deadlines = CallDeadlines(policy.deadlines)

    def score_batch(self, role: str, calls: Sequence[ScoreCall], partial: bool = False) -> list[Outcome]:
        def build(cs: Sequence[ScoreCall], zero: bool) -> logit_pb2.ScoreBatchRequest:
            request = logit_pb2.ScoreBatchRequest()
            add = request.items.add  # (in place: a ScoreItem made first is then copied in, ~0.6 us more each)
            for c in cs:
                s = 0 if zero else c.start
                add(session_id=c.session_id, start=s, tokens=c.tokens[s:], rows=c.rows)
            return request

        return with_resend(calls, lambda cs, zero: self._batched(role, "ScoreBatch", cs, build, zero, partial=partial))

    def draft_batch(self, role: str, calls: Sequence[DraftCall], partial: bool = False) -> list[Outcome]:
        def build(cs: Sequence[DraftCall], zero: bool) -> logit_pb2.DraftBatchRequest:
            return logit_pb2.DraftBatchRequest(items=[
                logit_pb2.DraftItem(session_id=c.session_id, start=s, tokens=c.tokens[s:], k=c.k,
                                    sampling=sampling_to_pb(c.sampling), seed=c.seed, vocab_limit=c.vocab_limit)
                for c in cs for s in [0 if zero else c.start]
            ])

        return with_resend(calls, lambda cs, zero: self._batched(role, "DraftBatch", cs, build, zero, partial=partial))

    def _batched(
        self,
        role: str,
        method: str,
        calls: Sequence[C],
        build: Callable[[Sequence[C], bool], Any],
        zero: bool,
        attempt: int = 0,
        partial: bool = False,
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
            # a new session goes where its prompt's beginning is likely cached (replicas.py)
            r = rs.route(c.session_id, prefix_key(c.tokens) if c.start == 0 else None)
            if r.state is LIVE or (r.state is DRAINING and c.start > 0 and not zero):
                groups.setdefault(r.address, (r, []))[1].append(i)
            else:
                gone.setdefault(r.address, (r, []))[1].append(i)

        def sent(idx: list[int]) -> int:
            """Tokens a call for `idx` sends."""
            return sum(len(calls[i].tokens) - (0 if zero else calls[i].start) for i in idx)

        def forwards(idx: list[int]) -> int:
            """Forwards a call for `idx` runs one after another: a draft's k + 1, a score's one."""
            return 1 + max((c.k for i in idx if isinstance(c := calls[i], DraftCall)), default=0)

        def move(replica: Replica, idx: list[int], why: str, rejoin: bool = False) -> dict[int, Outcome]:
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
            return dict(zip(idx, got))

        def one(replica: Replica, idx: list[int]) -> dict[int, Outcome]:
            part = [calls[i] for i in idx]
            request = build(part, zero)
            request.release.extend(released := self._take_releases(role, replica))
            started = time.perf_counter()
            attrs = {"eftmesh.role": role, "rpc.method": method}
            tokens, runs = sent(idx), forwards(idx)
            other = bool(self._live_replicas(role, exclude=replica.address))
            timeout, derived = self.deadlines.deadline(role, tokens, failover=other, forwards=runs)
            try:
                if other:
                    # Cancellable: the monitor cancels it at once if it marks the replica down
                    # (its health stopped answering) before the deadline (which may be the full
                    # --call-timeout before the role's first answers are timed).
                    resp = self._cancellable(role, replica, getattr(replica.stub, method).future(request, timeout=timeout))
                else:
                    # Nowhere to move its sessions: a blocking call, not .future(), whose answer
                    # comes through the channel's own thread, ~0.2-0.3 ms more per call here.
                    resp = getattr(replica.stub, method)(request, timeout=timeout)
            except grpc.FutureCancelledError:  # the monitor marked the replica down meanwhile
                self._orphan_all(role, replica, released)
                self.metrics.upstream_failovers.add(len(part), {**_cause("health"), "eftmesh.role": role,
                                                                "rpc.grpc.status_code": "CANCELLED"})
                return move(replica, idx, f"was marked down ({replica.why or 'health'}) during the call")
            except grpc.RpcError as e:
                self._orphan_all(role, replica, released)  # (released once it answers again)
                code = e.code()
                # every attempt is timed, failed ones too (a re-sent call is another attempt)
                self.metrics.upstream_duration.record(time.perf_counter() - started, {
                    **attrs, "rpc.grpc.status_code": code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"})
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.metrics.upstream_failovers.add(len(part), {**_cause("error"), "eftmesh.role": role,
                                                                    "rpc.grpc.status_code": code.name})
                    self._lost(role, replica, brief(e))
                    return move(replica, idx, f"is unavailable ({e.details()})", rejoin=True)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and derived:
                    # Hung, not gone: give up on it for now and let the other replica serve.
                    self.metrics.upstream_failovers.add(len(part), {**_cause("timeout"), "eftmesh.role": role,
                                                                    "rpc.grpc.status_code": code.name})
                    why = f"did not answer within {timeout:.2f} s ({self.policy.deadlines.margin:g}x its role's calls)"
                    self._suspect(role, replica, why)
                    return move(replica, idx, why)
                got = [Outcome(error=_call_error(role, replica, e, attempt, timeout)) for _ in part]
            else:
                resp = rowswire.as_answer(resp)
                elapsed = time.perf_counter() - started
                self.deadlines.record(role, elapsed, tokens, runs)
                self.metrics.upstream_duration.record(elapsed, {**attrs, "rpc.grpc.status_code": "OK"})
                self.metrics.upstream_bytes.add(len(resp.data), {"eftmesh.role": role})
                got = _outcomes(role, resp)
                refused = [i for i, o in zip(idx, got) if isinstance(o.error, ReplicaDraining)]
                if refused:
                    self.metrics.upstream_failovers.add(len(refused), {**_cause("drain"), "eftmesh.role": role,
                                                                       "rpc.grpc.status_code": "UNAVAILABLE"})
                    if replica.state is LIVE:
                        self._set_state(role, replica, DRAINING, "refuses new sessions")
                        if not self._live_replicas(role):
                            self._report(False)
                    kept = {i: o for i, o in zip(idx, got) if i not in refused}
                    return {**kept, **move(replica, refused, "is draining")}
            return dict(zip(idx, got))

        for replica, idx in gone.values():
            why = replica.why or replica.state.value
            if any(calls[i].start > 0 and not zero for i in idx):  # sessions it held move: a failover
                self.metrics.upstream_failovers.add(len(idx), {**_cause("health"), "eftmesh.role": role})
            for i, o in move(replica, idx, f"is not live ({why})").items():
                out[i] = o
        jobs = list(groups.values())
        hold = None
        if attempt == 0 and jobs and (len(jobs) > 1 or self._live_replicas(role, exclude=jobs[0][0].address)):
            # another replica could take a straggler's sessions: the step need not wait for it
            hold = self.deadlines.hold_after(role, max(sent(idx) for _, idx in jobs), max(forwards(idx) for _, idx in jobs))
        if hold is None:  # the first call on this thread: no hand-off where nothing can be set aside
            pending = [self._pool.submit(contextvars.copy_context().run, one, r, idx) for r, idx in jobs[1:]]
            results = [one(*jobs[0])] if jobs else []
            results += [f.result() for f in pending]
        else:
            results = self._hold_stragglers(role, method, jobs, one, hold, out, partial)
        for got in results:
            for i, o in got.items():
                out[i] = o
        return out

    def _hold_stragglers(self, role: str, method: str, jobs: list[tuple[Replica, list[int]]],
                         one: Callable[[Replica, list[int]], dict[int, Outcome]], hold: float,
                         out: list[Outcome], partial: bool) -> list[dict[int, Outcome]]:
        """Run every replica's call on the pool and wait `hold` s for them; a call still running
        then is a straggler if another replica has answered, or if the step has generations this
        call does not carry (`partial`): its items get `Outcome(pending=...)` (the step goes on
        without them) and the call runs on, to its answer or its deadline and a move. Returns
        the answered calls' outcomes.

        `partial` matters when the late replica is the call's only one: a draft role's replica
        holding every drafting generation, say. Waiting for it would hold up the step's other
        generations until the call's deadline (a chaos run saw 2.4x on the non-drafting streams
        when all the drafting ones sat on a frozen ft-small replica)."""
        futures = {self._pool.submit(contextvars.copy_context().run, one, r, idx): (r, idx) for r, idx in jobs}
        done, waiting = wait(futures, timeout=hold)
        if waiting and not done and not partial:  # every replica slow alike, and nobody else to step: a slow step
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        for f in waiting:
            replica, idx = futures[f]
            log.info("%s at %s has not answered %s within %.3f s: %d generations sit this step out",
                     role, replica.address, method, hold, len(idx))
            self.metrics.upstream_stragglers.add(len(idx), {"eftmesh.role": role})
            for i in idx:
                out[i] = Outcome(pending=f)
        return [f.result() for f in done]

    def _cancellable(self, role: str, replica: Replica, fut: Any) -> Any:
        """Wait for a call's answer, cancelled by `_on_down` if its replica is marked down."""
        key = (role, replica.address)
        with self._lock:
            self._inflight.setdefault(key, set()).add(fut)
        try:
            if replica.state is DOWN:  # marked down between the call's routing and now
                fut.cancel()
            return fut.result()
        finally:
            with self._lock:
                self._inflight.get(key, set()).discard(fut)

    def _on_down(self, role: str, replica: Replica) -> None:
        """The monitor marked `replica` down: cancel its calls in flight, whose generations then
        move to another replica of the role at once instead of waiting out their deadlines."""
        with self._lock:
            calls = list(self._inflight.get((role, replica.address), ()))
        for fut in calls:
            fut.cancel()

    def _no_replica_error(self, role: str, replica: Replica, why: str, attempt: int) -> Unavailable:
        missing = self.missing_roles()
        if role in missing:
            return Unavailable(f"upstream {role} has no live replica ({self.addresses[role]}: {replica.address} {why})")
        return Unavailable(f"upstream {role}: {replica.address} {why}, and {attempt} re-sends found no other replica")

    def close(self) -> None:
        """Send the releases no call has carried, wait (at most RELEASE_FLUSH_S) for the
        Releases in flight, then close."""
        self._flush_and_wait()
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class UpstreamError(EftMeshError):
    """An upstream logit service refused a call; keeps its status code, names the role."""

    def __init__(self, role: str, err: grpc.RpcError) -> None:
        self.code = err.code()
        super().__init__(f"upstream {role}: {err.details()}")


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


def _outcomes(role: str, answer: rowswire.RowsAnswer) -> list[Outcome]:
    """Per-item outcomes of a ScoreBatch / DraftBatch answer (`rowswire`: its rows where gRPC
    received them); rows sliced from its one tensor, floored (`core.mixing.floor_rows_`) as
    everything the combiner mixes, in float32 or bfloat16.

    bfloat16 rows (a GPU model's) stay as the wire brings them: the usual step's mix widens them
    as it reads them (`fusedmix.mix3`), and other steps' mixes through a scratch buffer
    (`mixing.accumulate`). Widening them all here first cost 26-33 ms of torch's passes (and
    fresh pages) per 80 rows of 128k across the three roles, and made the mix read twice the
    bytes. float16 rows, and bfloat16 rows an older logit service sent unfloored, are widened
    here, in the thread that waited for this role's answer (exact; a new tensor, floored in
    place)."""
    resp = answer.message
    block = tensors.from_buffer(answer.data, resp.logits.dtype, resp.logits.shape) if resp.logits.shape else None  # [sum rows, vocab]
    if block is not None and (block.dtype == torch.float16 or (block.dtype == torch.bfloat16 and not resp.floored)):
        block = block.float()
        if not resp.floored:
            floor_rows_(block)
    elif block is not None and not resp.floored:  # an older logit service: floor here (a copy: the wire's bytes are read-only)
        block = floor_rows_(block.clone())
    results = resp.results
    # one view per item from one split (slicing item by item cost ~1.4 us more each, and this
    # runs for every item of every role's call, every step: ~6 us an item before, ~3 now)
    sizes = [r.rows for r in results if not r.code]
    views = iter(block.split(sizes) if block is not None and sum(sizes) == block.shape[0] else _sliced(block, sizes))
    out = []
    for r in results:
        if code := r.code:
            if code == _UNAVAILABLE and r.message.startswith(DRAINING_PREFIX):
                out.append(Outcome(error=ReplicaDraining(f"upstream {role}: {r.message}")))
                continue
            kind = _ITEM_ERRORS.get(code)
            err = kind(f"upstream {role}: {r.message}") if kind else UpstreamItemError(role, _CODES[code], r.message)
            out.append(Outcome(error=err))
        elif drafts := r.drafts:  # (a score's items have no drafts, nor their probabilities)
            out.append(Outcome(rows=next(views), drafts=list(drafts), cached_tokens=r.cached_tokens,
                               draft_probs=list(r.draft_probs), draft_cuts=list(zip(r.draft_cut_z, r.draft_cut_mass))))
        else:
            out.append(Outcome(rows=next(views), cached_tokens=r.cached_tokens))
    return out


_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def _sliced(block: torch.Tensor | None, sizes: list[int]) -> list[Any]:
    """Each item's rows sliced in turn: a response whose row counts do not add up to its
    tensor (which no eftmesh logit service sends) reads as the item-by-item slicing read it."""
    out, at = [], 0
    for n in sizes:
        out.append(block[at:at + n])  # type: ignore[index]
        at += n
    return out


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
