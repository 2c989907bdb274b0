"""A hosted causal LM that scores batches of sessions against a paged KV cache.

No gRPC here: the servicer converts messages at the edge and calls `ModelEngine`.

Every call is a batch of items, one per session (TGI's shard, vLLM's engine core): the engine
admits them (admission.py: sessions, rollback, KV blocks), groups them into forwards, and the
runner (runner.py) runs each forward: eagerly, or static-shaped and replayed from a captured
CUDA graph. Items sorted by length share a forward while the padding that costs is worth less
than a forward's fixed cost (both measured at warm-up), so decode steps run together,
verifies of similar k together, and a prefill does not pad forty decode rows to its length.
Each item's rows come back as the model's own logits in its own dtype, floored
(`core.mixing.floor_rows_`: no entry more than 1e4 below its row's maximum, which changes no
probability): mixing and sampling downstream are invariant to a per-row constant, so this
loses nothing against the model's output and spares a log-softmax here. A bad item fails alone; the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eftmesh.common.errors import EftMeshError, InvalidArgument, ResourceExhausted
from eftmesh.common.tokenizer import fingerprint
from eftmesh.core.sampling import SamplingConfig, argmax_finite, make_generator, per_row_uniforms, sample_with_probs
from eftmesh.logit.admission import Admitted, KVAdmission, Want, check_session_id
from eftmesh.logit.kvcache import PagedKVPool, kv_storage_dtype
from eftmesh.logit.kvsize import kv_cache_tokens
from eftmesh.logit.placement import check_full_attention, load_model, mask_swapper, model_devices, model_max_context
from eftmesh.logit.items import DraftItem, EngineInfo, ItemResult, ScoreItem
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.runner import ModelRunner, StepBatch
from eftmesh.logit.sessions import SessionStore

log = logging.getLogger(__name__)
# Padding tokens one forward's fixed cost is worth before warm-up measures it.
DEFAULT_MERGE_TOKENS = 16


class EngineFault(EftMeshError):
    """The model failed on a batch (a server fault, not the caller's): INTERNAL."""


@dataclass(frozen=True)
class EngineConfig:
    """Limits and execution settings of one engine, built once from the flags (server.py)."""

    max_sessions: int = 256  # --max-sessions
    session_idle_timeout_s: float = 300.0  # --session-idle-timeout
    max_context: int | None = None  # --max-context (None: the model's own)
    max_k: int = 32  # --max-k: the largest Draft
    max_batch: int = 64  # --max-batch: most items in one forward
    kv_cache_tokens: int = 16384  # --kv-cache-tokens
    kv_cache_memory: int | None = None  # --kv-cache-memory, bytes: sizes the cache in tokens instead (kvsize.py)
    gpu_memory_utilization: float | None = None  # --gpu-memory-utilization: or by a share of the card (kvsize.py)
    kv_block_size: int = 16  # --kv-block-size
    prefill_tokens: int = 2048  # --prefill-tokens: most padded tokens in one forward
    session_active_s: float = 1.0  # --session-active-window
    prefix_cache: bool = True  # --prefix-cache / --no-prefix-cache
    graphs: GraphConfig = GraphConfig()  # --cuda-graphs, --cuda-graph-*
    model_impl: str = "auto"  # --model-impl: eftmesh's own forward (native.py) or transformers'
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype: the model's dtype, or fp8 (kvcache.KV_DTYPES)


def tokenizer_chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template ("" when it has none; of several named ones, "default")."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) else ""


class ModelEngine:
    """One model, its tokenizer identity, its sessions and their paged KV cache.

    Calls run one at a time under `self._lock` (which also guards sessions and the pool): a
    model on one device gains nothing from interleaving, and a caller batches its sessions
    into one call instead.
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str, role: str,
                 config: EngineConfig | None = None, **overrides: Any) -> None:
        """`overrides` replace fields of `config` (e.g. kv_cache_tokens=256 in a test)."""
        cfg = self.config = dataclasses.replace(config or EngineConfig(), **overrides)
        self.model = model.eval()
        check_full_attention(model.config)
        self.max_k = cfg.max_k
        self.max_batch = max(1, cfg.max_batch)
        self.prefill_tokens = max(1, cfg.prefill_tokens)
        # A model sharded over several devices (a device map) takes its inputs on the embedding's
        # device; `self.device` is that one, `self.devices` all of them in layer order.
        self.devices = model_devices(model)
        if torch.device("meta") in self.devices:
            raise ValueError("some weights are offloaded (on the meta device): eftmesh serves models whose "
                             "weights all live on GPUs or all on the CPU; raise --max-memory or add GPUs")
        self.device = model.get_input_embeddings().weight.device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        ctx = model_max_context(model.config)
        self.max_context = min(ctx, cfg.max_context) if cfg.max_context else ctx
        kv_dtype = kv_storage_dtype(cfg.kv_cache_dtype, self.dtype)
        tokens = kv_cache_tokens(model, cfg, dtype=kv_dtype, devices=self.devices, max_context=self.max_context,
                                 role=role)
        self.pool = PagedKVPool(tokens, cfg.kv_block_size, model.config.num_hidden_layers, self.device,
                                kv_dtype, prefix_cache=cfg.prefix_cache)
        # One session can never hold more than the whole pool: that is its context limit too, so
        # callers see it in Info and stop (finish reason CONTEXT) instead of failing.
        self.max_context = min(self.max_context, self.pool.capacity_tokens)
        self.runner = ModelRunner(model, self.pool, max_context=self.max_context, graphs=cfg.graphs,
                                  sharded=len(self.devices) > 1, floor_limit=min(len(tokenizer), self.vocab_size),
                                  model_impl=cfg.model_impl)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.info = EngineInfo(
            model_id=model_id,
            role=role,
            vocab_size=self.vocab_size,
            tokenizer_vocab_size=len(tokenizer),
            tokenizer_fingerprint=fingerprint(tokenizer),
            max_context=self.max_context,
            dtype=str(self.dtype).removeprefix("torch."),
            device=",".join(str(d) for d in self.devices),
            max_sessions=cfg.max_sessions,
            session_idle_timeout_s=cfg.session_idle_timeout_s,
            eos_token_id=-1 if eos is None else int(eos),
            max_k=cfg.max_k,
            kv_cache_tokens=self.pool.capacity_tokens,
            kv_block_size=cfg.kv_block_size,
            max_batch=self.max_batch,
            chat_template=tokenizer_chat_template(tokenizer),  # --chat-template replaces it (logit.server.build)
            execution=self.runner.execution,
            model_impl=self.runner.model_impl,
            kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
            prefix_cache=cfg.prefix_cache,
        )
        self.sessions = SessionStore(cfg.max_sessions, cfg.session_idle_timeout_s,
                                     on_drop=lambda s: self.pool.free(s.table), active_s=cfg.session_active_s)
        self.admission = KVAdmission(self.pool, self.sessions, vocab_size=self.vocab_size,
                                     max_context=self.max_context, role=role)
        self._lock = threading.Lock()
        # How many padded tokens cost as much as one more forward (its fixed, per-layer cost):
        # items whose padding wastes less than this share a forward. Measured by warmup().
        self.merge_tokens = DEFAULT_MERGE_TOKENS
        if len(self.devices) > 1:
            self._follow_mask()

    def _follow_mask(self) -> None:
        """On a sharded model, give each placed module the batch's mask on its own device, copied
        once per device per forward (BatchView.mask_on), instead of one copy per layer by
        accelerate's hooks. Runs before those hooks, which then find it in place."""
        for name in getattr(self.model, "hf_device_map", None) or {}:
            module = self.model.get_submodule(name)
            weight = next(module.parameters(), None)
            if weight is not None:
                module.register_forward_pre_hook(mask_swapper(weight.device), with_kwargs=True)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        role: str,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[int | str, str] | None = None,
        revision: str | None = None,
        tokenizer: str | None = None,
        tokenizer_revision: str | None = None,
        config: EngineConfig | None = None,
        **kwargs: Any,
    ) -> ModelEngine:
        """An engine over `placement.load_model(model_id, ...)` (checkpoint folder, .gguf file or
        hub id; weights straight onto their devices); `config` and keyword overrides as in
        `ModelEngine`."""
        model, tok, model_id = load_model(model_id, role=role, device=device, dtype=dtype,
                                          trust_remote_code=trust_remote_code, device_map=device_map,
                                          max_memory=max_memory, revision=revision, tokenizer=tokenizer,
                                          tokenizer_revision=tokenizer_revision)
        return cls(model, tok, model_id=model_id, role=role, config=config, **kwargs)

    def warmup(self) -> None:
        """Real forwards through the paged cache: readiness means the device answers and the KV
        pool is allocated, not just that the weights loaded. Their timings give the forward's
        fixed cost against its cost per token, which decides how items share forwards. Then,
        with --torch-compile, the static forward is compiled, and on CUDA every static bucket is
        captured as a CUDA graph (each logged, with its time, and reported in Info)."""
        sid = "\x00warmup"
        n = max(2, min(32, self.max_context // 2))
        # Each timed prefill must run all its tokens: no prefix cache (nor its entries) meanwhile.
        self.pool.set_prefix_cache(False)
        try:
            self._timed(sid, 1)  # first touch: allocation, lazy initialisation
            one = min(self._timed(sid, 1) for _ in range(3))
            many = min(self._timed(sid, n) for _ in range(3))
        finally:
            self.release(sid)
            self.pool.set_prefix_cache(self.config.prefix_cache)
        per_token = max(many - one, 0.0) / (n - 1)
        fixed = max(one - per_token, 0.0)
        self.merge_tokens = int(min(fixed / per_token, self.prefill_tokens)) if per_token > 0 else self.prefill_tokens
        log.info("%s: forward fixed cost %.2f ms, %.3f ms per token: padding up to %d tokens shares a forward",
                 self.info.role, fixed * 1e3, per_token * 1e3, self.merge_tokens)
        with self._lock:
            self.runner.compile_static()
            self.runner.capture()
        r = self.runner
        self.info = dataclasses.replace(self.info, execution=r.execution, cuda_graphs=len(r.graphs),
                                        graph_capture_s=round(r.capture_s, 3) if r.graphs else 0.0,
                                        graph_memory_bytes=r.graph_memory if r.graphs else 0,
                                        compile_s=round(r.compile_s, 3) if r.compile else 0.0)

    def _timed(self, sid: str, n: int) -> float:
        """Seconds of one prefill of n tokens (a fresh session each time)."""
        self.release(sid)
        started = time.perf_counter()
        result = self.score_batch([ScoreItem(sid, 0, [0] * n, 1)])[0]
        if result.error is not None:
            raise result.error
        for d in self.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)
        return time.perf_counter() - started

    def start_draining(self, replica: str = "") -> None:
        """Create no new session from now on: an item that would (start 0, unknown id) fails
        UNAVAILABLE with a message starting with DRAINING_PREFIX, naming `replica`. Sessions
        held go on being served until released, evicted or expired. For good."""
        with self._lock:
            self.admission.draining = replica or self.info.role

    @property
    def draining(self) -> str | None:
        """The replica's name once start_draining() was called, else None."""
        return self.admission.draining

    @property
    def live_sessions(self) -> int:
        """Sessions held now (idle ones past the timeout are dropped first)."""
        with self._lock:
            self.sessions.expire()
            return len(self.sessions)

    @property
    def kv_tokens_used(self) -> int:
        """Tokens the pool's allocated blocks can hold (what sessions occupy, rounded up to blocks)."""
        return self.pool.used_blocks * self.pool.block_size

    def prefix_cache(self, name: str) -> int:
        """A prefix cache figure for the metrics: `blocks` (registered full blocks) or a counter
        of prefix.PrefixCache (lookups, queried_tokens, hit_tokens, evictions); 0 when off."""
        p = self.pool.prefix
        if p is None:
            return 0
        return len(p) if name == "blocks" else getattr(p, name)

    # --- single-session calls (LogitService.Score / Draft): a batch of one -----------------------

    def score(self, session_id: str, start: int, tokens: Sequence[int], rows: int) -> tuple[torch.Tensor, int]:
        """Append `tokens` at `start` and return next-token log-probs for the last `rows`.

        Returns:
            ([rows, vocab_size] float32 log-probabilities on the CPU, new cache length).
        """
        r = self.score_batch([ScoreItem(session_id, start, tokens, rows)])[0]
        if r.error is not None:
            raise r.error
        return torch.log_softmax(r.rows.float(), dim=-1), r.cache_length

    def draft(
        self,
        session_id: str,
        start: int,
        tokens: Sequence[int],
        k: int,
        sampling: SamplingConfig,
        seed: int,
        vocab_limit: int = 0,
    ) -> tuple[list[int], torch.Tensor, int]:
        """Append `tokens`, then decode k tokens next to the model.

        Returns:
            (k draft ids, [k + 1, vocab_size] float32 raw log-probs on the CPU, cache length).
        """
        r = self.draft_batch([DraftItem(session_id, start, tokens, k, sampling, seed, vocab_limit)])[0]
        if r.error is not None:
            raise r.error
        return r.drafts, torch.log_softmax(r.rows.float(), dim=-1), r.cache_length

    def release(self, session_id: str) -> bool:
        if session_id:  # an empty id names no session: nothing to release
            check_session_id(session_id)
        with self._lock:
            return self.sessions.release(session_id)

    # --- batched calls ----------------------------------------------------------------------------

    def score_batch(self, items: Sequence[ScoreItem]) -> list[ItemResult]:
        """Run every item; each gets its last `rows` rows of logits, or its own error."""
        results = [ItemResult() for _ in items]
        with self._lock, torch.inference_mode():
            admitted = self._admit([Want(it.session_id, it.start, it.tokens, it.rows) for it in items], results)
            self._run(admitted, results)
        return results

    def draft_batch(self, items: Sequence[DraftItem]) -> list[ItemResult]:
        """Append each item's tokens, then draft its k tokens, all items stepping together.

        Draft i of an item is drawn (`sample_rows`) from `process(row_i[:vocab_limit].float(), sampling)`
        with the item's own seeded generator, where row_i is exactly the row returned (greedy:
        its argmax), and a sampled draft's q(x_i) comes with it (`draft_probs`). The last draft
        is fed too, so its row (verification's bonus row) comes back and every cache holds
        start + n + k tokens. Each item gets k + 1 rows; batching changes no item's drafts.
        """
        results = [ItemResult() for _ in items]
        with self._lock, torch.inference_mode():
            wants: list[Want | None] = []
            for it, res in zip(items, results):
                if not 1 <= it.k <= self.max_k:
                    res.error = InvalidArgument(f"k must be in [1, {self.max_k}], got {it.k}")
                elif not 0 <= it.vocab_limit <= self.vocab_size:
                    res.error = InvalidArgument(f"vocab_limit must be in [0, {self.vocab_size}], got {it.vocab_limit}")
                wants.append(Want(it.session_id, it.start, it.tokens, 1, it.k) if res.error is None else None)
            admitted = self._admit(wants, results)
            self._run(admitted, results)  # the row after each item's last sent token
            live = [r for r in admitted if results[r.index].error is None]
            # Rows come back on the CPU, so drafts are drawn there: generators on the CPU.
            gens = {r.index: make_generator(items[r.index].seed) for r in live}
            chunks = {r.index: [results[r.index].rows] for r in live}
            for step in range(max((r.k for r in live), default=0)):
                active = [r for r in live if r.k > step and results[r.index].error is None]
                self._draw(active, items, results, chunks, gens)
                active = [r for r in active if results[r.index].error is None]
                self._run(active, results)
                for r in active:
                    if results[r.index].error is None:
                        chunks[r.index].append(results[r.index].rows)
            for r in live:
                res = results[r.index]
                if res.error is None:
                    res.pieces = chunks[r.index]  # k + 1 rows, joined only if read (ItemResult.rows)
        return results

    def _draw(self, active: list[Admitted], items: Sequence[DraftItem], results: list[ItemResult],
              chunks: dict[int, list[torch.Tensor]], gens: dict[int, torch.Generator]) -> None:
        """Draw each active item's next draft from its last row and make it the item's next
        input. Items of one vocabulary limit and sampling setting draw together from their
        stacked rows: greedy ones one argmax, sampled ones one `sample_with_probs` with uniforms from
        each item's own generator (so batching changes no draft). A degenerate row fails its
        item alone."""
        groups: dict[tuple[int, SamplingConfig | None], list[Admitted]] = {}
        for r in active:
            it = items[r.index]
            groups.setdefault((it.vocab_limit or self.vocab_size, None if it.sampling.greedy else it.sampling), []).append(r)
        for (limit, sampling), group in groups.items():
            rows = torch.cat([chunks[r.index][-1][-1:, :limit] for r in group]).float()  # [items, limit]
            if sampling is None:
                (tokens, fine), probs, cuts = argmax_finite(rows), [None] * len(group), [None] * len(group)
            else:  # process(rows)'s distribution; each draft's q(x) as verification would compute it from these rows
                # (so the combiner reads a draft row only at a rejection), and the cut it was drawn within (ItemResult)
                u, more = per_row_uniforms([gens[r.index] for r in group])
                tokens, fine, q, made = sample_with_probs(rows, sampling, u, overwrite=True, more=more)  # rows: cat's own copy
                probs, cuts = q.tolist(), [None] * len(group) if made is None else list(zip(*(c.tolist() for c in made)))
            for r, token, ok, prob, cut in zip(group, tokens.tolist(), fine.tolist(), probs, cuts):
                if ok:
                    self._drafted(r, results[r.index], token, prob, cut)
                else:  # a degenerate row: this item fails alone
                    results[r.index].error = InvalidArgument(
                        "the draft model's row has no finite probability mass: its logits are NaN or infinite")

    @staticmethod
    def _drafted(r: Admitted, res: ItemResult, token: int, prob: float | None, cut: tuple[float, float] | None) -> None:
        res.drafts.append(token)
        res.draft_probs += [] if prob is None else [prob]
        res.draft_cuts += [] if cut is None else [cut]
        r.ids, r.rows = [token], 1

    def _admit(self, wants: Sequence[Want | None], results: list[ItemResult]) -> list[Admitted]:
        errors: list[EftMeshError | None] = [None] * len(wants)
        admitted = self.admission.admit(wants, errors)
        for res, err in zip(results, errors):
            if err is not None:
                res.error = err
        for r in admitted:
            results[r.index].cached_tokens = r.cached
        return admitted

    def _run(self, rows: list[Admitted], results: list[ItemResult]) -> None:
        """Forward every row, in as few forwards as pays: rows sorted by length join the current
        forward while it holds fewer than max_batch rows, its padded tokens stay within
        prefill_tokens, and the padding they add is worth less than another forward."""
        groups: list[list[Admitted]] = []
        group: list[Admitted] = []
        held = 0  # tokens of the rows in `group`
        for r in [r for r in rows if not r.ids]:  # rows 0, every token in the prefix cache: nothing to run
            results[r.index].rows = torch.empty((0, self.vocab_size), dtype=self.dtype)
            results[r.index].cache_length = r.session.table.length
        for r in sorted([r for r in rows if r.ids], key=lambda r: len(r.ids)):
            n, b = len(r.ids), len(group) + 1
            waste = b * n - (held + n)  # padding if r joins (it is the longest)
            if group and (b > self.max_batch or b * n > self.prefill_tokens or waste > self.merge_tokens):
                groups.append(group)
                group, held = [], 0
            group.append(r)
            held += n
        if group:
            groups.append(group)
        for g in groups:
            self._forward(g, results)

    def _forward(self, rows: list[Admitted], results: list[ItemResult]) -> None:
        """One forward (the runner's) over rows that each append their ids at their own
        position; each row's result gets its last `rows` logits. A model failure fails these
        rows and drops their sessions (their caches may hold part of the call)."""
        past = [r.session.length for r in rows]
        keep = max(max(r.rows for r in rows), 1)
        batch = StepBatch([r.session.table for r in rows], past, [r.ids for r in rows], keep)
        try:
            logits = self.runner.forward(batch)  # [rows, keep, vocab] on the CPU
        except Exception as e:
            error: EftMeshError = EngineFault(f"the model failed on this batch: {type(e).__name__}")
            if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
                # Out of memory for this forward's activations: load, not a fault. RESOURCE_EXHAUSTED,
                # which the combiner meets as it does a full KV cache: preempt, retry later.
                tokens = sum(len(r.ids) for r in rows)
                log.warning("%s: out of memory in a forward of %d rows, %d new tokens: refused", self.info.role,
                            len(rows), tokens)
                if any(d.type == "cuda" for d in self.devices):
                    torch.cuda.empty_cache()
                error = ResourceExhausted(
                    f"{self.info.role}: out of device memory for a forward of {len(rows)} rows and {tokens} new tokens: "
                    "retry later; if it recurs, lower --prefill-tokens or --max-batch, or --kv-cache-tokens to leave "
                    "the device more room", reason="out_of_memory")
            else:
                log.exception("%s: forward of %d rows failed", self.info.role, len(rows))
            for r in rows:  # their caches may hold part of the forward: dropped
                results[r.index].error = error
                self.sessions.release(r.session_id)
            return
        for b, r in enumerate(rows):
            self.pool.commit(r.session.table, r.ids)  # its length, and the blocks it filled into the prefix cache
            res = results[r.index]
            res.rows = logits[b, keep - r.rows:]  # [r.rows, vocab]
            res.cache_length = r.session.table.length
