"""A hosted causal LM that scores batches of sessions against a paged KV cache.

No gRPC here: the servicer converts messages at the edge and calls `ModelEngine`.

Every call is a batch of items, one per session (TGI's shard, vLLM's model runner), run in as
few forwards as pays: items sorted by length share a forward while the padding that costs is
worth less than a forward's fixed cost (both measured at warm-up), so decode steps run
together, verifies of similar k together, and a prefill does not pad forty decode rows to its
length. Each item's rows
come back as the model's own logits in its own dtype: mixing and sampling downstream are
invariant to a per-row constant, so this loses nothing against the model's output and spares
a log-softmax here. A bad item fails alone; the others go on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eftmesh.common import loading
from eftmesh.common.errors import (
    EftMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    quote,
)
from eftmesh.common.tokenizer import fingerprint
from eftmesh.core.sampling import NoFiniteMass, SamplingConfig, make_generator, process, sample
from eftmesh.logit.kvcache import BatchView, PagedKVPool, PoolExhausted
from eftmesh.logit.sessions import Session, SessionCapReached, SessionStore

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Padding tokens one forward's fixed cost is worth before warm-up measures it.
DEFAULT_MERGE_TOKENS = 16


class EngineFault(EftMeshError):
    """The model failed on a batch (a server fault, not the caller's): INTERNAL."""


# The start of the message of an item refused because the replica drains: the combiner starts
# such a session on another replica (from 0) instead of failing it.
DRAINING_PREFIX = "draining:"


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
    """What one item got back: its rows, or its own error."""

    rows: torch.Tensor | None = None  # [rows, vocab_size] logits in the model's dtype, on the CPU
    cache_length: int = 0
    drafts: list[int] = field(default_factory=list)
    error: EftMeshError | None = None


@dataclass
class _Row:
    """An admitted item inside the engine: its session, ids and the rows it wants."""

    index: int
    session_id: str
    session: Session
    ids: list[int]
    rows: int
    k: int = 0


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


# The longest session id accepted (UTF-8 bytes). The combiner's ids are a 32-character hex id,
# a colon and a role name (at most 128 bytes); a longer id is refused before it is stored.
MAX_SESSION_ID_BYTES = 256


def tokenizer_chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template ("" when it has none; of several named ones, "default")."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) else ""


def check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id must be non-empty")
    n = len(session_id.encode("utf-8", "surrogatepass"))
    if n > MAX_SESSION_ID_BYTES:
        raise InvalidArgument(
            f"session_id is {n} bytes long; session ids are at most {MAX_SESSION_ID_BYTES} bytes: {quote(session_id)}"
        )


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """--device-map: "none" (or empty) -> None, "auto" -> "auto", else a JSON object of module
    names to devices (e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1})."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    if text.strip() == "auto":
        return "auto"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--device-map must be none, auto or a JSON object of module names to devices: {e}") from None
    if not isinstance(value, dict) or not value:
        raise ValueError("--device-map JSON must be a non-empty object of module names to devices")
    return value


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """--max-memory "0=70GiB,1=70GiB,cpu=8GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "8GiB"}."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        if not sep or not key or not size:
            raise ValueError(f"--max-memory wants DEVICE=SIZE pairs separated by commas, got {part!r}")
        out[int(key) if key.isdigit() else key] = size
    return out


def _model_devices(model: Any) -> list[torch.device]:
    """The devices the model's weights are on, in module order, without repeats."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def model_max_context(config: Any) -> int:
    """The longest sequence a transformers config admits (positions it can embed)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length from its config; pass --max-context")


def _check_full_attention(config: Any) -> None:
    """The paged cache serves full-attention decoders; sliding windows would need their own layout."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"{getattr(config, 'model_type', 'this model')} uses sliding-window or non-attention layers "
            f"({sorted(kinds)}); eftmesh's paged KV cache serves full-attention models only"
        )


class ModelEngine:
    """One model, its tokenizer identity, its sessions and their paged KV cache.

    Calls run one at a time under `self._lock` (which also guards sessions and the pool): a
    model on one device gains nothing from interleaving, and a caller batches its sessions
    into one call instead.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        role: str,
        max_sessions: int = 256,
        session_idle_timeout_s: float = 300.0,
        max_context: int | None = None,
        max_k: int = 32,
        max_batch: int = 64,
        kv_cache_tokens: int = 16384,
        kv_block_size: int = 16,
        prefill_tokens: int = 2048,
        session_active_s: float = 1.0,
    ) -> None:
        self.model = model.eval()
        _check_full_attention(model.config)
        self.max_k = max_k
        self.max_batch = max(1, max_batch)
        self.prefill_tokens = max(1, prefill_tokens)
        # A model sharded over several devices (a device map) takes its inputs on the embedding's
        # device; `self.device` is that one, `self.devices` all of them in layer order.
        self.devices = _model_devices(model)
        if torch.device("meta") in self.devices:
            raise ValueError("some weights are offloaded (on the meta device): eftmesh serves models whose "
                             "weights all live on GPUs or all on the CPU; raise --max-memory or add GPUs")
        self.device = model.get_input_embeddings().weight.device
        # logits_to_keep indexes the final hidden states, on the device of the base model's last
        # weights (its final norm), before the head
        self._keep_device = list(model.base_model.parameters())[-1].device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        ctx = model_max_context(model.config)
        self.max_context = min(ctx, max_context) if max_context else ctx
        self.pool = PagedKVPool(kv_cache_tokens, kv_block_size, model.config.num_hidden_layers, self.device, self.dtype)
        # One session can never hold more than the whole pool: that is its context limit too, so
        # callers see it in Info and stop (finish reason CONTEXT) instead of failing.
        self.max_context = min(self.max_context, self.pool.capacity_tokens)
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
            max_sessions=max_sessions,
            session_idle_timeout_s=session_idle_timeout_s,
            eos_token_id=-1 if eos is None else int(eos),
            max_k=max_k,
            kv_cache_tokens=self.pool.capacity_tokens,
            kv_block_size=kv_block_size,
            max_batch=self.max_batch,
            chat_template=tokenizer_chat_template(tokenizer),  # --chat-template replaces it (logit.server.build)
        )
        self.sessions = SessionStore(max_sessions, session_idle_timeout_s, on_drop=lambda s: self.pool.free(s.table),
                                     active_s=session_active_s)
        self._lock = threading.Lock()
        # How many padded tokens cost as much as one more forward (its fixed, per-layer cost):
        # items whose padding wastes less than this share a forward. Measured by warmup().
        self.merge_tokens = DEFAULT_MERGE_TOKENS
        # Set by start_draining(): the name of this replica, and no new session is created.
        self.draining: str | None = None
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
                module.register_forward_pre_hook(_mask_swapper(weight.device), with_kwargs=True)

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
        **kwargs: Any,
    ) -> ModelEngine:
        """Load a causal LM and its tokenizer from a checkpoint folder, a .gguf file (dequantised
        to float) or a hub id at `revision` (eftmesh.common.loading); the tokenizer from
        `tokenizer` (at `tokenizer_revision`) when given, else from the model's own spec.
        An unloadable spec raises loading.LoadError, one line naming --model or --tokenizer.

        Weights go straight to their devices as they are read (low_cpu_mem_usage): never the
        whole model staged in host RAM. `device_map` None puts every module on `device`; "auto"
        spreads the layers over the visible GPUs (accelerate, within `max_memory` per device,
        e.g. {0: "70GiB", 1: "70GiB"}); a dict names each module's device.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_memory and device_map is None:
            raise ValueError("--max-memory applies to a device map: pass --device-map auto")
        source = loading.resolve(model_id, revision, flag="--model")
        if tokenizer is None:
            tok = loading.load_tokenizer_from(source, flag="--model", trust_remote_code=trust_remote_code)
        else:
            tok = loading.load_tokenizer(tokenizer, tokenizer_revision, flag="--tokenizer",
                                         trust_remote_code=trust_remote_code)
        load: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
        if device_map is not None:
            load.update(device_map=device_map, low_cpu_mem_usage=True)
            if max_memory:
                load["max_memory"] = max_memory
        elif importlib.util.find_spec("accelerate") is not None:
            load.update(device_map={"": device}, low_cpu_mem_usage=True)
        model = loading.load_causal_lm_from(source, flag="--model", **load)
        if "device_map" not in load:
            model = model.to(device)  # no accelerate: load on the CPU, then move
        if device_map is not None:
            log.info("%s: device map %s", role, getattr(model, "hf_device_map", device_map))
        return cls(model, tok, model_id=source.model_id, role=role, **kwargs)

    def warmup(self) -> None:
        """Real forwards through the paged cache: readiness means the device answers and the KV
        pool is allocated, not just that the weights loaded. Their timings give the forward's
        fixed cost against its cost per token, which decides how items share forwards."""
        sid = "\x00warmup"
        n = max(2, min(32, self.max_context // 2))
        try:
            self._timed(sid, 1)  # first touch: allocation, lazy initialisation
            one = min(self._timed(sid, 1) for _ in range(3))
            many = min(self._timed(sid, n) for _ in range(3))
        finally:
            self.release(sid)
        per_token = max(many - one, 0.0) / (n - 1)
        fixed = max(one - per_token, 0.0)
        self.merge_tokens = int(min(fixed / per_token, self.prefill_tokens)) if per_token > 0 else self.prefill_tokens
        log.info("%s: forward fixed cost %.2f ms, %.3f ms per token: padding up to %d tokens shares a forward",
                 self.info.role, fixed * 1e3, per_token * 1e3, self.merge_tokens)

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
            self.draining = replica or self.info.role

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
            admitted = self._admit(
                [(it.session_id, it.start, it.tokens, it.rows, 0) for it in items], results
            )
            self._run(admitted, results)
        return results

    def draft_batch(self, items: Sequence[DraftItem]) -> list[ItemResult]:
        """Append each item's tokens, then draft its k tokens, all items stepping together.

        Draft i of an item is drawn from `core.sampling.process(row_i[:vocab_limit].float(), sampling)`
        with the item's own seeded generator, where row_i is exactly the row returned, so the
        combiner recomputes the q each draft came from. The last draft is fed too, so its row
        (the bonus row of verification) comes back and every cache holds start + n + k tokens.
        Each item gets k + 1 rows; batching changes no item's drafts.
        """
        results = [ItemResult() for _ in items]
        with self._lock, torch.inference_mode():
            for it, res in zip(items, results):
                if not 1 <= it.k <= self.max_k:
                    res.error = InvalidArgument(f"k must be in [1, {self.max_k}], got {it.k}")
                elif not 0 <= it.vocab_limit <= self.vocab_size:
                    res.error = InvalidArgument(f"vocab_limit must be in [0, {self.vocab_size}], got {it.vocab_limit}")
            todo = [(it.session_id, it.start, it.tokens, 1, it.k) if res.error is None else None
                    for it, res in zip(items, results)]
            admitted = self._admit(todo, results)
            self._run(admitted, results)  # the row after each item's last sent token
            live = [r for r in admitted if results[r.index].error is None]
            gens = {r.index: make_generator(items[r.index].seed, self.device) for r in live}
            chunks = {r.index: [results[r.index].rows] for r in live}
            for step in range(max((r.k for r in live), default=0)):
                active = [r for r in live if r.k > step and results[r.index].error is None]
                for r in active:
                    it = items[r.index]
                    row = chunks[r.index][-1][-1:]  # [1, vocab]
                    limit = it.vocab_limit or self.vocab_size
                    try:
                        x = int(sample(process(row[:, :limit].float(), it.sampling), it.sampling, gens[r.index])[0])
                    except NoFiniteMass as e:  # this item's row is degenerate: fail it alone
                        results[r.index].error = InvalidArgument(str(e))
                        continue
                    results[r.index].drafts.append(x)
                    r.ids, r.rows = [x], 1
                active = [r for r in active if results[r.index].error is None]
                self._run(active, results)
                for r in active:
                    if results[r.index].error is None:
                        chunks[r.index].append(results[r.index].rows)
            for r in live:
                res = results[r.index]
                if res.error is None:
                    res.rows = torch.cat(chunks[r.index])  # [k + 1, vocab]
        return results

    def _admit(
        self, todo: Sequence[tuple[str, int, Sequence[int], int, int] | None], results: list[ItemResult]
    ) -> list[_Row]:
        """Validate items (session_id, start, tokens, rows, k) and give each its session cut back
        to `start` with blocks for start + len(tokens) + k tokens. Holds the lock."""
        rows: list[_Row] = []
        seen: set[str] = set()
        batch = {item[0] for item in todo if item is not None}  # never evicted for one another
        for i, item in enumerate(todo):
            if item is None:
                continue
            sid, start, tokens, want, k = item
            try:
                ids = self._check(sid, start, tokens, want, k)
                if sid in seen:
                    raise InvalidArgument(f"session {quote(sid)} appears twice in one batch")
                seen.add(sid)
                rows.append(_Row(i, sid, self._session_at(sid, start, batch), ids, want, k))
            except EftMeshError as e:
                results[i].error = e
        admitted = []
        for r in rows:
            try:
                self._reserve(r.session, r.session.length + len(r.ids) + r.k, batch)
                admitted.append(r)
            except ResourceExhausted as e:
                results[r.index].error = e
                if r.session.length == 0:
                    self.sessions.release(r.session_id)
        return admitted

    def _check(self, session_id: str, start: int, tokens: Sequence[int], rows: int, extra: int) -> list[int]:
        check_session_id(session_id)
        n = len(tokens)
        if n == 0:
            raise InvalidArgument("tokens must be non-empty: send at least the last token")
        if rows > n:
            raise InvalidArgument(f"rows={rows} exceeds the {n} tokens sent")
        if start + n + extra > self.max_context:
            raise OutOfRange(
                f"start {start} + {n} tokens" + (f" + {extra} drafts" if extra else "")
                + f" exceeds the model's max context {self.max_context}"
            )
        ids = list(tokens)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _session_at(self, session_id: str, start: int, batch: Collection[str] = ()) -> Session:
        """The session cut back to `start` tokens (a new one when start == 0, evicting the least
        recently used session outside `batch` at the session cap). Holds the lock."""
        session = self.sessions.get(session_id)
        if session is None:
            if start > 0:
                raise NotFound(
                    f"unknown session {quote(session_id)} (evicted, expired or never created): "
                    "re-send the whole sequence with start=0"
                )
            if self.draining is not None:
                raise Unavailable(
                    f"{DRAINING_PREFIX} replica {self.draining} ({self.info.role}) is shutting down and "
                    f"takes no new session: start {quote(session_id)} on another replica"
                )
            try:
                session = self.sessions.create(session_id, keep=batch)
            except SessionCapReached as e:
                raise ResourceExhausted(f"{e} (--max-sessions): retry when sessions finish") from None
        if start > session.length:
            raise FailedPrecondition(
                f"start {start} leaves a gap: session {quote(session_id)} holds {session.length} "
                "tokens; start must be <= the cached length"
            )
        self.pool.truncate(session.table, start)
        return session

    def _reserve(self, session: Session, length: int, keep: Collection[str]) -> None:
        """Blocks for `length` tokens, evicting idle sessions (least recently used first, never
        one of this batch) while the pool is short; evicts nothing when that could not suffice."""
        need = self.pool.blocks_for(length) - len(session.table.blocks)
        if need > self.pool.free_blocks + self.sessions.evictable_blocks(keep):
            raise ResourceExhausted(
                f"KV cache full: {need} blocks of {self.pool.block_size} tokens needed, "
                f"{self.pool.free_blocks} free of {self.pool.num_blocks} and the rest held by active sessions; "
                "retry when sessions finish, or raise --kv-cache-tokens"
            )
        while True:
            try:
                self.pool.reserve(session.table, length)
                return
            except PoolExhausted as e:
                if not self.sessions.evict_lru(keep):
                    raise ResourceExhausted(
                        f"KV cache full ({self.pool.capacity_tokens} tokens, every block held by active sessions): {e}; "
                        "retry when sessions finish, or raise --kv-cache-tokens"
                    ) from None

    def _run(self, rows: list[_Row], results: list[ItemResult]) -> None:
        """Forward every row, in as few forwards as pays: rows sorted by length join the current
        forward while it holds fewer than max_batch rows, its padded tokens stay within
        prefill_tokens, and the padding they add is worth less than another forward."""
        groups: list[list[_Row]] = []
        group: list[_Row] = []
        for r in sorted(rows, key=lambda r: len(r.ids)):
            n, b = len(r.ids), len(group) + 1
            waste = b * n - (sum(len(x.ids) for x in group) + n)  # padding if r joins (it is the longest)
            if group and (b > self.max_batch or b * n > self.prefill_tokens or waste > self.merge_tokens):
                groups.append(group)
                group = []
            group.append(r)
        if group:
            groups.append(group)
        for g in groups:
            self._forward(g, results)

    def _forward(self, rows: list[_Row], results: list[ItemResult]) -> None:
        """One forward over rows that each append their ids at their own position; each row's
        result gets its last `rows` logits. A model failure fails these rows and drops their
        sessions (their caches may hold part of the call)."""
        tables = [r.session.table for r in rows]
        past = [r.session.length for r in rows]
        new = [len(r.ids) for r in rows]
        n, keep = max(new), max(max(r.rows for r in rows), 1)
        view = BatchView(self.pool, tables, past, new, n)
        ids = torch.zeros((len(rows), n), dtype=torch.long)  # [rows, n]; padding id 0
        for b, r in enumerate(rows):
            ids[b, : new[b]] = torch.tensor(r.ids, dtype=torch.long)
        # Each row keeps its last `keep` real query columns (rows asking fewer take a prefix of
        # them, dropped below); the model projects only those onto the vocabulary.
        cols = torch.tensor(new)[:, None] - keep + torch.arange(keep)[None, :]  # [rows, keep]
        try:
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=view.attention_mask(self.dtype),
                position_ids=view.positions.clamp_max(self.max_context - 1).to(self.device),
                cache=view,
                use_cache=True,
                logits_to_keep=cols.clamp_min(0).to(self._keep_device),
            )
        except Exception as e:
            log.exception("%s: forward of %d rows failed", self.info.role, len(rows))
            for r in rows:
                results[r.index].error = EngineFault(f"the model failed on this batch: {type(e).__name__}")
                self.sessions.release(r.session_id)
            return
        logits = out.logits.to("cpu")  # [rows, keep, vocab]
        for b, r in enumerate(rows):
            r.session.table.length = past[b] + new[b]
            res = results[r.index]
            res.rows = logits[b, keep - r.rows:]  # [r.rows, vocab]
            res.cache_length = r.session.table.length


def _mask_swapper(device: torch.device) -> Any:
    """A forward pre-hook for a module on `device`: where its arguments carry a BatchView and
    that view's mask, it gets the view's copy of the mask on `device` instead."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        view = next((a for a in (*args, *kwargs.values()) if isinstance(a, BatchView)), None)
        if view is None or view.mask is None or view.mask.device == device:
            return None
        mask = view.mask_on(device)
        return (tuple(mask if a is view.mask else a for a in args),
                {k: mask if v is view.mask else v for k, v in kwargs.items()})

    return hook
