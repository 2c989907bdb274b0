"""A fake `Scorer` for scheduler tests: real in-process engines answer (the real `LocalScorer`
underneath), every batched call is recorded as it was sent, and a test can refuse any item."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from eftmesh.combiner.scoring import DraftCall, Outcome, ScoreCall
from eftmesh.common.errors import EftMeshError
from eftmesh.inprocess import LocalScorer
from eftmesh.logit.engine import ModelEngine


class RecordingScorer:
    """Answers at once; `calls` holds (kind, role, calls) per batched call; an item is refused
    when `refuse(role, call)` returns an error."""

    def __init__(self, engines: dict[str, ModelEngine]) -> None:
        self.inner = LocalScorer(engines)
        self.models = self.inner.models
        self.calls: list[tuple[str, str, list[Any]]] = []  # (kind, role, calls)
        self.partial: list[tuple[str, str, bool]] = []  # (kind, role, partial) per batched call
        self.released: list[tuple[int, list[str]]] = []  # (batched calls made before, roles) per release
        self.flushed: list[int] = []  # batched calls made before each flush_releases
        self.refuse: Callable[[str, ScoreCall | DraftCall], EftMeshError | None] = lambda role, call: None

    def _batch(self, kind: str, role: str, calls: Sequence[Any], inner: Callable[..., list[Outcome]]) -> list[Outcome]:
        # tokens are the generation's live list: keep what this call carried
        self.calls.append((kind, role, [dataclasses.replace(c, tokens=tuple(c.tokens)) for c in calls]))
        errors = [self.refuse(role, c) for c in calls]
        ok = [c for c, e in zip(calls, errors) if e is None]
        got = iter(inner(role, ok) if ok else [])
        return [Outcome(error=e) if e is not None else next(got) for e in errors]

    def score_batch(self, role: str, calls: Sequence[ScoreCall], partial: bool = False) -> list[Outcome]:
        self.partial.append(("score", role, partial))
        return self._batch("score", role, calls, self.inner.score_batch)

    def draft_batch(self, role: str, calls: Sequence[DraftCall], partial: bool = False) -> list[Outcome]:
        self.partial.append(("draft", role, partial))
        return self._batch("draft", role, calls, self.inner.draft_batch)

    def release(self, sessions: Any) -> None:
        self.released.append((len(self.calls), sorted(sessions)))
        self.inner.release(sessions)

    def flush_releases(self) -> None:
        self.flushed.append(len(self.calls))
        self.inner.flush_releases()

    def steps(self, role: str = "base-large") -> list[list[ScoreCall]]:
        """Each step's ScoreBatch items for `role` (every composition here scores base-large)."""
        return [calls for kind, r, calls in self.calls if kind == "score" and r == role]
