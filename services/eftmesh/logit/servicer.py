"""LogitService servicer: thin: `logit.convert` turns protobuf into engine types and back, the
engine does the work, and this measures each call."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from eftmesh.common import rowswire, tensors
from eftmesh.common.metrics import LogitMetrics, meter, outcome
from eftmesh.logit import convert
from eftmesh.logit.admission import check_session_id
from eftmesh.logit.engine import ItemResult, ModelEngine
from eftmesh.v1 import logit_pb2, logit_pb2_grpc


class TimedLock:
    """Stands in for the engine's lock (`ModelEngine._lock`, which runs one call at a time): the
    same lock underneath, plus, for a thread inside `watching()`, the moment its first
    acquisition returned, i.e. when the engine started its call. Other acquisitions (warmup,
    Release, drain, the deletion-cost thread) are not watched and cost one attribute read."""

    # It wraps the engine's own lock object rather than replacing it, so anything else bound to
    # that object (a Condition, say) still excludes the same calls.
    def __init__(self, inner: Any | None = None) -> None:
        self._inner = inner if inner is not None else threading.Lock()
        self._local = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._inner.acquire(blocking, timeout)
        if ok and getattr(self._local, "watching", False):
            self._local.watching = False
            self._local.acquired_at = time.perf_counter()
        return ok

    def release(self) -> None:
        self._inner.release()

    def locked(self) -> bool:
        return self._inner.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextmanager
    def watching(self) -> Iterator[list[float]]:
        """Within the block, this thread's first acquisition is timed: the list yielded holds its
        perf_counter() time once it happened (empty if the block never took the lock)."""
        acquired: list[float] = []
        self._local.watching, self._local.acquired_at = True, None
        try:
            yield acquired
        finally:
            self._local.watching = False
            if self._local.acquired_at is not None:
                acquired.append(self._local.acquired_at)


def instrument_engine_lock(engine: Any) -> TimedLock | None:
    """Put a TimedLock around the engine's lock, so that the servicer measures how long calls
    queue for the engine without a hook in the engine (the same lock object stays underneath, so
    mutual exclusion is unchanged). None when the engine has no such lock."""
    lock = getattr(engine, "_lock", None)
    if isinstance(lock, TimedLock):
        return lock
    if lock is None or not (hasattr(lock, "acquire") and hasattr(lock, "release")):
        return None
    engine._lock = timed = TimedLock(lock)
    return timed


class LogitServicer(logit_pb2_grpc.LogitServiceServicer):
    def __init__(self, engine: ModelEngine, metrics: LogitMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or LogitMetrics(meter(None, "eftmesh.logit"), engine.info.role, lambda: 0, lambda: 0)
        self._lock_timer = instrument_engine_lock(engine)

    @contextmanager
    def _measured(self, method: str, tokens: int, items: int = 1) -> Iterator[None]:
        """Duration of one call by method and outcome, and the tokens it ran; how long it waited
        for the engine and how full a batch its `items` made (when it reached the engine)."""
        start, error, acquired = time.perf_counter(), None, []
        try:
            if self._lock_timer is None:
                yield
            else:
                with self._lock_timer.watching() as acquired:
                    yield
        except BaseException as e:
            error = e
            raise
        finally:
            attrs = {"eftmesh.role": self.metrics.role, "rpc.method": method}
            self.metrics.duration.record(time.perf_counter() - start, {**attrs, "rpc.grpc.status_code": outcome(error)})
            if error is None:
                self.metrics.tokens.add(tokens, attrs)
            if acquired:
                self.metrics.queue_wait.record(max(acquired[0] - start, 0.0), attrs)
            if acquired and items > 0:
                self.metrics.batch_occupancy.record(items / max(1, self.engine.info.max_batch), attrs)

    def Info(
        self, request: logit_pb2.LogitServiceInfoRequest, context: grpc.ServicerContext
    ) -> logit_pb2.LogitServiceInfoResponse:
        # With --hide-model-path the build sets public_model_id (the role): no local path or hub id.
        i = self.engine.info
        return convert.info_to_pb(i, getattr(self, "public_model_id", None) or i.model_id,
                                  self.engine.pool.bytes_per_token(), self.engine.pool.theoretical_bytes_per_token())

    def Score(
        self, request: logit_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> logit_pb2.ScoreResponse:
        out_dtype = convert.dtype_from_pb(request.dtype)
        with self._measured("Score", len(request.tokens)):
            logprobs, length = self.engine.score(request.session_id, request.start, request.tokens, request.rows)
        return logit_pb2.ScoreResponse(logprobs=tensors.to_pb(logprobs, out_dtype), cache_length=length)

    def Draft(
        self, request: logit_pb2.DraftRequest, context: grpc.ServicerContext
    ) -> logit_pb2.DraftResponse:
        sampling = convert.sampling_or_default(request.sampling)
        # tokens run: the catch-up tokens, then each of the k drafts fed back (k + 1 rows)
        with self._measured("Draft", len(request.tokens) + request.k):
            drafts, rows, length = self.engine.draft(
                request.session_id, request.start, request.tokens, request.k, sampling, request.seed,
                request.vocab_limit,
            )
        return logit_pb2.DraftResponse(tokens=drafts, logprobs=tensors.to_pb(rows), cache_length=length)

    def Release(
        self, request: logit_pb2.ReleaseRequest, context: grpc.ServicerContext
    ) -> logit_pb2.ReleaseResponse:
        # session_id may be left empty when session_ids names the sessions; every id is checked
        # before any is dropped, so a bad one (INVALID_ARGUMENT) drops none
        ids = list(request.session_ids)
        if request.session_id or not ids:
            ids.insert(0, request.session_id)
        for sid in ids:
            check_session_id(sid)
        return logit_pb2.ReleaseResponse(released=any([self.engine.release(sid) for sid in ids]))

    def _release(self, session_ids: Sequence[str]) -> None:
        """A batched call's `release`: the sessions the caller has finished with, dropped before
        its items run (what a Release call each would do, without the calls)."""
        for sid in session_ids:
            self.engine.release(sid)

    def ScoreBatch(
        self, request: logit_pb2.ScoreBatchRequest, context: grpc.ServicerContext
    ) -> rowswire.RowsReply:
        self._release(request.release)
        items = convert.score_items_from_pb(request.items)
        with self._measured("ScoreBatch", sum(len(it.tokens) for it in items), len(items)):
            results = self.engine.score_batch(items)
        # the runner floors every row; the rows' bytes are copied once, as gRPC sends them (rowswire)
        return convert.results_to_reply(results, self.engine.vocab_size, self.engine.dtype,
                                        logit_pb2.ScoreBatchResponse(floored=True))

    def DraftBatch(
        self, request: logit_pb2.DraftBatchRequest, context: grpc.ServicerContext
    ) -> rowswire.RowsReply:
        self._release(request.release)
        items, where, bad = convert.draft_items_from_pb(request.items)
        results = [ItemResult(error=bad.get(i)) for i in range(len(request.items))]
        with self._measured("DraftBatch", sum(len(it.tokens) + it.k for it in items), len(items)):
            for i, r in zip(where, self.engine.draft_batch(items)):
                results[i] = r
        return convert.results_to_reply(results, self.engine.vocab_size, self.engine.dtype,
                                        logit_pb2.DraftBatchResponse(floored=True))


# The batched calls, whose answers `rowswire.serialize` writes (their rows copied once).
_ROWS_METHODS = ("ScoreBatch", "DraftBatch")


class _Handlers:
    """Stands in for a server in the generated registration, to keep its method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, _service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


def add_to_server(servicer: LogitServicer, server: grpc.Server) -> None:
    """The generated `add_LogitServiceServicer_to_server`, with the batched calls' answers
    serialised by `rowswire.serialize` (standard protobuf bytes, written with one copy of the rows)."""
    made = _Handlers()
    logit_pb2_grpc.add_LogitServiceServicer_to_server(servicer, made)
    handlers = {name: h._replace(response_serializer=rowswire.serialize) if name in _ROWS_METHODS else h
                for name, h in made.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(rowswire.LOGIT_SERVICE, handlers),))
    server.add_registered_method_handlers(rowswire.LOGIT_SERVICE, handlers)
