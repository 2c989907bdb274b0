"""The combiner's view of the logit services: one batched call per role per step.

`Scorer` is what the scheduler needs; `GrpcScorer` (in `upstream.py`) implements it over the
network (ScoreBatch / DraftBatch) and `eftmesh.inprocess.LocalScorer` over in-process engines,
so the benchmark and the tests run the very same scheduler with and without the network. The
combiner never imports the logit service: the in-process scorer lives outside both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from eftmesh.common.errors import EftMeshError, FailedPrecondition, NotFound
from eftmesh.core.sampling import SamplingConfig

C = TypeVar("C", "ScoreCall", "DraftCall")


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


@dataclass
class Outcome:
    """One call's answer in a batched round: its rows, or its own error."""

    # [rows, vocab_r] logits (any per-row shift), the model's dtype, floored (core.mixing.floor_rows_)
    rows: torch.Tensor | None = None
    drafts: list[int] = field(default_factory=list)  # DraftCall only: the k drafts
    error: EftMeshError | None = None
    # A straggler: its replica has not answered yet and the step goes on without it. The call
    # keeps running (and may be given up on and moved); `pending` is done when it has ended.
    # The generation sits this step out and redoes it then. (GrpcScorer only.)
    pending: Future[Any] | None = None
    # Of the tokens the call sent, how many the logit service's prefix cache held (ItemResult.cached_tokens)
    cached_tokens: int = 0
    # DraftCall only, sampled drafts: each draft's q(x) (ItemResult.draft_probs); empty: not sent
    draft_probs: list[float] = field(default_factory=list)
    # ... and the top-p cut of its row (threshold, kept mass: ItemResult.draft_cut_z, draft_cut_mass)
    draft_cuts: list[tuple[float, float]] = field(default_factory=list)


class BlockCap:
    """The combiner's largest speculative block (k): its --max-k, lowered to the smallest
    --max-k a logit service reports as each role first answers (any role may draft, and a block
    larger than its Draft takes would fail there). One value, made once and shared by whoever
    needs it: request validation and Info (the servicer), the speculation controller's arms, and
    the verification of new replicas (the monitor)."""

    def __init__(self, configured: int) -> None:
        self.configured = configured
        self._value = configured

    @property
    def value(self) -> int:
        return self._value

    def lower_to(self, limit: int) -> bool:
        """Lower the cap to `limit` (never raise it); True if it changed."""
        if limit >= self._value:
            return False
        self._value = limit
        return True


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
    max_k: int = 0  # the largest k its Draft takes; 0: not said
    chat_template: str = ""  # its tokenizer's Jinja chat template; empty: none
    prefix_cache: bool = False  # it shares cached KV blocks between sessions (--prefix-cache)

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
            max_k=int(getattr(info, "max_k", 0) or 0),
            chat_template=str(getattr(info, "chat_template", "") or ""),
            prefix_cache=bool(getattr(info, "prefix_cache", False)),
        )


class Scorer(Protocol):
    """One batched call per role per step: every generation's share of a step in one request."""

    models: Mapping[str, ModelSpec]

    def score_batch(self, role: str, calls: Sequence[ScoreCall], partial: bool = False) -> list[Outcome]:
        """Score every call (all of `role`); a call whose cache is gone is re-sent from 0.
        `partial`: the step has generations these calls do not carry, which can go on without
        a straggling replica's answer (see `Outcome.pending`)."""
        ...

    def draft_batch(self, role: str, calls: Sequence[DraftCall], partial: bool = False) -> list[Outcome]:
        """Draft for every call (all of `role`); a call whose cache is gone is re-sent from 0.
        `partial` as in `score_batch`."""
        ...

    def release(self, sessions: Mapping[str, str]) -> None:
        """Drop role -> session_id caches; best effort, never raises. May wait for a later call
        to the same replica (`flush_releases`)."""
        ...

    def flush_releases(self) -> None:
        """Send now the releases kept for a later call: the batch emptied, none may come."""
        ...


