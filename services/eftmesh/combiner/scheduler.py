"""Continuous batching: one loop steps every running generation together.

The combiner plays TGI's router (it owns the tokens, the queue and sampling) and each logit
service a shard that keeps its sessions' KV caches between calls. Each iteration:

  1. admit waiting generations while the batch has room and this step's prefill budget
     (`prefill_tokens` prompt tokens, less the pieces of prompts chunking) lasts; the first
     waiting one always goes. A step that admits runs the newcomers alone (prefill first),
     never two such steps in a row. A prompt longer than `prefill_chunk` runs in pieces, one
     per step beside the running batch's decode steps (chunked prefill, as in vLLM, SGLang);
  2. choose each generation's block size k (0 = a plain step);
  3. one DraftBatch per draft role carries every speculating generation's block;
  4. one ScoreBatch per role carries every generation's new tokens (plain steps, verifies of
     any k, prefills), the roles called concurrently;
  5. mix all rows at once (`batchmix.mix_step`, `[rows, vocab]`, role by role), apply
     temperature / top-k / top-p per group of equal settings, then each generation samples or verifies
     with its own seeded generator, so batching changes no generation's output;
  6. stream the chunks (every `stream_interval` tokens; a consumer of the whole answer gets its
     first and its last); finished, failed and cancelled generations leave, their caches
     released. A generation whose upstream item failed fails alone.

A full KV cache (an item's RESOURCE_EXHAUSTED) preempts that generation as vLLM does: its
caches are released, it goes back to the front of the queue and re-prefills when admitted;
waiting longer than `queue_timeout_s` fails it with RESOURCE_EXHAUSTED.

Speculation under load: a verify of k drafts costs k + 1 rows per generation (on a saturated
device nearly k + 1 plain steps); `SpeculationController` times steps under each cap on k and
keeps the one with the most expected tokens per second (controller.py).
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from opentelemetry import trace

from eftmesh.combiner.batchmix import Workspace, argmax_step, draw_plain, mix_step, verify_groups
from eftmesh.combiner.controller import SpeculationController
from eftmesh.combiner.decoding import Generation
from eftmesh.combiner.prefixes import PrefixEstimate
from eftmesh.combiner.scoring import BlockCap, Outcome, Scorer
from eftmesh.common.errors import Cancelled, DeadlineExceeded, EftMeshError, InvalidArgument, ResourceExhausted
from eftmesh.common.metrics import CombinerMetrics, meter
from eftmesh.core.sampling import NoFiniteMass, check_argmax_finite

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of one combiner (flags of the same names)."""

    max_batch: int = 32  # generations stepped together; more wait in the queue
    prefill_tokens: int = 512  # prompt tokens admitted per step (the first admission always goes)
    prefill_chunk: int = 2048  # a longer prompt runs in pieces, one per step (chunked prefill); 0: off
    prefill_first: bool = True  # a step that admits runs the newcomers alone; False: beside the batch's step
    queue_timeout_s: float = 30.0  # longest wait for a batch slot or KV cache room
    stream_interval: int = 1  # a streaming consumer's tokens go this many at a time (its first and last at once)


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class StepTimes:
    """Where the scheduler's time goes, summed over steps (read by benchmarks; not locked)."""

    steps: int = 0
    tokens: int = 0
    rows: int = 0  # EFT rows mixed (one per plain step, k + 1 per block)
    draft_s: float = 0.0  # waiting for DraftBatch answers
    score_s: float = 0.0  # waiting for ScoreBatch answers
    combine_s: float = 0.0  # the combiner's own work: mixing, processing, sampling, verifying
    combine_cpu_s: float = 0.0  # the same in the thread's CPU seconds: its cost, whatever else runs


