"""Continuous batching: one loop steps every running generation together.

The combiner plays TGI's router (it owns the tokens, the queue and sampling) and each logit
service a shard that keeps its sessions' KV caches between calls. Each iteration:

  1. admit waiting generations while the batch has room and this step's prefill budget
     (`prefill_tokens` prompt tokens) lasts, so a long prompt joining does not stall the
     running ones for long; the first waiting one is always admitted. A step that admits
     runs the newcomers alone (prefill first), so their first token does not wait for the
     running batch's decode (never two such steps in a row);
  2. choose each generation's block size k (0 = a plain step);
  3. one DraftBatch per draft role carries every speculating generation's block;
  4. one ScoreBatch per role carries every generation's new tokens (plain steps, verifies of
     any k, prefills), the roles called concurrently;
  5. mix all rows at once (`batchmix.mix_step`, `[rows, vocab]`, role by role), apply
     temperature / top-k / top-p per group of equal settings, then each generation samples or verifies
     with its own seeded generator, so batching changes no generation's output;
  6. stream the chunks; finished, failed and cancelled generations leave and their caches
     are released. A generation whose upstream item failed fails alone.

A full KV cache (an item's RESOURCE_EXHAUSTED) preempts that generation as vLLM does: its
caches are released, it goes back to the front of the queue and re-prefills when admitted;
waiting longer than `queue_timeout_s` fails it with RESOURCE_EXHAUSTED.

Speculation under load: a batched verify of k drafts costs k + 1 rows per generation, which
on a saturated device approaches k + 1 plain steps, while its yield per block stays
(1 - a^(k+1)) / (1 - a). `SpeculationController` times whole steps under each cap on k and
keeps the cap with the most expected tokens per second, timing its neighbours now and then.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from opentelemetry import trace

from eftmesh.combiner.batchmix import Workspace, mix_step, process_groups
from eftmesh.combiner.decoding import Chunk, Generation, GenerationRequest, TokenSink, encode_prompt
from eftmesh.combiner.chat import ChatTemplates, TemplateError
from eftmesh.combiner.scoring import Outcome, Scorer
from eftmesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    EftMeshError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from eftmesh.common.metrics import CombinerMetrics, meter
from eftmesh.core.sampling import NoFiniteMass, argmax_rows, check_argmax_finite

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of one combiner (flags --max-batch, --prefill-tokens, --queue-timeout)."""

    max_batch: int = 32  # generations stepped together; more wait in the queue
    prefill_tokens: int = 512  # prompt tokens admitted per step (the first admission always goes)
    queue_timeout_s: float = 30.0  # longest wait for a batch slot or KV cache room


# --- the load-aware speculation controller (pure: no threads, no network) ----------------------


@dataclass
class _ArmStats:
    seconds: float = 0.0  # exponential moving average of a step's duration under this cap
    tries: int = 0
    last: int = -1  # step it was last used


