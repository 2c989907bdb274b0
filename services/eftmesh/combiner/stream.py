"""What a generation streams: its chunks, its usage, and the sink that turns sampled tokens
into chunks and decides when generation ends (EOS, stop strings, length, context).

The invariant: the chunks' text concatenates to the final text (text.py holds the incremental
detokeniser and the stop-string search). No threads, no network.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from eftmesh.combiner.text import IncrementalDetokenizer, StopStrings


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CONTEXT = "context"


@dataclass
class SpeculationStats:
    draft_role: str = ""
    drafted: int = 0
    accepted: int = 0
    blocks: int = 0
    # blocks by drafts made (index k) and by drafts kept (index m): two counts a block, the
    # per-position figures derived from them when asked (once, as a generation ends)
    _of_k: list[int] = field(default_factory=list)
    _of_m: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def record(self, k: int, m: int) -> None:
        """A block of k drafts that kept the first m."""
        self.drafted, self.accepted, self.blocks = self.drafted + k, self.accepted + m, self.blocks + 1
        if k >= len(self._of_k):
            grow = [0] * (k + 1 - len(self._of_k))
            self._of_k, self._of_m = self._of_k + grow, self._of_m + grow
        self._of_k[k] += 1
        self._of_m[m] += 1

    @property
    def first_kept(self) -> int:
        """Blocks that kept their first draft."""
        return self.blocks - (self._of_m[0] if self._of_m else 0)

    @property
    def drafted_at(self) -> list[int]:
        """Per draft position j (index j - 1): blocks that drafted a j-th token."""
        return list(itertools.accumulate(reversed(self._of_k[1:])))[::-1]

    @property
    def accepted_at(self) -> list[int]:
        """Per draft position j (index j - 1): blocks that kept their j-th draft."""
        return list(itertools.accumulate(reversed(self._of_m[1:])))[::-1]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens the logit services' prefix caches held at the generation's first step: the
    # least over its roles (Generation.prefilled), since the step waits for the slowest prefill.
    cached_prompt_tokens: int = 0
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
    # with top_logprobs: per token, its position's most likely (token id, log-prob), best first
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class TokenSink:
    """Turns sampled tokens into stream chunks and decides when generation ends.

    Keeps the streaming invariant: the chunks' text concatenates to the final text.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop_ids: Collection[int],
        stops: tuple[str, ...],
        max_new_tokens: int,
        room: int,
        usage: Usage,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stops)
        self._stop_ids = frozenset(stop_ids)  # EOS, and a chat's end-of-turn token(s)
        self._max_new = max_new_tokens
        self._room = room  # tokens that fit in the smallest context after the prompt
        self.usage = usage
        self.text = ""
        self._emitted = 0
        self._pending = Chunk()
        self.finish_reason: FinishReason | None = None

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None = None) -> bool:
        """Record one generated token; True when generation must stop after it."""
        assert self.finish_reason is None, "token added after the generation finished"
        self.usage.completion_tokens += 1
        self._pending.token_ids.append(token)
        if logprob is not None:
            self._pending.logprobs.append(logprob)
        if top is not None:
            self._pending.top_logprobs.append(top)
        n = self.usage.completion_tokens
        if token in self._stop_ids:
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

    @property
    def pending_tokens(self) -> int:
        """Tokens added since the last `take`."""
        return len(self._pending.token_ids)

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
