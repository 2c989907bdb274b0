"""The combiner's decoding loop: one EFT step per token, scored by every role at once.

Each step (Mitchell et al. 2024, eq. 4, per-timestep normalisation):
  1. every role with a non-zero coefficient scores the newest token (concurrently, via the
     scorer; only tokens a role's cache lacks are sent),
  2. `core.mixing.mix` forms log p = sum_r c_r * log pi_r - log Z,
  3. `core.sampling` applies temperature, top-k, top-p and draws the token,
  4. `TokenSink` detokenises, checks stop strings, EOS, and the length limits.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from eftmesh.combiner.scoring import ScoreCall, Scorer
from eftmesh.combiner.text import IncrementalDetokenizer, StopStrings
from eftmesh.common.errors import Cancelled, InvalidArgument
from eftmesh.core.mixing import Composition, mix
from eftmesh.core.sampling import SamplingConfig, make_generator, process, sample


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CONTEXT = "context"


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


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


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

    def encode_prompt(self, req: GenerationRequest) -> tuple[list[int], int]:
        """Prompt ids and the room left for new tokens in the smallest context used."""
        ids = self.tokenizer.encode(req.prompt)
        if not ids:
            raise InvalidArgument("prompt tokenises to nothing: send some text")
        roles = req.composition.roles
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
        """Plain EFT decoding: yields one chunk per generated token."""
        ids, room = self.encode_prompt(req)
        usage = Usage(prompt_tokens=len(ids))
        sink = TokenSink(self.tokenizer, self.eos_token_id, req.stop, req.max_new_tokens, room, usage)
        coef = {r: c for r, c in req.composition.coefficients().items() if c != 0.0}
        if not coef:  # e.g. base X with delta (X - X), weight -1: nothing left to mix
            coef = {req.composition.base: 1.0}
        rid = uuid.uuid4().hex
        sessions = {r: f"{rid}:{r}" for r in coef}
        cached = dict.fromkeys(coef, 0)
        gen = make_generator(req.seed)
        try:
            while True:
                if is_cancelled():
                    raise Cancelled("the client cancelled the generation")
                calls = [ScoreCall(r, sessions[r], ids, cached[r], 1) for r in coef]
                rows = self.scorer.score(calls, deadline)
                for r in coef:
                    cached[r] = len(ids)
                lp = mix(dict(zip(coef, rows)), coef, self.vocab_size)  # [1, vocab]
                tok = int(sample(process(lp, req.sampling), req.sampling, gen)[0])
                ids.append(tok)
                done = sink.add(tok, float(lp[0, tok]) if req.logprobs else None)
                yield sink.take()
                if done:
                    break
        finally:
            self.scorer.release(sessions)
            if on_finish is not None:
                on_finish(sink)


def new_seed() -> int:
    """A random 63-bit seed for requests that set none."""
    return uuid.uuid4().int >> 65


def deadline_from(time_remaining: float | None) -> float | None:
    """Absolute monotonic deadline from gRPC's `context.time_remaining()`."""
    return None if time_remaining is None else time.monotonic() + time_remaining