@dataclass
class SpeculationController:
    """Chooses the cap on k for load-aware generations: the cap whose steps deliver the most
    expected tokens per second, from what it measures.

    A block of k drafts yields (1 - a^(k+1)) / (1 - a) tokens on average; what a batched
    verify costs depends on the load, so it is measured rather than assumed: per batch-size
    bucket (powers of two) and per cap (0 = no drafting, 1, 2, 4, ..., max_k), a moving average
    of the step's duration. The expected yield of a cap comes from the caller (each
    generation's own acceptance estimate), so the choice rests on step times, which vary far
    less than one step's accepted tokens.

    The search is local, because a step under a far-off cap can cost as much as many plain
    steps (a verify of 16 drafts for each of 16 generations runs 272 rows): a bucket never
    timed starts at the best cap of the nearest bucket that was, or, when none was, at the
    caller's `start` (the scheduler passes the k the generations' acceptance alone suggests,
    `AdaptiveBlockSize`; max_k without one); after that only the best cap's
    two neighbours and no drafting (the cheapest step to time) are tried, each once as soon as
    the best cap moves next to it, then every `explore_every` steps the least recently used of
    them again, so the choice follows the load. Light load: drafting wins (a step's fixed costs
    dominate); on a saturated device a verify of k drafts costs about k + 1 plain steps and the
    cap walks down, to 0.
    """

    max_k: int
    explore_every: int = 16
    smoothing: float = 0.3
    _stats: dict[tuple[int, int], _ArmStats] = field(default_factory=dict)
    _step: int = 0

    def arms(self) -> list[int]:
        caps = [0] + [c for c in (1, 2, 4, 8, 16, 32) if c < self.max_k] + [self.max_k]
        return sorted(set(caps))

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, batch))))

    def _best(self, b: int, expected_tokens: Callable[[int], float]) -> int | None:
        """Index in arms() of the cap with the most expected tokens per measured second in
        bucket `b`; None when nothing was timed there."""
        arms = self.arms()
        rates = {i: expected_tokens(arm) / s.seconds for i, arm in enumerate(arms)
                 if (s := self._stats.get((b, arm))) is not None and s.seconds > 0}
        return max(rates, key=rates.__getitem__) if rates else None

    def choose(self, batch: int, expected_tokens: Callable[[int], float], start: int | None = None) -> int:
        """The cap on k for the next step of a batch of `batch` generations;
        `expected_tokens(cap)` is what the batch would yield in one step under that cap, and
        `start` the k to begin at while nothing was timed (the largest cap not above it)."""
        self._step += 1
        b = self.bucket(batch)
        arms = self.arms()
        best = self._best(b, expected_tokens)
        if best is None:  # a bucket never timed: where the nearest timed bucket is best
            timed = sorted({tb for tb, _ in self._stats}, key=lambda tb: (abs(math.log2(tb / b)), -tb))
            seed = self._best(timed[0], expected_tokens) if timed else None
            if seed is not None:
                return arms[seed]
            return arms[-1] if start is None else max(arm for arm in arms if arm <= max(start, 0))
        near = [i for i in dict.fromkeys((best - 1, best + 1, 0)) if 0 <= i < len(arms) and i != best]
        stats = [self._stats.get((b, arm)) for arm in arms]
        untried = [i for i in near if stats[i] is None]
        if untried:
            return arms[untried[0]]
        if near and self._step % self.explore_every == 0:
            # A cap timed once under other conditions is never left standing on one noisy sample.
            return arms[min(near, key=lambda i: stats[i].last)]
        return arms[best]

    def observe(self, batch: int, cap: int, seconds: float) -> None:
        """Record one step's duration under `cap`."""
        if seconds <= 0:
            return
        s = self._stats.setdefault((self.bucket(batch), cap), _ArmStats())
        s.seconds = seconds if s.tries == 0 else s.seconds + self.smoothing * (seconds - s.seconds)
        s.tries += 1
        s.last = self._step

    def snapshot(self) -> dict[int, dict[int, float]]:
        """bucket -> cap -> measured step milliseconds (for logs and benchmarks)."""
        out: dict[int, dict[int, float]] = {}
        for (b, cap), s in sorted(self._stats.items()):
            out.setdefault(b, {})[cap] = round(s.seconds * 1e3, 2)
        return out


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
    # the same phase in CPU seconds of the scheduler's thread (time.thread_time): what the work
    # costs, whatever else the machine runs
    combine_cpu_s: float = 0.0


