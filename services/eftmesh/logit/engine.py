"""A hosted causal LM that scores tokens against per-session KV caches.

No gRPC here: the servicer converts messages at the edge and calls `ModelEngine`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eftmesh.common.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from eftmesh.common.tokenizer import fingerprint
from eftmesh.core.sampling import SamplingConfig, make_generator, process, sample
from eftmesh.logit.sessions import Session, SessionStore

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Steps that send at most this many tokens (a decode step, a verify of up to 15 drafts) queue
# for batching; longer ones (a prefill) run alone at once.
_MAX_STEP_TOKENS = 16


class _Step:
    """One queued step: a session's next tokens, the rows it wants back, and its answer."""

    __slots__ = ("session_id", "start", "tokens", "rows", "logprobs", "length", "error", "done")

    def __init__(self, session_id: str, start: int, tokens: list[int], rows: int) -> None:
        self.session_id, self.start, self.tokens, self.rows = session_id, start, tokens, rows
        self.logprobs: torch.Tensor | None = None
        self.length = 0
        self.error: BaseException | None = None
        self.done = False

    def finish(self, logprobs: torch.Tensor | None = None, length: int = 0, error: BaseException | None = None) -> None:
        self.logprobs, self.length, self.error, self.done = logprobs, length, error, True


def _batchable(cache: Any) -> bool:
    """Whether a session's cache is plain per-layer keys and values that can be padded and
    stacked (not sliding windows, not recurrent state)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


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
    max_draft: int


def model_max_context(config: Any) -> int:
    """The longest sequence a transformers config admits (positions it can embed)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length from its config; pass --max-context")


