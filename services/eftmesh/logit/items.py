"""What a logit engine takes and gives: one session's share of a batched call, its result, and
the engine's description (what `LogitService.Info` reports). Plain data; the engine
(engine.py) does the work, the servicer converts these to and from protobuf (convert.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eftmesh.common.errors import EftMeshError
from eftmesh.core.sampling import SamplingConfig


@dataclass(frozen=True)
class ScoreItem:
    """One session's share of a batched Score: append `tokens` at `start`, return the last `rows` rows."""

    session_id: str
    start: int
    tokens: Sequence[int]
    rows: int


@dataclass(frozen=True)
class DraftItem:
    """One session's share of a batched Draft: append `tokens` at `start`, then draft k tokens."""

    session_id: str
    start: int
    tokens: Sequence[int]
    k: int
    sampling: SamplingConfig
    seed: int
    vocab_limit: int = 0


@dataclass
class ItemResult:
    """What one item got back: its rows, or its own error.

    The rows are kept as the forwards gave them (`pieces`: a DraftBatch item's k + 1 rows come
    from k + 1 forwards) and joined only when `rows` is read: a batched answer copies each piece
    straight into the bytes it sends (convert.results_to_reply), so its rows are never joined.
    At 128k entries and 16 drafting streams, the join was 40 MiB copied per step."""

    pieces: list[torch.Tensor] = field(default_factory=list)  # [n_i, vocab_size] each, model dtype, on the CPU
    cache_length: int = 0
    cached_tokens: int = 0  # of the tokens sent, how many the prefix cache held (not run)
    drafts: list[int] = field(default_factory=list)
    # sampled drafts: each one's probability under the processed row it was drawn from
    draft_probs: list[float] = field(default_factory=list)
    # and the top-p cut each was drawn within (threshold, kept mass: `fusedrows.nucleus_cut`),
    # where the compiled kernels cut the rows; else empty
    draft_cuts: list[tuple[float, float]] = field(default_factory=list)
    error: EftMeshError | None = None

    @property
    def rows(self) -> torch.Tensor | None:
        """[rows, vocab_size] logits in the model's dtype, on the CPU (the pieces joined, once)."""
        if len(self.pieces) > 1:
            self.pieces = [torch.cat(self.pieces)]
        return self.pieces[0] if self.pieces else None

    @rows.setter
    def rows(self, value: torch.Tensor | None) -> None:
        self.pieces = [] if value is None else [value]


@dataclass(frozen=True)
class EngineInfo:
    """What `LogitService.Info` reports."""

    model_id: str
    role: str
    vocab_size: int
    tokenizer_vocab_size: int
    tokenizer_fingerprint: str
    max_context: int
    dtype: str
    device: str
    max_sessions: int
    session_idle_timeout_s: float
    eos_token_id: int
    max_k: int
    kv_cache_tokens: int
    kv_block_size: int
    max_batch: int
    chat_template: str = ""
    # How steps run (ModelRunner.execution); with graphs, how many were captured, how long the
    # capture took and the device bytes it kept; with --torch-compile, how long the compile
    # took (set by warmup()).
    execution: str = "eager"
    cuda_graphs: int = 0
    graph_capture_s: float = 0.0
    prefix_cache: bool = False  # --prefix-cache: full KV blocks shared by prefix (prefix.py)
    compile_s: float = 0.0
    graph_memory_bytes: int = 0
    model_impl: str = "transformers"  # whose forward runs the model (--model-impl): "native" or "transformers"
    kv_cache_dtype: str = ""  # what the KV cache stores (--kv-cache-dtype): the model's dtype, or a float8 one
