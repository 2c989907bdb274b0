"""Admission of a call's items to the paged KV cache: validation, sessions, and blocks.

Beside the session store (sessions.py) and the pool (kvcache.py): an item is checked (ids,
lengths, context), gets its session cut back to `start` (rollback) or a new one, then blocks
for everything it will append; when the pool is short, idle sessions are evicted least
recently used first, never one of the same call. With prefix caching, an item at a block
boundary (every new session) first takes the cached full blocks its tokens match (kvcache.py
`match`), and only the rest is run. The engine holds its lock around all of it.
No gRPC, no model here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from eftmesh.common.errors import (
    DRAINING_PREFIX,
    EftMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    quote,
)
from eftmesh.logit.kvcache import PagedKVPool, PoolExhausted
from eftmesh.logit.sessions import Session, SessionCapReached, SessionStore

# The longest session id accepted (UTF-8 bytes). The combiner's ids are a 32-character hex id,
# a colon and a role name (at most 128 bytes); a longer id is refused before it is stored.
MAX_SESSION_ID_BYTES = 256


def check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id must be non-empty")
    n = len(session_id.encode("utf-8", "surrogatepass"))
    if n > MAX_SESSION_ID_BYTES:
        raise InvalidArgument(
            f"session_id is {n} bytes long; session ids are at most {MAX_SESSION_ID_BYTES} bytes: {quote(session_id)}"
        )


@dataclass(frozen=True)
class Want:
    """What one item asks of the cache: append `tokens` at `start`, `rows` rows back, then room
    for `extra` more tokens (the drafts of a Draft item)."""

    session_id: str
    start: int
    tokens: Sequence[int]
    rows: int
    extra: int = 0


@dataclass
class Admitted:
    """An admitted item: its index in the call, its session, the ids still to run (those past
    the prefix cache's match), the rows it wants, and how many of its tokens the cache held."""

    index: int
    session_id: str
    session: Session
    ids: list[int]
    rows: int
    k: int = 0
    cached: int = 0


class KVAdmission:
    """Admits items to sessions and blocks. Not thread-safe: the engine locks."""

    def __init__(self, pool: PagedKVPool, sessions: SessionStore, *, vocab_size: int, max_context: int,
                 role: str) -> None:
        self.pool, self.sessions = pool, sessions
        self.vocab_size, self.max_context, self.role = vocab_size, max_context, role
        # Set by start_draining(): the name of this replica, and no new session is created.
        self.draining: str | None = None

    def admit(self, wants: Sequence[Want | None], errors: list[EftMeshError | None]) -> list[Admitted]:
        """Validate items and give each its session cut back to `start` with blocks for
        start + len(tokens) + extra tokens; a refused item gets its error in `errors` (by
        index; None entries of `wants` are skipped)."""
        rows: list[Admitted] = []
        seen: set[str] = set()
        batch = {w.session_id for w in wants if w is not None}  # never evicted for one another
        for i, w in enumerate(wants):
            if w is None:
                continue
            try:
                ids = self.check(w)
                if w.session_id in seen:
                    raise InvalidArgument(f"session {quote(w.session_id)} appears twice in one batch")
                seen.add(w.session_id)
                session = self.session_at(w.session_id, w.start, batch)
                # The caller wants the logits of the last `rows` tokens: those always run. An item
                # that only fills the cache (rows 0: a piece of a chunked prompt) may find all of it.
                cached = self.pool.match(session.table, ids, len(ids) - w.rows)
                rows.append(Admitted(i, w.session_id, session, ids[cached:], w.rows, w.extra, cached))
            except EftMeshError as e:
                errors[i] = e
        admitted = []
        for r in rows:
            try:
                self.reserve(r.session, r.session.length + len(r.ids) + r.k, batch)
                admitted.append(r)
            except ResourceExhausted as e:
                errors[r.index] = e
                if r.session.length == r.cached:  # holds nothing of its own: a new session goes
                    self.sessions.release(r.session_id)
        return admitted

    def check(self, w: Want) -> list[int]:
        check_session_id(w.session_id)
        n = len(w.tokens)
        if n == 0:
            raise InvalidArgument("tokens must be non-empty: send at least the last token")
        if w.rows > n:
            raise InvalidArgument(f"rows={w.rows} exceeds the {n} tokens sent")
        if w.start + n + w.extra > self.max_context:
            raise OutOfRange(
                f"start {w.start} + {n} tokens" + (f" + {w.extra} drafts" if w.extra else "")
                + f" exceeds the model's max context {self.max_context}"
            )
        ids = list(w.tokens)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def session_at(self, session_id: str, start: int, batch: Collection[str] = ()) -> Session:
        """The session cut back to `start` tokens (a new one when start == 0, evicting the least
        recently used session outside `batch` at the session cap)."""
        session = self.sessions.get(session_id)
        if session is None:
            if start > 0:
                raise NotFound(
                    f"unknown session {quote(session_id)} (evicted, expired or never created): "
                    "re-send the whole sequence with start=0"
                )
            if self.draining is not None:
                raise Unavailable(
                    f"{DRAINING_PREFIX} replica {self.draining} ({self.role}) is shutting down and "
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

    def reserve(self, session: Session, length: int, keep: Collection[str]) -> None:
        """Blocks for `length` tokens, evicting idle sessions (least recently used first, never
        one of this batch) while the pool is short; evicts nothing when that could not suffice.
        The pool's idle cached blocks count as free: they go first, before any session."""
        need = self.pool.blocks_needed(session.table, length)
        if need > self.pool.free_blocks and need > self.pool.free_blocks + self.evictable_blocks(keep):
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

    def evictable_blocks(self, keep: Collection[str]) -> int:
        """Blocks that evicting every idle session outside `keep` would return to the pool: a
        block shared with a session that stays is not one of them."""
        held = Counter(b for s in self.sessions.idle(keep) for b in s.table.blocks)
        return sum(1 for b, n in held.items() if self.pool.refs(b) == n)
