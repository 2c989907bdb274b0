"""SessionStore: the session cap with least-recently-used eviction, idle expiry, release."""

import pytest

from eftmesh.logit.sessions import SessionStore


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def store(clock: FakeClock, max_sessions: int = 3, idle_timeout_s: float = 10.0) -> SessionStore:
    return SessionStore(max_sessions, idle_timeout_s, clock=clock)


def test_create_then_get_returns_the_same_session_and_cache(clock):
    s = store(clock)
    created = s.create("a", cache="cache-a")
    got = s.get("a")
    assert got is created
    assert got.cache == "cache-a"
    assert got.length == 0
    assert len(s) == 1


def test_get_of_an_unknown_session_is_none(clock):
    assert store(clock).get("nope") is None


def test_creating_past_the_cap_evicts_the_least_recently_created(clock):
    s = store(clock, max_sessions=2)
    s.create("a", "ca")
    clock.advance(1)
    s.create("b", "cb")
    clock.advance(1)
    s.create("c", "cc")
    assert s.get("a") is None
    assert s.get("b") is not None and s.get("c") is not None
    assert len(s) == 2
    assert s.evictions == 1
    assert s.expirations == 0


def test_get_refreshes_recency_so_the_least_recently_used_is_evicted(clock):
    s = store(clock, max_sessions=2)
    s.create("a", "ca")
    clock.advance(1)
    s.create("b", "cb")
    clock.advance(1)
    assert s.get("a") is not None  # "a" is now more recently used than "b"
    clock.advance(1)
    s.create("c", "cc")
    assert s.get("b") is None
    assert s.get("a") is not None
    assert s.get("c") is not None
    assert s.evictions == 1


def test_recreating_an_existing_session_replaces_it_without_evicting(clock):
    s = store(clock, max_sessions=2)
    s.create("a", "old")
    s.create("b", "cb")
    s.create("a", "new")
    assert len(s) == 2
    assert s.evictions == 0
    assert s.get("a").cache == "new"
    assert s.get("b") is not None


def test_each_creation_past_the_cap_counts_one_eviction(clock):
    s = store(clock, max_sessions=1)
    for i in range(5):
        s.create(str(i), i)
        clock.advance(0.1)
    assert len(s) == 1
    assert s.evictions == 4
    assert s.get("4") is not None


def test_a_session_idle_longer_than_the_timeout_expires(clock):
    s = store(clock, idle_timeout_s=10.0)
    s.create("a", "ca")
    clock.advance(10.5)
    assert s.get("a") is None
    assert len(s) == 0
    assert s.expirations == 1
    assert s.evictions == 0


def test_a_session_idle_exactly_the_timeout_is_kept(clock):
    s = store(clock, idle_timeout_s=10.0)
    s.create("a", "ca")
    clock.advance(10.0)
    assert s.get("a") is not None
    assert s.expirations == 0


def test_use_resets_the_idle_timer(clock):
    s = store(clock, idle_timeout_s=10.0)
    s.create("a", "ca")
    for _ in range(3):
        clock.advance(8)
        assert s.get("a") is not None
    assert s.expirations == 0


def test_expiry_drops_only_the_idle_sessions(clock):
    s = store(clock, max_sessions=10, idle_timeout_s=10.0)
    s.create("old", 1)
    clock.advance(6)
    s.create("young", 2)
    clock.advance(6)  # "old" idle 12 s, "young" 6 s
    s.expire()
    assert len(s) == 1
    assert s.expirations == 1
    assert s.get("old") is None
    assert s.get("young") is not None


def test_a_used_old_session_outlives_an_unused_younger_one(clock):
    s = store(clock, max_sessions=10, idle_timeout_s=10.0)
    s.create("a", 1)
    clock.advance(1)
    s.create("b", 2)
    clock.advance(5)
    s.get("a")  # a: idle 0, b: idle 5
    clock.advance(6)  # a: idle 6, b: idle 11
    assert s.get("b") is None
    assert s.get("a") is not None
    assert s.expirations == 1


def test_create_expires_idle_sessions_before_evicting(clock):
    s = store(clock, max_sessions=2, idle_timeout_s=10.0)
    s.create("a", 1)
    s.create("b", 2)
    clock.advance(11)
    s.create("c", 3)
    assert len(s) == 1
    assert s.expirations == 2
    assert s.evictions == 0


def test_release_drops_a_session_once(clock):
    s = store(clock)
    s.create("a", "ca")
    assert s.release("a") is True
    assert s.get("a") is None
    assert s.release("a") is False
    assert len(s) == 0
    assert s.evictions == 0
    assert s.expirations == 0


def test_release_of_an_unknown_session_is_false(clock):
    assert store(clock).release("never") is False


def test_release_frees_a_slot_so_nothing_is_evicted(clock):
    s = store(clock, max_sessions=2)
    s.create("a", 1)
    s.create("b", 2)
    s.release("a")
    s.create("c", 3)
    assert s.evictions == 0
    assert s.get("b") is not None and s.get("c") is not None


@pytest.mark.parametrize("max_sessions,idle", [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -5.0)])
def test_invalid_limits_are_refused(max_sessions, idle):
    with pytest.raises(ValueError):
        SessionStore(max_sessions, idle)
