"""The combiner's decoding loops: plain EFT steps and speculative EFT blocks.

Plain step (Mitchell et al. 2024, eq. 4, per-timestep normalisation):
  1. every role with a non-zero coefficient scores the newest token (concurrently, via the
     scorer; only tokens a role's cache lacks are sent),
  2. `core.mixing.mix` forms log p = sum_r c_r * log pi_r - log Z,
  3. `core.sampling` applies temperature, top-k, top-p and draws the token,
  4. `TokenSink` detokenises, checks stop strings, EOS, and the length limits.

Speculative block (the paper's section 4.3; `core.speculative` holds the rule):
  1. one Draft call: the draft role appends what its cache lacks and samples k tokens next
     to its model, returning them with their raw rows (k + 1 of them),
  2. one Score call per other role, concurrently, over the same k drafts (k + 1 rows),
  3. p = process(mix(rows)) for all k + 1 positions, q = process(draft rows),
  4. accept a prefix of the drafts plus one token; every cache rolls back to the accepted
     length through the next call's `start`.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eftmesh.combiner.scoring import DraftCall, ScoreCall, Scorer
from eftmesh.combiner.text import IncrementalDetokenizer, StopStrings
from eftmesh.common.errors import Cancelled, InvalidArgument
from eftmesh.core.mixing import Composition, mix
from eftmesh.core.sampling import SamplingConfig, make_generator, process, sample
from eftmesh.core.speculative import AdaptiveBlockSize, verify_greedy, verify_sampled


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CONTEXT = "context"


@dataclass(frozen=True)
class SpeculationConfig:
    """Draft-then-verify settings of one request.

    adaptive=False drafts `block_size` tokens per block; adaptive=True lets
    `AdaptiveBlockSize` choose up to `block_size`, with `cost_ratio` its c.
    """

    draft_role: str
    block_size: int
    adaptive: bool
    cost_ratio: float = 0.1


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, in domain types (servicers build it from protobuf)."""

    prompt: str
    composition: Composition
    sampling: SamplingConfig
    seed: int
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    speculation: SpeculationConfig | None = None
    ignore_eos: bool = False


@dataclass
class SpeculationStats:
    draft_role: str = ""
    drafted: int = 0
    accepted: int = 0
    blocks: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Calls (Score or Draft) the base role answered: one forward pass each.
    base_calls: int = 0
    speculation: SpeculationStats = field(default_factory=SpeculationStats)

    @property
    def base_calls_per_token(self) -> float:
        return self.base_calls / self.completion_tokens if self.completion_tokens else 0.0


@dataclass
class Chunk:
    """What one step adds to the stream; `finish_reason` and `usage` only on the last."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class TokenSink:
    """Turns sampled tokens into stream chunks and decides when generation ends.

    Keeps the streaming invariant: the chunks' text concatenates to the final text.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token_id: int | None,
        stops: tuple[str, ...],
        max_new_tokens: int,
        room: int,
        usage: Usage,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stops)
        self._eos = eos_token_id
        self._max_new = max_new_tokens
        self._room = room  # tokens that fit in the smallest context after the prompt
        self.usage = usage
        self.text = ""
        self._emitted = 0
        self._pending = Chunk()
        self.finish_reason: FinishReason | None = None

    def add(self, token: int, logprob: float | None) -> bool:
        """Record one generated token; True when generation must stop after it."""
        assert self.finish_reason is None, "token added after the generation finished"
        self.usage.completion_tokens += 1
        self._pending.token_ids.append(token)
        if logprob is not None:
            self._pending.logprobs.append(logprob)
        n = self.usage.completion_tokens
        if token == self._eos:
            self.finish_reason = FinishReason.EOS
        else:
            searched = len(self.text)
            self.text += self._detok.push(token)
            cut = self._stops.find(self.text, searched)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = FinishReason.STOP
            elif n >= self._max_new:
                self.finish_reason = FinishReason.LENGTH
            elif n >= self._room:
                self.finish_reason = FinishReason.CONTEXT
        if self.finish_reason in (FinishReason.EOS, FinishReason.LENGTH, FinishReason.CONTEXT):
            self.text += self._detok.flush()
            cut = self._stops.find(self.text, 0)
            if cut >= 0:  # the flushed bytes completed a stop string
                self.text, self.finish_reason = self.text[:cut], FinishReason.STOP
        return self.finish_reason is not None

    def take(self) -> Chunk:
        """The chunk accumulated since the last call."""
        end = len(self.text) if self.finish_reason else self._stops.safe_length(self.text)
        chunk, self._pending = self._pending, Chunk()
        chunk.text = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        if self.finish_reason is not None:
            chunk.finish_reason = self.finish_reason
            chunk.usage = self.usage
        return chunk


