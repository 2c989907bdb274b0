"""Per-session KV caches with bounded memory: a session cap, LRU eviction and idle expiry.

An evicted or expired session is simply gone: the next Score for it with start > 0 is
NOT_FOUND and the combiner re-sends the whole prefix. Caches are only caches.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Session:
    """One sequence's KV cache. `length` is the number of tokens the cache holds."""

    cache: Any
    length: int = 0
    last_used: float = field(default=0.0)


class SessionStore:
    """Sessions by id, least recently used first. Not thread-safe: the engine locks."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
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

    def create(self, session_id: str, cache: Any) -> Session:
        """A new (or replaced) session; evicts the least recently used one when full."""
        self.expire()
        self._sessions.pop(session_id, None)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
            self.evictions += 1
        s = Session(cache=cache, last_used=self._clock())
        self._sessions[session_id] = s
        return s

    def release(self, session_id: str) -> bool:
        """Drop a session; True when a live one was held."""
        self.expire()
        return self._sessions.pop(session_id, None) is not None

    def expire(self) -> None:
        """Drop sessions idle for longer than the timeout (oldest first, so stop early)."""
        cutoff = self._clock() - self.idle_timeout_s
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if s.last_used >= cutoff:
                break
            del self._sessions[sid]
            self.expirations += 1