class ModelEngine:
    """One model, its tokenizer identity, and its sessions' KV caches.

    Forward passes run one at a time under `self._lock` (which also guards the session
    store): a model on one device gains nothing from interleaving, and memory stays bounded.
    Steps of different sessions that queue while the model is busy and send the same number of
    tokens (decode steps; verifies of k drafts) run together as one batched forward
    (`max_batch`), which is where a busy service's throughput comes from.
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
        max_draft: int = 32,
        max_batch: int = 1,
    ) -> None:
        self.model = model.eval()
        self.max_draft = max_draft
        # Decode steps of different sessions that arrive while a forward pass runs are run
        # together as one batched forward (up to max_batch rows); 1 runs every call alone.
        self.max_batch = max(1, max_batch)
        self._pending: list[_Step] = []
        self._pending_cv = threading.Condition()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        ctx = model_max_context(model.config)
        self.max_context = min(ctx, max_context) if max_context else ctx
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.info = EngineInfo(
            model_id=model_id,
            role=role,
            vocab_size=self.vocab_size,
            tokenizer_vocab_size=len(tokenizer),
            tokenizer_fingerprint=fingerprint(tokenizer),
            max_context=self.max_context,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_sessions=max_sessions,
            session_idle_timeout_s=session_idle_timeout_s,
            eos_token_id=-1 if eos is None else int(eos),
            max_draft=max_draft,
        )
        self.sessions = SessionStore(max_sessions, session_idle_timeout_s)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        role: str,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> ModelEngine:
        """Load a causal LM and its tokenizer from a local directory or a hub id."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        ).to(device)
        return cls(model, tokenizer, model_id=model_id, role=role, **kwargs)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def warmup(self) -> None:
        """One real forward pass: readiness means the device answers, not just that weights loaded."""
        with self._lock, torch.inference_mode():
            self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device))

    def _check_tokens(self, session_id: str, start: int, tokens: Sequence[int], extra: int) -> torch.Tensor:
        """Validate a call that appends `tokens` (then `extra` more) at `start`; [n] ids."""
        if not session_id:
            raise InvalidArgument("session_id must be non-empty")
        n = len(tokens)
        if n == 0:
            raise InvalidArgument("tokens must be non-empty: send at least the last token")
        if start + n + extra > self.max_context:
            raise OutOfRange(
                f"start {start} + {n} tokens" + (f" + {extra} drafts" if extra else "")
                + f" exceeds the model's max context {self.max_context}"
            )
        ids = torch.tensor(tokens, dtype=torch.long)  # [n]
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bool(bad.any()):
            first = int(ids[bad][0])
            raise InvalidArgument(f"token id {first} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _session_at(self, session_id: str, start: int) -> Session:
        """The session cut back to `start` tokens (a new one when start == 0). Holds the lock."""
        session = self.sessions.get(session_id)
        if session is None:
            if start > 0:
                raise NotFound(
                    f"unknown session {session_id!r} (evicted, expired or never created): "
                    "re-send the whole sequence with start=0"
                )
            session = self.sessions.create(session_id, self._new_cache())
        if start > session.length:
            raise FailedPrecondition(
                f"start {start} leaves a gap: session {session_id!r} holds {session.length} "
                "tokens; start must be <= the cached length"
            )
        if start < session.length:
            session.cache.crop(start - session.length)  # a negative count drops tokens
            session.length = start
        return session

    def _forward(self, session_id: str, session: Session, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Append ids [n] to the session's cache; [keep, vocab] float32 log-probs of the last rows."""
        try:
            out = self.model(
                input_ids=ids.view(1, -1), cache=session.cache, use_cache=True, logits_to_keep=max(keep, 1)
            )
        except BaseException:
            # The cache may hold part of this call: drop the session rather than trust it.
            self.sessions.release(session_id)
            raise
        session.length += ids.shape[0]
        logits = out.logits[0, -keep:] if keep else out.logits[0, :0]  # [keep, vocab]
        return torch.log_softmax(logits.float(), dim=-1)

    def score(
        self, session_id: str, start: int, tokens: Sequence[int], rows: int
    ) -> tuple[torch.Tensor, int]:
        """Append `tokens` at `start` and return next-token log-probs for the last `rows`.

        Returns:
            ([rows, vocab_size] float32 log-probabilities on the CPU, new cache length).
        """
        ids = self._check_tokens(session_id, start, tokens, 0)
        if rows > len(tokens):
            raise InvalidArgument(f"rows={rows} exceeds the {len(tokens)} tokens sent")
        if self.max_batch > 1 and start > 0 and len(tokens) <= _MAX_STEP_TOKENS:
            return self._score_step(_Step(session_id, start, ids.tolist(), rows))
        with self._lock, torch.inference_mode():
            session = self._session_at(session_id, start)
            logprobs = self._forward(session_id, session, ids.to(self.device), rows).cpu()
            return logprobs, session.length

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

        Each draft is drawn from `core.sampling.process(row, sampling)`, the same processing
        the combiner applies, over the first `vocab_limit` columns (0: all), so the combiner
        recomputes from the returned raw rows exactly the q each draft was drawn from. The last draft is fed too, so the cache holds it and
        its row (the bonus row of verification) comes back in this same call.

        Returns:
            (k draft ids, [k + 1, vocab_size] float32 raw log-probs on the CPU, cache length).
        """
        if not 1 <= k <= self.max_draft:
            raise InvalidArgument(f"k must be in [1, {self.max_draft}], got {k}")
        if vocab_limit < 0 or vocab_limit > self.vocab_size:
            raise InvalidArgument(f"vocab_limit must be in [0, {self.vocab_size}], got {vocab_limit}")
        limit = vocab_limit or self.vocab_size
        ids = self._check_tokens(session_id, start, tokens, k)
        gen = make_generator(seed, self.device)
        with self._lock, torch.inference_mode():
            session = self._session_at(session_id, start)
            row = self._forward(session_id, session, ids.to(self.device), 1)  # [1, vocab]
            rows, drafts = [row], []
            for _ in range(k):
                x = sample(process(row[:, :limit], sampling), sampling, gen)  # [1], on the device
                drafts.append(x)
                row = self._forward(session_id, session, x, 1)
                rows.append(row)
            out = torch.cat(rows).cpu()  # [k + 1, vocab]
            return torch.cat(drafts).tolist(), out, session.length

    def release(self, session_id: str) -> bool:
        with self._lock:
            return self.sessions.release(session_id)

    # --- batched decode steps -----------------------------------------------------------------

    def _score_step(self, step: _Step) -> tuple[torch.Tensor, int]:
        """Queue one step; whichever waiting thread takes the model next runs every
        queued step (up to max_batch) as one forward pass. No wait is added: a step that
        finds the model free runs at once, alone or with what queued meanwhile."""
        with self._pending_cv:
            self._pending.append(step)
        while True:
            if self._lock.acquire(blocking=False):
                try:
                    with self._pending_cv:
                        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                    if batch:
                        self._run_steps(batch)
                finally:
                    self._lock.release()
                with self._pending_cv:
                    self._pending_cv.notify_all()
            with self._pending_cv:
                if step.done:
                    break
                self._pending_cv.wait(timeout=0.002)
        if step.error is not None:
            raise step.error
        return step.logprobs, step.length

    def _run_steps(self, batch: list[_Step]) -> None:
        """Run queued steps of distinct sessions, one forward per group of steps that send
        the same number of tokens (a decode step, or a verify of k drafts). Holds the lock."""
        try:
            with torch.inference_mode():
                ready: list[tuple[_Step, Session]] = []
                seen: set[str] = set()
                for st in batch:
                    if st.session_id in seen:  # a second step of one session waits for the next batch
                        with self._pending_cv:
                            self._pending.insert(0, st)
                        continue
                    seen.add(st.session_id)
                    try:
                        ready.append((st, self._session_at(st.session_id, st.start)))
                    except Exception as e:  # this step's own error (NOT_FOUND, a gap): the rest go on
                        st.finish(error=e)
                groups: dict[int, list[tuple[_Step, Session]]] = {}
                for st, session in ready:
                    groups.setdefault(len(st.tokens), []).append((st, session))
                for group in groups.values():
                    if len(group) > 1 and all(_batchable(s.cache) for _, s in group):
                        self._forward_batch(group)
                        continue
                    for st, session in group:
                        try:
                            ids = torch.tensor(st.tokens, device=self.device)
                            st.finish(self._forward(st.session_id, session, ids, st.rows).cpu(), session.length)
                        except Exception as e:
                            st.finish(error=e)
        except BaseException as e:
            for st in batch:
                if not st.done:
                    st.finish(error=e)
            raise

    def _forward_batch(self, ready: list[tuple[_Step, Session]]) -> None:
        """One forward over several sessions' next n tokens each: their caches left-padded to
        one length (padding masked out), each row at its own positions; each session's cache
        then gets its own new keys and values."""
        from transformers import DynamicCache

        sessions = [s for _, s in ready]
        lengths = [s.length for s in sessions]
        longest, rows, n = max(lengths), len(ready), len(ready[0][0].tokens)
        batched = DynamicCache(config=self.model.config)
        for i in range(len(sessions[0].cache.layers)):
            parts = [(s.cache.layers[i].keys, s.cache.layers[i].values) for s in sessions]
            k0 = parts[0][0]
            keys = k0.new_zeros((rows, k0.shape[1], longest, k0.shape[3]))  # [rows, heads, longest, dim]
            values = keys.clone()
            for b, (k, v) in enumerate(parts):
                keys[b, :, longest - k.shape[2]:] = k[0]
                values[b, :, longest - v.shape[2]:] = v[0]
            batched.update(keys, values, i)
        mask = torch.zeros((rows, longest + n), dtype=torch.long, device=self.device)  # [rows, longest + n]
        for b, length in enumerate(lengths):
            mask[b, longest - length:] = 1
        ids = torch.tensor([st.tokens for st, _ in ready], device=self.device)  # [rows, n]
        offsets = torch.arange(n, device=self.device)
        positions = torch.stack([length + offsets for length in lengths])  # [rows, n]
        keep = max(st.rows for st, _ in ready)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batched,
                             use_cache=True, logits_to_keep=max(keep, 1))
        except Exception as e:
            for st, _ in ready:
                st.finish(error=e)
            return
        logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # [rows, keep, vocab]
        for b, (st, session) in enumerate(ready):
            for i, layer in enumerate(batched.layers):
                session.cache.update(layer.keys[b:b + 1, :, -n:], layer.values[b:b + 1, :, -n:], i)
            session.length += n
            st.finish(logprobs[b, logprobs.shape[1] - st.rows:], session.length)  # its last rows (none for 0)
