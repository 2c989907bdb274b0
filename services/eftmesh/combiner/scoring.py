"""The combiner's view of the logit services: score calls fanned out to roles.

`Scorer` is what the decoding loop needs; `GrpcScorer` (in `upstream.py`) implements it over
the network and `LocalScorer` (here) over in-process engines, so the benchmark and the tests
run the very same loop with and without the network.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from eftmesh.common.errors import DeadlineExceeded, NotFound
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import ModelEngine


@dataclass(frozen=True)
class ScoreCall:
    """One role's share of a step: bring the session up to `tokens` and score the last rows.

    `start` is how many of `tokens` the caller believes the session's cache holds; only
    `tokens[start:]` is sent. If the cache is gone, the scorer re-sends from 0.
    """

    role: str
    session_id: str
    tokens: Sequence[int]
    start: int
    rows: int


@dataclass(frozen=True)
class DraftCall:
    """The draft role's share of a speculative block: catch up to `tokens`, draft k more."""

    role: str
    session_id: str
    tokens: Sequence[int]
    start: int
    k: int
    sampling: SamplingConfig
    seed: int
    vocab_limit: int


@dataclass(frozen=True)
class DraftResult:
    tokens: list[int]  # the k drafts
    logprobs: torch.Tensor  # [k + 1, vocab_r] float32 raw log-probs


@dataclass(frozen=True)
class ModelSpec:
    """What the combiner needs to know of one role's model."""

    role: str
    address: str
    model_id: str
    vocab_size: int
    tokenizer_vocab_size: int
    tokenizer_fingerprint: str
    max_context: int
    dtype: str
    device: str
    eos_token_id: int

    @classmethod
    def from_info(cls, role: str, address: str, info: Any) -> ModelSpec:
        """From a LogitService Info response or an `EngineInfo` (they share field names)."""
        return cls(
            role=role,
            address=address,
            **{f: getattr(info, f) for f in (
                "model_id", "vocab_size", "tokenizer_vocab_size", "tokenizer_fingerprint",
                "max_context", "dtype", "device", "eos_token_id",
            )},
        )


class Scorer(Protocol):
    """Scores several roles for one decoding step, concurrently where it can."""

    models: Mapping[str, ModelSpec]

    def score(self, calls: Sequence[ScoreCall], deadline: float | None) -> list[torch.Tensor]:
        """[rows, vocab_r] float32 log-probs per call, in order. `deadline` is monotonic time."""
        ...

    def draft(self, call: DraftCall, deadline: float | None) -> DraftResult:
        """Run one Draft call (re-sending the whole prefix if the cache is gone)."""
        ...

    def release(self, sessions: Mapping[str, str]) -> None:
        """Drop role -> session_id caches; best effort, never raises."""
        ...


class LocalScorer:
    """In-process scorer over `ModelEngine`s: the same loop, no network, one call at a time."""

    def __init__(self, engines: Mapping[str, ModelEngine]) -> None:
        self.engines = dict(engines)
        self.models = {role: ModelSpec.from_info(role, "in-process", e.info) for role, e in self.engines.items()}

    def score(self, calls: Sequence[ScoreCall], deadline: float | None) -> list[torch.Tensor]:
        out = []
        for c in calls:
            engine = self.engines[c.role]
            try:
                lp, _ = engine.score(c.session_id, c.start, c.tokens[c.start :], c.rows)
            except NotFound:
                lp, _ = engine.score(c.session_id, 0, c.tokens, c.rows)
            out.append(lp)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("deadline passed while scoring")
        return out

    def draft(self, call: DraftCall, deadline: float | None) -> DraftResult:
        engine, c = self.engines[call.role], call
        try:
            toks, rows, _ = engine.draft(c.session_id, c.start, c.tokens[c.start :], c.k, c.sampling, c.seed, c.vocab_limit)
        except NotFound:
            toks, rows, _ = engine.draft(c.session_id, 0, c.tokens, c.k, c.sampling, c.seed, c.vocab_limit)
        return DraftResult(toks, rows)

    def release(self, sessions: Mapping[str, str]) -> None:
        for role, sid in sessions.items():
            self.engines[role].release(sid)
