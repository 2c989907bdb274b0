"""SessionStore: the session cap with least-recently-used eviction, idle expiry, release, and
the on_drop callback that hands every departing session's blocks back to the pool."""

import pytest

from eftmesh.logit.kvcache import BlockTable
from eftmesh.logit.sessions import Session, SessionStore


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DropRecorder:
    """A fake on_drop: records the sessions handed to it, in order."""

    def __init__(self) -> None:
        self.dropped: list[Session] = []

    def __call__(self, session: Session) -> None:
        self.dropped.append(session)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def drops() -> DropRecorder:
    return DropRecorder()


def store(clock: FakeClock, max_sessions: int = 3, idle_timeout_s: float = 10.0,
          on_drop: DropRecorder | None = None) -> SessionStore:
    if on_drop is None:
        return SessionStore(max_sessions, idle_timeout_s, clock=clock)
    return SessionStore(max_sessions, idle_timeout_s, on_drop=on_drop, clock=clock)


def test_create_then_get_returns_the_same_empty_session(clock):
    s = store(clock)
    created = s.create("a")
    got = s.get("a")
    assert got is created
    assert isinstance(got.table, BlockTable)
    assert got.table.blocks == [] and got.length == 0
    assert got.last_used == clock.now
    assert len(s) == 1


def test_sessions_own_separate_block_tables(clock):
    s = store(clock)
    a, b = s.create("a"), s.create("b")
    a.table.blocks.append(3)
    a.table.length = 2
    assert b.table.blocks == [] and b.length == 0
    assert a.length == 2


def test_get_of_an_unknown_session_is_none(clock):
    assert store(clock).get("nope") is None


def test_get_marks_the_session_as_just_used(clock):
    s = store(clock)
    s.create("a")
    clock.advance(4)
    assert s.get("a").last_used == clock.now


def test_creating_past_the_cap_evicts_the_least_recently_created(clock, drops):
    s = store(clock, max_sessions=2, on_drop=drops)
    a = s.create("a")
    clock.advance(1)
    s.create("b")
    clock.advance(1)
    s.create("c")
    assert drops.dropped == [a]
    assert s.get("a") is None
    assert s.get("b") is not None and s.get("c") is not None
    assert len(s) == 2
    assert s.evictions == 1
    assert s.expirations == 0


def test_get_refreshes_recency_so_the_least_recently_used_is_evicted(clock, drops):
    s = store(clock, max_sessions=2, on_drop=drops)
    s.create("a")
    clock.advance(1)
    b = s.create("b")
    clock.advance(1)
    assert s.get("a") is not None  # "a" is now more recently used than "b"
    clock.advance(1)
    s.create("c")
    assert drops.dropped == [b]
    assert s.get("b") is None
    assert s.get("a") is not None
    assert s.get("c") is not None
    assert s.evictions == 1


def test_recreating_an_existing_session_replaces_it_without_evicting(clock, drops):
    s = store(clock, max_sessions=2, on_drop=drops)
    old = s.create("a")
    old.table.length = 5
    s.create("b")
    new = s.create("a")
    assert new is not old
    assert drops.dropped == [old]  # the replaced session's blocks go back
    assert len(s) == 2
    assert s.evictions == 0
    assert s.get("a") is new and new.length == 0
    assert s.get("b") is not None


def test_each_creation_past_the_cap_counts_one_eviction(clock, drops):
    s = store(clock, max_sessions=1, on_drop=drops)
    created = []
    for i in range(5):
        created.append(s.create(str(i)))
        clock.advance(0.1)
    assert len(s) == 1
    assert s.evictions == 4
    assert drops.dropped == created[:4]
    assert s.get("4") is created[4]


def test_a_session_idle_longer_than_the_timeout_expires(clock, drops):
    s = store(clock, idle_timeout_s=10.0, on_drop=drops)
    a = s.create("a")
    clock.advance(10.5)
    assert s.get("a") is None
    assert drops.dropped == [a]
    assert len(s) == 0
    assert s.expirations == 1
    assert s.evictions == 0


def test_a_session_idle_exactly_the_timeout_is_kept(clock, drops):
    s = store(clock, idle_timeout_s=10.0, on_drop=drops)
    s.create("a")
    clock.advance(10.0)
    assert s.get("a") is not None
    assert s.expirations == 0
    assert drops.dropped == []


def test_use_resets_the_idle_timer(clock):
    s = store(clock, idle_timeout_s=10.0)
    s.create("a")
    for _ in range(3):
        clock.advance(8)
        assert s.get("a") is not None
    assert s.expirations == 0