def with_resend(
    calls: Sequence[C], send: Callable[[Sequence[C], bool], list[Outcome]]
) -> list[Outcome]:
    """`send(calls, from_zero)`, then once more from position 0 for the calls whose session
    was NOT_FOUND (evicted, expired, or a restarted replica): caches are only caches."""
    out = send(calls, False)
    lost = [i for i, o in enumerate(out) if isinstance(o.error, NotFound)]
    if lost:
        for i, o in zip(lost, send([calls[i] for i in lost], True)):
            out[i] = o
    return out


def check_compatible(models: Mapping[str, ModelSpec], fingerprint: str, vocab_size: int,
                     eos_token_id: int | None = None, tokenizer: str = "the combiner's --tokenizer") -> None:
    """Refuse to mix models whose tokenizers differ or whose vocabularies cannot be aligned.

    Output layers may be wider than the tokenizer (padding rows, dropped before mixing);
    narrower ones, or a different token-to-id map, are a real mismatch. A refusal names each
    role that differs, its model, both fingerprints, and what its Info shows to differ
    (tokenizer size, EOS id); when neither does, the token-to-id map, the added or special
    tokens or the BOS id differ (or the service runs an eftmesh version that fingerprints
    tokenizers otherwise).
    """
    differ = {r: m for r, m in models.items() if m.tokenizer_fingerprint != fingerprint}
    if differ:
        lines = []
        for r, m in differ.items():
            what = []
            if m.tokenizer_vocab_size != vocab_size:
                what.append(f"{m.tokenizer_vocab_size} tokens vs {vocab_size}")
            if eos_token_id is not None and m.eos_token_id != eos_token_id:
                what.append(f"EOS id {m.eos_token_id} vs {eos_token_id}")
            if not what:
                what.append("same size and EOS id, so the token-to-id map, the added or special tokens or the "
                            "BOS id differ (or it runs an eftmesh version that fingerprints tokenizers otherwise)")
            lines.append(f"{r} ({m.model_id}): tokenizer {m.tokenizer_fingerprint}, " + ", ".join(what))
        raise FailedPrecondition(
            f"every model must share the tokenizer of {tokenizer} (fingerprint {fingerprint}); "
            "these differ: " + "; ".join(lines)
        )
    narrow = {r: m for r, m in models.items() if m.vocab_size < vocab_size}
    if narrow:
        lines = [f"{r} ({m.model_id}): {m.vocab_size} rows" for r, m in narrow.items()]
        raise FailedPrecondition(
            f"output layers must cover the tokenizer's {vocab_size} tokens; these are narrower: " + "; ".join(lines)
        )


def replica_mismatch(want: ModelSpec, spec: ModelSpec, k_cap: int | None) -> str | None:
    """Why a replica reporting `spec` cannot serve a role whose first replica reported `want`
    (None: it can). `k_cap`: the combiner's block cap, which the replica's --max-k must reach
    (None: not checked)."""
    if (spec.tokenizer_fingerprint, spec.vocab_size) != (want.tokenizer_fingerprint, want.vocab_size):
        return (f"serves {spec.model_id} (tokenizer {spec.tokenizer_fingerprint}, {spec.vocab_size} rows), unlike "
                f"the role's {want.model_id} ({want.tokenizer_fingerprint}, {want.vocab_size})")
    # Replicas of a role must render chats alike: the combiner renders with the template the
    # role's first replica reported, and a replica with another would have been meant to serve
    # another format (a rolling update of the template is a new role, or all at once).
    if spec.chat_template != want.chat_template:
        return "reports another chat template than the role's ({})".format(
            "none" if not spec.chat_template else f"{len(spec.chat_template)} characters")
    # A replica whose Draft takes fewer tokens than the blocks the combiner asks for would fail
    # every draft it is given with INVALID_ARGUMENT.
    if k_cap is not None and 0 < spec.max_k < k_cap:
        return (f"takes drafts of at most {spec.max_k} tokens (--max-k), less than the combiner's "
                f"block cap of {k_cap}")
    return None
