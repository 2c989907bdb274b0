"""LogitService servicer: validate, convert, call the engine, convert back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import torch

from eftmesh.common import tensors
from eftmesh.common.convert import sampling_from_pb
from eftmesh.common.errors import InvalidArgument
from eftmesh.common.metrics import LogitMetrics, meter, outcome
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import DraftItem, ItemResult, ModelEngine, ScoreItem
from eftmesh.v1 import logit_pb2, logit_pb2_grpc, tensor_pb2


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
        i = self.engine.info
        # With --hide-model-path the build sets public_model_id (the role): no local path or hub id.
        return logit_pb2.LogitServiceInfoResponse(
            model_id=getattr(self, "public_model_id", None) or i.model_id,
            role=i.role,
            vocab_size=i.vocab_size,
            tokenizer_vocab_size=i.tokenizer_vocab_size,
            tokenizer_fingerprint=i.tokenizer_fingerprint,
            max_context=i.max_context,
            dtype=i.dtype,
            device=i.device,
            max_sessions=i.max_sessions,
            session_idle_timeout_s=i.session_idle_timeout_s,
            eos_token_id=i.eos_token_id,
            max_draft=i.max_draft,
            kv_cache_tokens=i.kv_cache_tokens,
            kv_block_size=i.kv_block_size,
            max_batch=i.max_batch,
            kv_bytes_per_token=self.engine.pool.bytes_per_token(),
            kv_bytes_per_token_theoretical=self.engine.pool.theoretical_bytes_per_token(),
        )

    def Score(
        self, request: logit_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> logit_pb2.ScoreResponse:
        try:
            out_dtype = tensors.torch_dtype(request.dtype)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        with self._measured("Score", len(request.tokens)):
            logprobs, length = self.engine.score(
                request.session_id, request.start, request.tokens, request.rows
            )
        return logit_pb2.ScoreResponse(
            logprobs=tensors.to_pb(logprobs, out_dtype), cache_length=length
        )

    def Draft(
        self, request: logit_pb2.DraftRequest, context: grpc.ServicerContext
    ) -> logit_pb2.DraftResponse:
        # Unset fields mean plain sampling; the combiner always sends the request's values.
        sampling = sampling_from_pb(request.sampling, SamplingConfig())
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
        return logit_pb2.ReleaseResponse(released=self.engine.release(request.session_id))

    def ScoreBatch(
        self, request: logit_pb2.ScoreBatchRequest, context: grpc.ServicerContext
    ) -> logit_pb2.ScoreBatchResponse:
        items = [ScoreItem(it.session_id, it.start, it.tokens, it.rows) for it in request.items]
        with self._measured("ScoreBatch", sum(len(it.tokens) for it in items), len(items)):
            results = self.engine.score_batch(items)
        logits, pb = _results_to_pb(results, self.engine.vocab_size, self.engine.dtype)
        return logit_pb2.ScoreBatchResponse(logits=logits, results=pb)

    def DraftBatch(
        self, request: logit_pb2.DraftBatchRequest, context: grpc.ServicerContext
    ) -> logit_pb2.DraftBatchResponse:
        # A malformed item (bad sampling parameters) fails alone, like any other item error.
        results: list[ItemResult] = [ItemResult() for _ in request.items]
        items, where = [], []
        for i, it in enumerate(request.items):
            try:
                sampling = sampling_from_pb(it.sampling, SamplingConfig())
            except InvalidArgument as e:
                results[i].error = e
                continue
            items.append(DraftItem(it.session_id, it.start, it.tokens, it.k, sampling, it.seed, it.vocab_limit))
            where.append(i)
        with self._measured("DraftBatch", sum(len(it.tokens) + it.k for it in items), len(items)):
            for i, r in zip(where, self.engine.draft_batch(items)):
                results[i] = r
        logits, pb = _results_to_pb(results, self.engine.vocab_size, self.engine.dtype)
        return logit_pb2.DraftBatchResponse(logits=logits, results=pb)


def _results_to_pb(
    results: list[ItemResult], vocab: int, dtype: torch.dtype
) -> tuple[tensor_pb2.Tensor, list[logit_pb2.ItemResult]]:
    """Every successful item's rows as one [rows, vocab] tensor in the model's dtype (0 rows
    when none succeeded), plus per-item results."""
    pb, rows = [], []
    for r in results:
        if r.error is not None:
            pb.append(logit_pb2.ItemResult(code=r.error.code.value[0], message=str(r.error)))
        else:
            pb.append(logit_pb2.ItemResult(rows=r.rows.shape[0], cache_length=r.cache_length, drafts=r.drafts))
            rows.append(r.rows)
    block = torch.cat(rows) if rows else torch.empty((0, vocab), dtype=dtype)  # [sum rows, vocab]
    return tensors.to_pb(block, block.dtype), pb