class Scheduler:
    """Owns the running batch and the queue; one daemon thread runs `_loop`."""

    def __init__(
        self,
        scorer: Scorer,
        vocab_size: int,
        config: SchedulerConfig = SchedulerConfig(),
        max_k: BlockCap | int = 16,
        tracer: trace.Tracer | None = None,
        metrics: CombinerMetrics | None = None,
        *,
        start: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`start=False` runs no thread: a caller (a test) calls `step()` itself. `clock` is
        the monotonic clock of queue timeouts, deadlines and back-offs."""
        self.scorer = scorer
        self.clock = clock
        self.vocab_size = vocab_size
        self.config = config
        self.tracer = tracer or trace.get_tracer("eftmesh.combiner")
        self.metrics = metrics or CombinerMetrics(meter(None, "eftmesh.combiner"))
        self.controller = SpeculationController(max_k)
        self.times = StepTimes()
        self._workspace = Workspace()  # the step's scores, reused (batchmix.Workspace)
        self.prefixes = PrefixEstimate()  # what the services' prefix caches likely hold (prefixes.py)
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: list[Generation] = []
        # sitting steps out while a straggler's call for them runs on (Outcome.pending), till it ends
        self._held: dict[Generation, Future[Any]] = {}
        self._cv = threading.Condition()
        self._stop = self._last_prefill_only = False
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fanout")
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Run `step()` on a daemon thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def submit(self, g: Generation) -> None:
        g.span_context = trace.get_current_span().get_span_context()
        g.enqueued = self.clock()
        g.shape = self.controller.shape(g.req.speculation.draft_role) if g.req.speculation else None
        with self._cv:
            self._waiting.append(g)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
        else:  # no loop to end them: fail what is left here
            self._shut_down()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) generations; held ones count as running."""
        return len(self._running) + len(self._held), len(self._waiting)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._running and not self._waiting and not self._ready_held():
                    self._cv.wait()  # a held call's end notifies (Scheduler._hold)
                if self._stop:
                    break
            if not self.step():  # everyone waiting is backing off after a full KV cache
                with self._cv:
                    self._cv.wait(timeout=0.01)
        self._shut_down()

    def _shut_down(self) -> None:
        for g in self._running + list(self._held) + list(self._waiting):
            self._fail(g, Cancelled("the combiner is shutting down"))

    def step(self) -> bool:
        """One scheduling step, synchronously: admit waiting generations, choose the batch,
        run its calls, mix, sample and deliver. False when there was nothing to step (nothing
        running, and whatever waits is backing off)."""
        self._rejoin_held()
        with self._cv:
            joined = self._admit()
        # Prefill first (vLLM V0's and TGI's policy): a step that admits runs the newcomers alone,
        # so their first token waits for their own prefill only, not for the batch's decode too;
        # the batch waits a step (`prefill_first=False`: beside it, as vLLM V1 does). Never twice
        # in a row, so arrivals cannot starve the running batch; never for newcomers that only
        # send a piece of a long prompt (no first token to hurry: the piece joins the batch).
        hurried = self.config.prefill_first and any(not g.in_pieces(self.config.prefill_chunk) for g in joined)
        prefill_only = hurried and not self._last_prefill_only and len(joined) < len(self._running)
        self._last_prefill_only = prefill_only
        batch = joined if prefill_only else list(self._running)
        if not batch:
            return False
        try:
            self._iteration(batch)
        except Exception as e:  # a bug here must not stop every other generation forever
            log.exception("scheduler step failed")
            for g in batch:
                self._fail(g, e if isinstance(e, EftMeshError) else EftMeshError(f"combiner fault: {type(e).__name__}"))
        return True

    def _ready_held(self) -> bool:
        return any(f.done() for f in self._held.values())

    def _hold(self, g: Generation, pending: Future[Any]) -> None:
        """`g`'s call straggles: it sits the step out (undone: no output changes) until the
        call has ended; the loop is woken then."""
        if g not in self._running:
            return
        self._running.remove(g)
        g.undo_step()
        self._held[g] = pending

        def wake(_: Future[Any]) -> None:
            with self._cv:
                self._cv.notify()

        pending.add_done_callback(wake)

    def _rejoin_held(self) -> None:
        """Held generations whose straggling call has ended go back into the batch (and redo
        their step: the caches roll back to what the generation holds)."""
        for g in [g for g, f in self._held.items() if f.done()]:
            del self._held[g]
            self._running.append(g)

    def _admit(self) -> list[Generation]:
        """Move waiting generations into the batch: up to max_batch, within the prefill budget.
        Returns those admitted. Holds the condition's lock."""
        now = self.clock()
        for g in [g for g in self._waiting if self._gone(g, now)]:
            self._waiting.remove(g)
        # Preempted generations go first (vLLM's rule): while one is waiting, no new request
        # takes the KV cache room it needs.
        preempted = any(g.parked_since is not None for g in self._waiting)
        chunk = self.config.prefill_chunk
        # the pieces of prompts chunking in the batch come out of this step's budget first
        budget = self.config.prefill_tokens - sum(min(g.behind, chunk) for g in self._running if chunk and g.behind > 1)
        # Prompts are counted less what the prefix caches likely hold only when every role has one.
        # (tuple(): one atomic copy; the monitor adds a role's spec when it first answers)
        specs = tuple(getattr(self.scorer, "models", {}).values())
        cost_of = self.prefixes.uncached if specs and all(m.prefix_cache for m in specs) else len
        joined: list[Generation] = []
        for g in list(self._waiting):
            if len(self._running) >= self.config.max_batch or (preempted and g.parked_since is None):
                break
            if g.not_before > now:
                continue  # backing off after a full KV cache
            # what its prefill likely runs; a preempted one in full (it left under KV pressure,
            # when the caches evict)
            cost = len(g.ids) if g.parked_since is not None else cost_of(g.ids)
            cost = min(cost, chunk) if chunk else cost  # this step runs its first piece
            if budget < cost and budget < self.config.prefill_tokens:
                break  # this step's prefill budget is spent; the next step admits it
            else:
                budget -= cost
                self._waiting.remove(g)
                if g.parked_since is None:
                    self.metrics.queue_wait.record(now - g.enqueued)
                self._running.append(g)
                joined.append(g)
        return joined

    def _gone(self, g: Generation, now: float) -> bool:
        """Fail (and say True for) a waiting generation that was cancelled or waited too long."""
        since = g.parked_since if g.parked_since is not None else g.enqueued
        if g.cancelled or g.is_cancelled():
            self._fail(g, Cancelled("the client cancelled the generation"))
        elif g.deadline is not None and now > g.deadline:
            self._fail(g, DeadlineExceeded("the request's deadline passed while it waited for a batch slot"))
        elif now - since > self.config.queue_timeout_s:
            why = "room in the logit services' KV caches" if g.parked_since is not None else "a batch slot"
            self._fail(g, ResourceExhausted(
                f"waited {now - since:.1f} s for {why} (--queue-timeout {self.config.queue_timeout_s:g} s); "
                "retry with back-off", reason="queue_timeout"))
        else:
            return False
        return True

    def _iteration(self, batch: list[Generation]) -> None:
        started = time.perf_counter()
        now = self.clock()
        live = []
        for g in batch:
            if g.cancelled or g.is_cancelled():
                self._fail(g, Cancelled("the client cancelled the generation"))
            elif g.deadline is not None and now > g.deadline:
                self._fail(g, DeadlineExceeded("the request's deadline passed while generating"))
            else:
                live.append(g)
        if not live:
            return
        aware = [g for g in live if g.load_aware]
        cap = None
        if aware:
            # Nothing timed yet: begin where the generations' acceptance alone would draft.
            start = max(g.adaptive.k for g in aware if g.adaptive is not None)
            cap = self.controller.choose(len(live), lambda c: sum(g.expected_tokens(c) for g in live), start)
            self.metrics.speculation_caps.add(1, {"eftmesh.speculation.cap": cap})
        # A step that prefills says nothing about steady-state speed: not a controller sample.
        prefilling = any(not any(g.cached.values()) or g.behind > 1 for g in live)
        for g in live:
            g.begin_step(cap, self.config.prefill_chunk)
        links = [trace.Link(g.span_context) for g in live if g.span_context is not None and g.span_context.is_valid]
        attrs = {"eftmesh.batch.size": len(live), "eftmesh.batch.drafting": sum(1 for g in live if g.k)}
        t = self.times
        with self.tracer.start_as_current_span("eftmesh.step", links=links, attributes=attrs):
            t0 = time.perf_counter()
            live = self._draft_phase(live)
            t1 = time.perf_counter()
            rows = self._score_phase(live)
            t2, c2 = time.perf_counter(), time.thread_time()
            stepped = self._combine(live, rows)
            t3 = time.perf_counter()
            t.combine_cpu_s += time.thread_time() - c2
        t.draft_s, t.score_s, t.combine_s = t.draft_s + t1 - t0, t.score_s + t2 - t1, t.combine_s + t3 - t2
        t.steps, t.rows = t.steps + 1, t.rows + sum(g.rows_per_role() for g in stepped)
        tokens = sum(g.sink.usage.completion_tokens - before for g, before in stepped.items())
        t.tokens += tokens  # counted before delivery: a client that has its tokens sees them counted
        self.metrics.batch_size.record(len(live))  # and its step (bench-hop scrapes right after)
        for g in stepped:  # after the step's span ends, so a client never sees a step unfinished
            self._deliver(g)
        if cap is not None and not prefilling:
            self.controller.observe(len(live), cap, time.perf_counter() - started)

    def _fan_out(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Run jobs concurrently (one per role), the first on this thread; trace context follows."""
        pending = [self._pool.submit(contextvars.copy_context().run, j) for j in jobs[1:]]
        first = [jobs[0]()] if jobs else []
        return first + [f.result() for f in pending]

    def _draft_phase(self, live: list[Generation]) -> list[Generation]:
        """One DraftBatch per draft role for every generation with k >= 1; returns the
        generations still alive."""
        by_role: dict[str, list[Generation]] = {}
        for g in live:
            if g.k:
                by_role.setdefault(g.req.speculation.draft_role, []).append(g)
        if not by_role:
            return live
        roles = list(by_role)
        calls = {r: [g.draft_call(g.k, self.vocab_size) for g in by_role[r]] for r in roles}
        results = self._fan_out([lambda r=r: self.scorer.draft_batch(r, calls[r], len(calls[r]) < len(live))
                                 for r in roles])  # partial: others step on without a straggler
        for r, outcomes in zip(roles, results):
            for g, o in zip(by_role[r], outcomes):
                if o.pending is not None:
                    self._hold(g, o.pending)
                elif o.error is not None:
                    self._upstream_failed(g, o.error, r)
                else:
                    g.drafted(o.drafts, o.rows, o.draft_probs, o.draft_cuts)
                    g.prefilled(r, g.cached[r], o.cached_tokens)
        return [g for g in live if g in self._running]

    def _score_phase(self, live: list[Generation]) -> dict[Generation, dict[str, torch.Tensor]]:
        """One ScoreBatch per role carrying every generation's share; role -> rows per generation."""
        calls: dict[str, list[tuple[Generation, Any]]] = {}
        for g in live:
            for c in g.score_calls():
                calls.setdefault(c.role, []).append((g, c))
        roles = list(calls)
        results: list[list[Outcome]] = self._fan_out(
            [lambda r=r: self.scorer.score_batch(r, [c for _, c in calls[r]], len(calls[r]) < len(live)) for r in roles]
        )
        rows: dict[Generation, dict[str, torch.Tensor]] = {g: {} for g in live}
        for r, outcomes in zip(roles, results):
            for (g, _), o in zip(calls[r], outcomes):
                if o.pending is not None:
                    self._hold(g, o.pending)
                elif o.error is not None:
                    self._upstream_failed(g, o.error, r)
                else:
                    rows[g][r] = o.rows
                    g.prefilled(r, g.cached[r], o.cached_tokens)
        for g in live:
            if g.k and g.req.speculation.draft_role in g.coef:
                rows[g][g.req.speculation.draft_role] = g.draft_rows
        return {g: rows[g] for g in live if g in self._running}

    def _combine(self, live: list[Generation], rows: dict[Generation, dict[str, torch.Tensor]]) -> dict[Generation, int]:
        """Mix every generation's rows at once, process them per sampling group, and let each
        generation sample or verify (a piece of a long prompt: nothing to sample yet). Returns
        the generations that stepped, with their token counts before the step."""
        pieces = {g for g in live if g in rows and g.piece is not None}
        for g in pieces:
            g.piece_done()
        if not (gens := [g for g in live if g in rows and g not in pieces]):
            return {}
        scores, offsets = mix_step(gens, rows, self.vocab_size, self._workspace)  # [n, vocab], unnormalised
        sampling = {g: g.req.sampling for g in gens}
        verdicts = verify_groups(gens, sampling, offsets, scores, self._workspace)  # sampled blocks
        drawn = draw_plain(gens, sampling, offsets, scores, self._workspace)  # sampled plain steps' tokens
        # every row's argmax (greedy decoding and verification need nothing else): the mix's, or one pass
        top, finite = argmax_step(scores, self._workspace) if any(c.greedy for c in sampling.values()) else (None, None)
        all_finite = finite is None or bool(finite.all())
        stepped = {}
        for g in gens:
            o, m = offsets[g], g.rows_per_role()
            before = g.sink.usage.completion_tokens
            try:
                if sampling[g].greedy and not all_finite and not bool(finite[o:o + m].all()):
                    check_argmax_finite(scores[o:o + m], top[o:o + m])  # raises NoFiniteMass, naming the rows
                g.finish(scores[o:o + m], verdicts.get(g), None if top is None else top[o:o + m], drawn.get(g))
            except NoFiniteMass as e:  # degenerate weights / settings: this request's fault alone
                self._fail(g, InvalidArgument(str(e)))
                continue
            except Exception as e:  # one generation's numeric trouble must not touch the others
                log.exception("generation failed while sampling")
                self._fail(g, e if isinstance(e, EftMeshError) else EftMeshError(f"sampling failed: {type(e).__name__}"))
                continue
            stepped[g] = before
            g.progressed()
            if before == 0:  # its prompt's prefill completed in every role: likely cached there now
                self.prefixes.remember(g.ids[:g.sink.usage.prompt_tokens])
        return stepped

    # --- leaving the batch ---------------------------------------------------------------------

    def _upstream_failed(self, g: Generation, err: EftMeshError, role: str) -> None:
        """A role refused this generation's item: a full KV cache preempts it (back to the queue,
        caches released, re-prefilled later); anything else fails it."""
        if g not in self._running:
            return
        if isinstance(err, ResourceExhausted):
            self.metrics.preempted.add(1, {"eftmesh.role": role})
            self._running.remove(g)
            self.scorer.release(g.sessions)
            g.park(self.clock())
            with self._cv:
                self._waiting.appendleft(g)
            return
        self._fail(g, err)

    def _deliver(self, g: Generation) -> None:
        # woken for its first tokens (time to first token), its last, and if it streams every
        # --stream-interval tokens: a streamed message costs ~0.15-0.2 ms of CPU (docs/batching.md)
        s = g.sink
        if not g.woken or s.finish_reason is not None or (g.streams and s.pending_tokens >= self.config.stream_interval):
            g.out.put(s.take())
            g.woken = True
        if s.finish_reason is not None:
            self.prefixes.remember(g.ids)  # a chat's next turn re-sends it all
            self._leave(g)

    def _fail(self, g: Generation, err: BaseException) -> None:
        g.out.put(err)
        self._leave(g)

    def _leave(self, g: Generation) -> None:
        if g in self._running:
            self._running.remove(g)
        self._held.pop(g, None)
        if g.touched:
            self.scorer.release(g.sessions)
            if not self._running:  # no call may follow to carry the releases
                self.scorer.flush_releases()
