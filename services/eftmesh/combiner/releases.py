"""Dropping finished sessions' KV caches on the logit services (`SessionReleases`, a part of
`upstream.GrpcScorer`).

A generation that ends releases its session on each role's replica. A replica whose Info says
`batch_release` takes the releases with the combiner's next ScoreBatch or DraftBatch there
(their `release` field): no call of their own, and dropped before that call's items need the
room. A replica's last session (no call may follow), a replica without the field (an older
service), and whatever no call has carried by the next health round go by Release calls,
sent without waiting (one for all that are due where its Info says `release_many`). Sessions
moved off a failed replica, and releases a failed call carried, are orphans: released there
once it answers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc

from eftmesh.combiner.monitor import DRAINING, LIVE
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.combiner.replicas import Replica, ReplicaSet
from eftmesh.v1 import logit_pb2

# Releases of a session moved off a replica, until one finds it gone (see _release_orphans).
ORPHAN_RELEASES = 3
# Seconds close() waits for Releases still in flight (sent without waiting, as a generation
# ends) before it closes the channels: closing them first would cancel those calls, and their
# sessions would hold KV cache on the logit services until their idle expiry.
RELEASE_FLUSH_S = 2.0


class SessionReleases:
    """The release half of `GrpcScorer`: it reads the scorer's replicas, lock and policy."""

    replicas: dict[str, ReplicaSet]
    policy: UpstreamPolicy
    _lock: threading.Lock

    def _init_releases(self) -> None:
        # (role, address) -> session id -> Release attempts: sessions moved off a replica,
        # released there once it answers again (else they would hold its KV cache until expiry)
        self._orphans: dict[tuple[str, str], dict[str, int]] = {}
        self._releasing: set[Any] = set()  # Release calls in flight (flushed by close)
        # (role, address) -> sessions to release there with its next batched call (`release`)
        self._to_release: dict[tuple[str, str], list[str]] = {}

    def _orphan(self, role: str, replica: Replica, session_id: str) -> None:
        with self._lock:
            self._orphans.setdefault((role, replica.address), {}).setdefault(session_id, 0)

    def _release_orphans(self) -> None:
        """Release, on each replica that is live again, the sessions moved off it. A call that
        hung there may still run when it wakes and re-create its session, so a session is
        released until a Release finds it gone (at most ORPHAN_RELEASES times)."""
        with self._lock:
            snapshot = {key: list(sids) for key, sids in self._orphans.items()}
        for (role, address), sids in snapshot.items():
            replica = self._replica_at(role, address)
            if replica is None:  # it left the role: nothing to release
                with self._lock:
                    self._orphans.pop((role, address), None)
                continue
            if replica.state not in (LIVE, DRAINING):
                continue
            for sid in sids:
                if self.replicas[role].pinned(sid) is replica:  # it moved back there: in use
                    with self._lock:
                        self._orphans.get((role, address), {}).pop(sid, None)
                    continue
                try:
                    fut = replica.stub.Release.future(logit_pb2.ReleaseRequest(session_id=sid),
                                                      timeout=self.policy.health_timeout_s)
                except ValueError:  # its channel was closed meanwhile
                    continue
                fut.add_done_callback(lambda f, key=(role, address), sid=sid: self._released(key, sid, f))

    def _released(self, key: tuple[str, str], sid: str, fut: Any) -> None:
        try:
            held = fut.result().released
        except (grpc.RpcError, grpc.FutureCancelledError):
            return  # not answering yet: the next round tries again
        with self._lock:
            sids = self._orphans.get(key, {})
            tries = sids.get(sid, 0) + 1
            if not held or tries >= ORPHAN_RELEASES:
                sids.pop(sid, None)
                if not sids:
                    self._orphans.pop(key, None)
            elif sid in sids:
                sids[sid] = tries

    def _after_round(self) -> None:
        self._release_orphans()
        self.flush_releases()

    def release(self, sessions: Mapping[str, str]) -> None:
        """Drop finished sessions' caches. Where the replica reads a batched call's `release`
        (Info.batch_release) and still holds other sessions, the next call there carries it
        (no call of its own, and dropped before that call's items need the room); else, or
        for a replica's last session (no call may follow), a Release call each, the pending
        ones too. What no call carried by the next health round goes then (`flush_releases`)."""
        for role, sid in sessions.items():
            replica = self.replicas[role].unpin(sid)
            if replica is None:
                continue
            if replica.batch_release and replica.sessions:
                with self._lock:
                    self._to_release.setdefault((role, replica.address), []).append(sid)
                continue
            self._send_release(replica, [*self._take_releases(role, replica), sid])

    def _take_releases(self, role: str, replica: Replica) -> list[str]:
        with self._lock:
            return self._to_release.pop((role, replica.address), [])

    def _orphan_all(self, role: str, replica: Replica, sids: list[str]) -> None:
        """A call that carried releases failed: they go the orphans' way (a Release once the
        replica answers again)."""
        for sid in sids:
            self._orphan(role, replica, sid)

    def flush_releases(self) -> None:
        """Send what no batched call has carried yet (a Release call each, or the orphans' way
        for a replica not answering): the scheduler's batch emptied, a health round, close."""
        with self._lock:
            pending, self._to_release = self._to_release, {}
        for (role, address), sids in pending.items():
            replica = self._replica_at(role, address)
            if replica is None:  # it left the role: nothing to release
                continue
            if replica.state not in (LIVE, DRAINING):
                self._orphan_all(role, replica, sids)
                continue
            self._send_release(replica, sids)

    def _replica_at(self, role: str, address: str) -> Replica | None:
        return next((r for r in self.replicas[role].replicas() if r.address == address), None)

    def _send_release(self, replica: Replica, sids: list[str]) -> None:
        """Release calls, sent without waiting: one for all of `sids` where the replica's Info
        says `release_many` (when a lockstep round's generations end together, 16 streams took
        48 calls, ~0.25 ms each on the scheduler's thread), else one each."""
        calls = [sids] if replica.release_many else [[sid] for sid in sids]
        for first, *more in calls:
            try:
                fut = replica.stub.Release.future(logit_pb2.ReleaseRequest(session_id=first, session_ids=more), timeout=5.0)
            except ValueError:  # its channel was closed meanwhile: nothing to release
                return
            # Best effort: a replica that is gone has nothing to release.
            with self._lock:
                self._releasing.add(fut)
            fut.add_done_callback(self._release_done)

    def _release_done(self, fut: Any) -> None:
        fut.exception()
        with self._lock:
            self._releasing.discard(fut)

    def _flush_and_wait(self) -> None:
        """Send the releases no call has carried, then wait at most RELEASE_FLUSH_S for the
        Releases in flight (closing the channels first would cancel them)."""
        self.flush_releases()
        deadline = time.monotonic() + RELEASE_FLUSH_S
        with self._lock:
            pending = list(self._releasing)
        for fut in pending:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 (best effort: gone, refused or timed out alike)
                pass
