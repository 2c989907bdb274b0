"""Sessions by id over the paged KV pool: a session cap, LRU eviction and idle expiry.

An evicted or expired session is simply gone (its blocks go back to the pool): the next call
for it with start > 0 is NOT_FOUND and the combiner re-sends the whole prefix. Caches are only
caches.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from eftmesh.logit.kvcache import BlockTable


@dataclass
class Session:
    """One sequence's blocks in the KV pool; `table.length` tokens are cached."""

    table: BlockTable = field(default_factory=BlockTable)
    last_used: float = 0.0

    @property
    def length(self) -> int:
        return self.table.length


class SessionCapReached(Exception):
    """No session may be evicted to make room for a new one."""


class SessionStore:
    """Sessions by id, least recently used first. Not thread-safe: the engine locks.

    `on_drop(session)` runs for every session that leaves (released, evicted, expired), so
    that its blocks return to the pool. A session used within the last `active_s` seconds is
    never evicted for room: it belongs to a generation in flight (one that merely sat out this
    call: a prefill-only step, another combiner's batch), and evicting it would only make that
    generation re-prefill and evict someone else in turn.
    """

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        on_drop: Callable[[Session], None] = lambda s: None,
        clock: Callable[[], float] = time.monotonic,
        active_s: float = 0.0,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._on_drop = on_drop
        self._clock = clock
        self.active_s = active_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        """The live session, marked as just used; None when unknown or expired."""
        self.expire()
        s = self._sessions.get(session_id)
        if s is not None:
            s.last_used = self._clock()
            self._sessions.move_to_end(session_id)
        return s

    def create(self, session_id: str, keep: Collection[str] = ()) -> Session:
        """A new (or replaced) empty session; evicts the least recently used one not in `keep`
        when full. Raises `SessionCapReached` when every session is in `keep`."""
        self.expire()
        self.release(session_id)
        while len(self._sessions) >= self.max_sessions:
            if not self.evict_lru(keep):
                raise SessionCapReached(f"all {self.max_sessions} sessions are in flight")
        s = Session(last_used=self._clock())
        self._sessions[session_id] = s
        return s

    def idle(self, keep: Collection[str]) -> Iterator[Session]:
        """The sessions evict_lru() may evict: idle ones outside `keep`."""
        cutoff = self._clock() - self.active_s
        return (s for sid, s in self._sessions.items() if sid not in keep and s.last_used <= cutoff)

    def evict_lru(self, keep: Collection[str]) -> bool:
        """Evict the least recently used idle session not in `keep`; False when there is none."""
        cutoff = self._clock() - self.active_s
        for sid, s in self._sessions.items():
            if s.last_used > cutoff:
                return False  # least recently used first: every later one is active too
            if sid not in keep:
                self._on_drop(self._sessions.pop(sid))
                self.evictions += 1
                return True
        return False

    def release(self, session_id: str) -> bool:
        """Drop a session; True when a live one was held."""
        s = self._sessions.pop(session_id, None)
        if s is not None:
            self._on_drop(s)
        return s is not None

    def expire(self) -> None:
        """Drop sessions idle for longer than the timeout (oldest first, so stop early)."""
        cutoff = self._clock() - self.idle_timeout_s
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if s.last_used >= cutoff:
                break
            self._on_drop(self._sessions.pop(sid))
            self.expirations += 1