def test_expiry_drops_only_the_idle_sessions(clock, drops):
    s = store(clock, max_sessions=10, idle_timeout_s=10.0, on_drop=drops)
    old = s.create("old")
    clock.advance(6)
    s.create("young")
    clock.advance(6)  # "old" idle 12 s, "young" 6 s
    s.expire()
    assert drops.dropped == [old]
    assert len(s) == 1
    assert s.expirations == 1
    assert s.get("old") is None
    assert s.get("young") is not None


def test_a_used_old_session_outlives_an_unused_younger_one(clock, drops):
    s = store(clock, max_sessions=10, idle_timeout_s=10.0, on_drop=drops)
    s.create("a")
    clock.advance(1)
    b = s.create("b")
    clock.advance(5)
    s.get("a")  # a: idle 0, b: idle 5
    clock.advance(6)  # a: idle 6, b: idle 11
    assert s.get("b") is None
    assert s.get("a") is not None
    assert s.expirations == 1
    assert drops.dropped == [b]


def test_create_expires_idle_sessions_before_evicting(clock, drops):
    s = store(clock, max_sessions=2, idle_timeout_s=10.0, on_drop=drops)
    a = s.create("a")
    b = s.create("b")
    clock.advance(11)
    s.create("c")
    assert len(s) == 1
    assert s.expirations == 2
    assert s.evictions == 0
    assert drops.dropped == [a, b]  # oldest first


def test_release_drops_a_session_once(clock, drops):
    s = store(clock, on_drop=drops)
    a = s.create("a")
    assert s.release("a") is True
    assert drops.dropped == [a]
    assert s.get("a") is None
    assert s.release("a") is False
    assert drops.dropped == [a]  # not dropped twice
    assert len(s) == 0
    assert s.evictions == 0
    assert s.expirations == 0


def test_release_of_an_unknown_session_is_false_and_drops_nothing(clock, drops):
    assert store(clock, on_drop=drops).release("never") is False
    assert drops.dropped == []


def test_release_frees_a_slot_so_nothing_is_evicted(clock, drops):
    s = store(clock, max_sessions=2, on_drop=drops)
    a = s.create("a")
    s.create("b")
    s.release("a")
    s.create("c")
    assert s.evictions == 0
    assert drops.dropped == [a]
    assert s.get("b") is not None and s.get("c") is not None


# --- evict_lru: the engine's lever when the KV pool is short ----------------------------------


def test_evict_lru_drops_the_least_recently_used_not_kept(clock, drops):
    s = store(clock, max_sessions=10, on_drop=drops)
    a = s.create("a")
    clock.advance(1)
    b = s.create("b")
    clock.advance(1)
    s.create("c")
    assert s.evict_lru(keep={"a"}) is True  # "a" is oldest but kept: "b" goes
    assert drops.dropped == [b]
    assert s.get("b") is None
    assert s.get("a") is a
    assert s.evictions == 1
    assert len(s) == 2


def test_evict_lru_follows_recency_not_creation(clock, drops):
    s = store(clock, max_sessions=10, on_drop=drops)
    a = s.create("a")
    clock.advance(1)
    b = s.create("b")
    clock.advance(1)
    s.get("a")  # now "b" is the least recently used
    assert s.evict_lru(()) is True
    assert s.evict_lru(()) is True
    assert drops.dropped == [b, a]
    assert len(s) == 0
    assert s.evictions == 2


def test_evict_lru_is_false_when_every_session_is_kept(clock, drops):
    s = store(clock, max_sessions=10, on_drop=drops)
    s.create("a")
    s.create("b")
    assert s.evict_lru(keep={"a", "b"}) is False
    assert drops.dropped == []
    assert len(s) == 2
    assert s.evictions == 0


def test_evict_lru_of_an_empty_store_is_false(clock, drops):
    s = store(clock, on_drop=drops)
    assert s.evict_lru(()) is False
    assert drops.dropped == []


def test_default_on_drop_is_a_no_op(clock):
    s = store(clock, max_sessions=1)
    s.create("a")
    s.create("b")  # evicts "a" with the default callback
    assert s.release("b") is True
    assert s.evictions == 1 and len(s) == 0


@pytest.mark.parametrize("max_sessions,idle", [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -5.0)])
def test_invalid_limits_are_refused(max_sessions, idle):
    with pytest.raises(ValueError):
        SessionStore(max_sessions, idle)