class Scheduler:
    """Owns the running batch and the queue; one daemon thread runs `_loop`."""

    def __init__(
        self,
        scorer: Scorer,
        vocab_size: int,
        config: SchedulerConfig = SchedulerConfig(),
        max_k: int = 16,
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
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: list[Generation] = []
        self._cv = threading.Condition()
        self._stop = False
        self._last_prefill_only = False
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
        """(running, waiting) generations."""
        return len(self._running), len(self._waiting)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._running and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    break
            if not self.step():  # everyone waiting is backing off after a full KV cache
                with self._cv:
                    self._cv.wait(timeout=0.01)
        self._shut_down()

    def _shut_down(self) -> None:
        for g in self._running + list(self._waiting):
            self._fail(g, Cancelled("the combiner is shutting down"))

    def step(self) -> bool:
        """One scheduling step, synchronously: admit waiting generations, choose the batch,
        run its calls, mix, sample and deliver. False when there was nothing to step (nothing
        running, and whatever waits is backing off)."""
        with self._cv:
            joined = self._admit()
        # Prefill first (as vLLM's scheduler does): a step that admits generations runs
        # them alone, so their first token waits for their own prefill only, not for the
        # running batch's decode too; the running generations lose no more time than if
        # the prefill had shared their step (prefills run in forwards of their own anyway).
        # Never twice in a row, so a stream of arrivals cannot starve the running batch.
        prefill_only = bool(joined) and not self._last_prefill_only and len(joined) < len(self._running)
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

    def _admit(self) -> list[Generation]:
        """Move waiting generations into the batch: up to max_batch, within the prefill budget.
        Returns those admitted. Holds the condition's lock."""
        now = self.clock()
        for g in [g for g in self._waiting if self._gone(g, now)]:
            self._waiting.remove(g)
        # Preempted generations go first (vLLM's rule): while one is waiting, no new request
        # takes the KV cache room it needs.
        preempted = any(g.parked_since is not None for g in self._waiting)
        budget = self.config.prefill_tokens
        joined: list[Generation] = []
        for g in list(self._waiting):
            if len(self._running) >= self.config.max_batch or (preempted and g.parked_since is None):
                break
            if g.not_before > now:
                continue  # backing off after a full KV cache
            if budget < len(g.ids) and budget < self.config.prefill_tokens:
                break  # this step's prefill budget is spent; the next step admits it
            else:
                budget -= len(g.ids)
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
        # A step that prefills says nothing about steady-state speed: not a controller sample.
        prefilling = any(not any(g.cached.values()) for g in live)
        for g in live:
            g.begin_step(cap)
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
        t.steps += 1
        t.rows += sum(g.rows_per_role() for g in stepped)
        tokens = sum(g.sink.usage.completion_tokens - before for g, before in stepped.items())
        t.tokens += tokens  # counted before delivery: a client that has its tokens sees them counted
        for g in stepped:  # after the step's span ends, so a client never sees a step unfinished
            self._deliver(g)
        self.metrics.batch_size.record(len(live))
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
        results = self._fan_out([lambda r=r: self.scorer.draft_batch(r, calls[r]) for r in roles])
        for r, outcomes in zip(roles, results):
            for g, o in zip(by_role[r], outcomes):
                if o.error is not None:
                    self._upstream_failed(g, o.error)
                else:
                    g.drafted(o.drafts, o.rows)
        return [g for g in live if g in self._running]

    def _score_phase(self, live: list[Generation]) -> dict[Generation, dict[str, torch.Tensor]]:
        """One ScoreBatch per role carrying every generation's share; role -> rows per generation."""
        calls: dict[str, list[tuple[Generation, Any]]] = {}
        for g in live:
            for c in g.score_calls():
                calls.setdefault(c.role, []).append((g, c))
        roles = list(calls)
        results: list[list[Outcome]] = self._fan_out(
            [lambda r=r: self.scorer.score_batch(r, [c for _, c in calls[r]]) for r in roles]
        )
        rows: dict[Generation, dict[str, torch.Tensor]] = {g: {} for g in live}
        for r, outcomes in zip(roles, results):
            for (g, _), o in zip(calls[r], outcomes):
                if o.error is not None:
                    self._upstream_failed(g, o.error)
                else:
                    rows[g][r] = o.rows
        for g in live:
            if g.k and g.req.speculation.draft_role in g.coef:
                rows[g][g.req.speculation.draft_role] = g.draft_rows
        return {g: rows[g] for g in live if g in self._running}

    def _combine(
        self, live: list[Generation], rows: dict[Generation, dict[str, torch.Tensor]]
    ) -> dict[Generation, int]:
        """Mix every generation's rows at once, process them per sampling group, and let each
        generation sample or verify. Returns the generations that stepped, with their token
        counts before the step."""
        gens = [g for g in live if g in rows]
        if not gens:
            return {}
        scores, offsets = mix_step(gens, rows, self.vocab_size, self._workspace)  # [n, vocab], unnormalised
        processed = process_groups(gens, {g: g.req.sampling for g in gens}, offsets, scores)
        # every row's argmax in one vectorised pass (greedy decoding and verification need nothing else)
        top = argmax_rows(scores) if any(p is None for p in processed.values()) else None  # [n]
        # x[i, argmax] is finite exactly when row i has no NaN, no +inf and some finite entry
        finite = None if top is None else torch.isfinite(scores.gather(1, top.view(-1, 1))).view(-1)  # [n]
        all_finite = finite is None or bool(finite.all())
        stepped = {}
        for g in gens:
            o, m = offsets[g], g.rows_per_role()
            before = g.sink.usage.completion_tokens
            try:
                if processed[g] is None and not all_finite and not bool(finite[o:o + m].all()):
                    check_argmax_finite(scores[o:o + m], top[o:o + m])  # raises NoFiniteMass, naming the rows
                g.finish(scores[o:o + m], processed[g], None if top is None else top[o:o + m])
            except NoFiniteMass as e:  # degenerate weights / settings: this request's fault alone
                self._fail(g, InvalidArgument(str(e)))
                continue
            except Exception as e:  # one generation's numeric trouble must not touch the others
                log.exception("generation failed while sampling")
                self._fail(g, e if isinstance(e, EftMeshError) else EftMeshError(f"sampling failed: {type(e).__name__}"))
                continue
            stepped[g] = before
            g.progressed()
        return stepped

    # --- leaving the batch ---------------------------------------------------------------------

    def _upstream_failed(self, g: Generation, err: EftMeshError) -> None:
        """A role refused this generation's item: a full KV cache preempts it (back to the queue,
        caches released, re-prefilled later); anything else fails it."""
        if g not in self._running:
            return
        if isinstance(err, ResourceExhausted):
            self._running.remove(g)
            self.scorer.release(g.sessions)
            g.park(self.clock())
            with self._cv:
                self._waiting.appendleft(g)
            return
        self._fail(g, err)

    def _deliver(self, g: Generation) -> None:
        g.out.put(g.sink.take())
        if g.sink.finish_reason is not None:
            self._leave(g)

    def _fail(self, g: Generation, err: BaseException) -> None:
        g.out.put(err)
        self._leave(g)

    def _leave(self, g: Generation) -> None:
        if g in self._running:
            self._running.remove(g)
        if g.touched:
            self.scorer.release(g.sessions)


class Decoder:
    """The combiner's decoding front: tokenises, checks, and streams a generation run by the
    shared `Scheduler`."""

    def __init__(
        self,
        scorer: Scorer,
        tokenizer: Any,
        vocab_size: int,
        config: SchedulerConfig = SchedulerConfig(),
        max_k: int = 16,
        tracer: trace.Tracer | None = None,
        metrics: CombinerMetrics | None = None,
        **scheduler: Any,
    ) -> None:
        """`scheduler`: Scheduler's keyword options (start=False, clock=... in tests)."""
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = tokenizer.eos_token_id
        # What ends a prompt's generation; a chat's adds its template's end-of-turn token(s).
        self._eos_ids = frozenset() if self.eos_token_id is None else frozenset([self.eos_token_id])
        self.chat = ChatTemplates(tokenizer)
        self.scheduler = Scheduler(scorer, vocab_size, config, max_k, tracer, metrics, **scheduler)

    def close(self) -> None:
        self.scheduler.close()

    def _render(self, req: GenerationRequest) -> tuple[str, frozenset[int]]:
        """A chat request's prompt text (its role's chat template) and end-of-turn ids."""
        role = req.chat_template_role
        template = self.scorer.models[role].chat_template
        if not template:
            have = [r for r in self.scorer.models if self.scorer.models[r].chat_template]
            raise FailedPrecondition(
                f"role {role!r} has no chat template (its logit service reports none): set chat_template_role to "
                f"a role with one ({', '.join(have) or 'none has'}), start that service with --chat-template, "
                "or send a prompt"
            )
        try:
            return self.chat.render(template, req.messages)
        except TemplateError as e:
            raise InvalidArgument(str(e)) from None

    def prepare(
        self,
        req: GenerationRequest,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Generation:
        """Tokenise (a chat through its role's template) and check a request: its Generation,
        ready for `scheduler.submit`."""
        coef_roles = [r for r, c in req.composition.coefficients().items() if c != 0.0] or [req.composition.base]
        roles = coef_roles + ([req.speculation.draft_role] if req.speculation else [])
        ctx = min(self.scorer.models[r].max_context for r in roles)
        if req.messages:
            text, stop_ids = self._render(req)
            ids, room = encode_prompt(self.tokenizer, text, ctx, chat=True)
        else:
            stop_ids = self._eos_ids
            ids, room = encode_prompt(self.tokenizer, req.prompt, ctx)
        return Generation(req, ids, room, self.tokenizer, stop_ids, deadline, is_cancelled)

    def generate(
        self,
        req: GenerationRequest,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
        on_finish: Callable[[TokenSink], None] | None = None,
    ) -> Iterator[Chunk]:
        """Yields a chunk per plain step or speculative block; the last one finishes."""
        g = self.prepare(req, deadline, is_cancelled)
        self.scheduler.submit(g)
        try:
            while True:
                try:
                    item = g.out.get(timeout=0.1)
                except queue.Empty:
                    if is_cancelled():
                        raise Cancelled("the client cancelled the generation") from None
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            g.cancelled = True  # the scheduler drops it (and releases its caches) if still running
            if on_finish is not None:
                on_finish(g.sink)
