"""The combiner's scheduler over in-process logit engines: no network, no second process.

`LocalScorer` implements the combiner's `Scorer` protocol over `ModelEngine`s, so the
benchmarks (`make bench`'s in-process EFT) and the tests run the very same scheduler with and
without gRPC. It lives outside both services, because the combiner never imports the logit
service (tests/test_layering.py holds that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from eftmesh.combiner.scoring import DraftCall, ModelSpec, Outcome, ScoreCall, with_resend
from eftmesh.logit.engine import DraftItem, ModelEngine, ScoreItem


class LocalScorer:
    """In-process scorer over `ModelEngine`s: the same scheduler, no network. The engines'
    rows come floored, as over the network (their runner floors every row)."""

    def __init__(self, engines: Mapping[str, ModelEngine]) -> None:
        self.engines = dict(engines)
        self.models = {role: ModelSpec.from_info(role, "in-process", e.info) for role, e in self.engines.items()}

    def score_batch(self, role: str, calls: Sequence[ScoreCall], partial: bool = False) -> list[Outcome]:
        def send(cs: Sequence[ScoreCall], from_zero: bool) -> list[Outcome]:
            items = [ScoreItem(c.session_id, 0 if from_zero else c.start, c.tokens[0 if from_zero else c.start:], c.rows)
                     for c in cs]
            return [Outcome(r.rows, r.drafts, r.error, cached_tokens=r.cached_tokens) for r in self.engines[role].score_batch(items)]

        return with_resend(calls, send)

    def draft_batch(self, role: str, calls: Sequence[DraftCall], partial: bool = False) -> list[Outcome]:
        def send(cs: Sequence[DraftCall], from_zero: bool) -> list[Outcome]:
            items = [DraftItem(c.session_id, 0 if from_zero else c.start, c.tokens[0 if from_zero else c.start:], c.k,
                               c.sampling, c.seed, c.vocab_limit) for c in cs]
            return [Outcome(r.rows, r.drafts, r.error, cached_tokens=r.cached_tokens, draft_probs=r.draft_probs,
                            draft_cuts=r.draft_cuts)
                    for r in self.engines[role].draft_batch(items)]

        return with_resend(calls, send)

    def release(self, sessions: Mapping[str, str]) -> None:
        for role, sid in sessions.items():
            self.engines[role].release(sid)

    def flush_releases(self) -> None:  # (every release is done at once here)
        pass
