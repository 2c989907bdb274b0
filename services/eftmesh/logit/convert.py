"""LogitService protobuf <-> engine types (TGI's from_pb / to_pb shape): the servicer only
calls these and the engine. Validation rules live in the engine's and core's types; their
ValueError becomes INVALID_ARGUMENT in `common.convert.invalid_argument`, the one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from eftmesh.common import rowswire, tensors
from eftmesh.common.convert import invalid_argument, sampling_from_pb
from eftmesh.common.errors import InvalidArgument
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import DraftItem, EngineInfo, ItemResult, ScoreItem
from eftmesh.v1 import logit_pb2, tensor_pb2


def info_to_pb(info: EngineInfo, model_id: str, kv_bytes_per_token: float,
               kv_bytes_per_token_theoretical: float) -> logit_pb2.LogitServiceInfoResponse:
    return logit_pb2.LogitServiceInfoResponse(
        model_id=model_id,
        role=info.role,
        vocab_size=info.vocab_size,
        tokenizer_vocab_size=info.tokenizer_vocab_size,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        max_context=info.max_context,
        dtype=info.dtype,
        device=info.device,
        max_sessions=info.max_sessions,
        session_idle_timeout_s=info.session_idle_timeout_s,
        eos_token_id=info.eos_token_id,
        max_k=info.max_k,
        kv_cache_tokens=info.kv_cache_tokens,
        kv_block_size=info.kv_block_size,
        max_batch=info.max_batch,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_bytes_per_token_theoretical=kv_bytes_per_token_theoretical,
        chat_template=info.chat_template,
        execution=info.execution,
        cuda_graphs=info.cuda_graphs,
        graph_capture_s=info.graph_capture_s,
        prefix_cache=info.prefix_cache,
        compile_s=info.compile_s,
        graph_memory_bytes=info.graph_memory_bytes,
        model_impl=info.model_impl,
        kv_cache_dtype=info.kv_cache_dtype,
        batch_release=True,  # ScoreBatch and DraftBatch read `release` (servicer.py)
        release_many=True,  # Release reads `session_ids` (servicer.py)
    )


def dtype_from_pb(dtype: int) -> torch.dtype:
    """The wire dtype a Score caller asked for (unset: float32)."""
    with invalid_argument():
        return tensors.torch_dtype(dtype)


def sampling_or_default(msg: tensor_pb2.SamplingParams) -> SamplingConfig:
    """A Draft's sampling; unset fields mean plain sampling (the combiner always sends the
    request's values)."""
    return sampling_from_pb(msg, SamplingConfig())


def score_items_from_pb(items: Sequence[logit_pb2.ScoreItem]) -> list[ScoreItem]:
    return [ScoreItem(it.session_id, it.start, it.tokens, it.rows) for it in items]


def draft_items_from_pb(items: Sequence[logit_pb2.DraftItem]) -> tuple[list[DraftItem], list[int], dict[int, InvalidArgument]]:
    """The well-formed items, their indices in the request, and the malformed ones' errors (a
    malformed item fails alone, like any other item error)."""
    good, where, bad = [], [], {}
    for i, it in enumerate(items):
        try:
            sampling = sampling_or_default(it.sampling)
        except InvalidArgument as e:
            bad[i] = e
            continue
        good.append(DraftItem(it.session_id, it.start, it.tokens, it.k, sampling, it.seed, it.vocab_limit))
        where.append(i)
    return good, where, bad


def results_to_reply(results: Sequence[ItemResult], vocab: int, dtype: torch.dtype, response: Any) -> rowswire.RowsReply:
    """A batched answer (`response`: an empty ScoreBatchResponse or DraftBatchResponse, filled
    here) for gRPC to serialise with `rowswire.serialize`: per-item results, and every
    successful item's rows, in order, as one [rows, vocab] tensor in the model's dtype (0 rows
    when none succeeded) whose bytes are copied once, into the bytes sent: each item's pieces
    (`ItemResult.pieces`) are copied from where its forwards left them, never joined first."""
    add, parts, rows = response.results.add, [], 0
    for r in results:
        if r.error is not None:
            add(code=r.error.code.value[0], message=str(r.error))
        else:
            n = sum(p.shape[0] for p in r.pieces)
            add(rows=n, cache_length=r.cache_length, drafts=r.drafts, cached_tokens=r.cached_tokens,
                draft_probs=r.draft_probs, draft_cut_z=[z for z, _ in r.draft_cuts],
                draft_cut_mass=[m for _, m in r.draft_cuts])
            parts += [tensors.as_array(p.contiguous()) for p in r.pieces]  # (views: each piece is contiguous)
            rows += n
            dtype, vocab = r.pieces[0].dtype, r.pieces[0].shape[1]  # (the rows' own width)
    response.logits.dtype = tensors.wire_dtype(dtype)
    response.logits.shape[:] = [rows, vocab]
    return rowswire.RowsReply(response, parts)