class Decoder:
    """Runs generations against a `Scorer` with one shared tokenizer."""

    def __init__(self, scorer: Scorer, tokenizer: Any, vocab_size: int) -> None:
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = tokenizer.eos_token_id

    def encode_prompt(self, req: GenerationRequest, roles: Sequence[str]) -> tuple[list[int], int]:
        """Prompt ids and the room left for new tokens in the smallest context of `roles`."""
        ids = self.tokenizer.encode(req.prompt)
        if not ids:
            raise InvalidArgument("prompt tokenises to nothing: send some text")
        ctx = min(self.scorer.models[r].max_context for r in roles)
        if len(ids) >= ctx:
            raise InvalidArgument(
                f"prompt is {len(ids)} tokens; the models of this composition accept at most "
                f"{ctx} in all (prompt plus output): shorten the prompt"
            )
        return ids, ctx - len(ids)

    def generate(
        self,
        req: GenerationRequest,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
        on_finish: Callable[[TokenSink], None] | None = None,
    ) -> Iterator[Chunk]:
        """Yields a chunk per plain step or speculative block; the last one finishes."""
        coef = {r: c for r, c in req.composition.coefficients().items() if c != 0.0}
        if not coef:  # e.g. base X with delta (X - X), weight -1: nothing left to mix
            coef = {req.composition.base: 1.0}
        spec = req.speculation
        roles = list(coef) + ([spec.draft_role] if spec and spec.draft_role not in coef else [])
        ids, room = self.encode_prompt(req, roles)
        usage = Usage(prompt_tokens=len(ids))
        eos = None if req.ignore_eos else self.eos_token_id
        sink = TokenSink(self.tokenizer, eos, req.stop, req.max_new_tokens, room, usage)
        rid = uuid.uuid4().hex
        run = _Run(
            req=req,
            ids=ids,
            coef=coef,
            sessions={r: f"{rid}:{r}" for r in roles},
            cached=dict.fromkeys(roles, 0),
            ctx=len(ids) + room,
            gen=make_generator(req.seed),
            sink=sink,
            deadline=deadline,
        )
        adaptive = AdaptiveBlockSize(spec.block_size, spec.cost_ratio) if spec and spec.adaptive else None
        if spec:
            usage.speculation.draft_role = spec.draft_role
        try:
            while True:
                if is_cancelled():
                    raise Cancelled("the client cancelled the generation")
                k = 0
                if spec:
                    left = min(req.max_new_tokens, room) - usage.completion_tokens
                    want = adaptive.k if adaptive else spec.block_size
                    # A block yields up to k + 1 tokens, and verifying k drafts needs k more
                    # positions in every model's context.
                    k = min(want, left - 1, run.ctx - len(ids))
                if k >= 1:
                    drafted, accepted = self._block(run, spec.draft_role, k)
                    if adaptive:
                        adaptive.update(accepted, drafted)
                else:
                    self._step(run)
                yield sink.take()
                if sink.finish_reason is not None:
                    break
        finally:
            self.scorer.release(run.sessions)
            if on_finish is not None:
                on_finish(sink)

    def _emit(self, run: _Run, tokens: list[int], lp: torch.Tensor) -> None:
        """Feed tokens (row j of lp is token j's EFT distribution) to the sink until it stops."""
        for j, tok in enumerate(tokens):
            run.ids.append(tok)
            if run.sink.add(tok, float(lp[j, tok]) if run.req.logprobs else None):
                return

    def _step(self, run: _Run) -> None:
        """One plain EFT step: every role scores the newest token."""
        n = len(run.ids)
        calls = [ScoreCall(r, run.sessions[r], run.ids, run.cached[r], 1) for r in run.coef]
        rows = self.scorer.score(calls, run.deadline)
        for r in run.coef:
            run.cached[r] = n
        run.sink.usage.base_calls += 1
        lp = mix(dict(zip(run.coef, rows)), run.coef, self.vocab_size)  # [1, vocab]
        tok = int(sample(process(lp, run.req.sampling), run.req.sampling, run.gen)[0])
        self._emit(run, [tok], lp)

    def _block(self, run: _Run, d: str, k: int) -> tuple[int, int]:
        """One speculative block of k drafts; returns (drafted, accepted)."""
        req, n, V = run.req, len(run.ids), self.vocab_size
        seed = int(torch.randint(0, 2**62, (1,), generator=run.gen))
        dr = self.scorer.draft(
            DraftCall(d, run.sessions[d], run.ids, run.cached[d], k, req.sampling, seed, V), run.deadline
        )
        drafts = dr.tokens  # k ids; dr.logprobs: [k + 1, vocab_d]
        seq = run.ids + drafts
        others = [r for r in run.coef if r != d]
        rows = self.scorer.score([ScoreCall(r, run.sessions[r], seq, run.cached[r], k + 1) for r in others], run.deadline)
        block = dict(zip(others, rows))  # role -> [k + 1, vocab_r]
        if d in run.coef:
            block[d] = dr.logprobs
        run.sink.usage.base_calls += 1
        lp = mix(block, run.coef, V)  # [k + 1, vocab]
        p = process(lp, req.sampling)  # [k + 1, vocab]
        x = torch.tensor(drafts, dtype=torch.int64)  # [k]
        if req.sampling.greedy:
            verdict = verify_greedy(x, p)
        else:
            q = process(dr.logprobs[:k, :V], req.sampling)  # [k, vocab]: what the drafts came from
            verdict = verify_sampled(x, q, p, run.gen)
        m = verdict.accepted
        # Every cache holds n + k tokens; the first n + m are right. The next call's start
        # rolls each back (the token after them, verdict.next_token, is not in any cache).
        for r in run.cached:
            run.cached[r] = n + m
        stats = run.sink.usage.speculation
        stats.drafted += k
        stats.accepted += m
        stats.blocks += 1
        self._emit(run, drafts[:m] + [verdict.next_token], lp)
        return k, m


@dataclass
class _Run:
    """The mutable state of one generation, shared by its steps and blocks."""

    req: GenerationRequest
    ids: list[int]  # prompt + generated tokens
    coef: dict[str, float]  # role -> EFT coefficient (non-zero)
    sessions: dict[str, str]  # role -> session id at its logit service
    cached: dict[str, int]  # role -> tokens of `ids` its cache is known to hold
    ctx: int  # smallest max context of the roles used
    gen: torch.Generator
    sink: TokenSink
    deadline: float | None


def new_seed() -> int:
    """A random 63-bit seed for requests that set none."""
    return uuid.uuid4().int >> 65


def deadline_from(time_remaining: float | None) -> float | None:
    """Absolute monotonic deadline from gRPC's `context.time_remaining()`."""
    return None if time_remaining is None else time.monotonic() + time_remaining
