"""How the combiner treats the logit services: timeouts, retries, health checking, rejoin
and the channels' options (`UpstreamPolicy`), read by the monitor (monitor.py), the call path
(upstream.py) and the server's flags (server.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from eftmesh.combiner.deadlines import DeadlinePolicy
from eftmesh.common.serving import CHANNEL_OPTIONS
from eftmesh.common.tls import ClientTLS

# Reconnect quickly after a replica goes away (gRPC's default first back-off is 1 s).
MIN_RECONNECT_BACKOFF_MS, MAX_RECONNECT_BACKOFF_MS = 100, 2000


@dataclass(frozen=True)
class UpstreamPolicy:
    """Timeouts, retries and health checking of the logit services."""

    # How long a call may take: a margin over what the role's calls take while another live
    # replica could take its sessions over, at most --call-timeout (its cap) (deadlines.py).
    deadlines: DeadlinePolicy = DeadlinePolicy()
    # Moves of one call's sessions to another replica after UNAVAILABLE or a draining refusal.
    retries: int = 3
    # How long start-up waits for every upstream before giving up; 0 = no deadline (the
    # combiner serves NOT_SERVING meanwhile).
    connect_timeout_s: float = 0.0
    # How often replica targets are resolved again (dns:///...) and new replicas verified.
    resolve_interval_s: float = 5.0
    # How long a replica that failed a call gets no new sessions.
    replica_cooldown_s: float = 5.0
    # How often every replica's health is checked, and each check's timeout.
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    # How long a call that finds a role's only live replica gone waits for it to come back
    # (a quick restart) before failing UNAVAILABLE; calls for a role already known to have no
    # live replica fail at once.
    rejoin_wait_s: float = 1.5
    # How often start-up logs the upstreams it still waits for.
    wait_log_interval_s: float = 5.0
    # Prefix-aware routing's bound (--prefix-routing-slack; replicas.py); None: least loaded only.
    prefix_slack: int | None = 8
    # TLS to the logit services (a CA bundle, and a client certificate for mTLS); None: plaintext.
    # Unless it names one, a replica's certificate must carry its role's target host name.
    tls: ClientTLS | None = None

    def channel_options(self) -> list[tuple[str, int | str]]:
        """The logit services' channel options. `ReplicaMonitor._rejoin` waits `rejoin_wait_s`
        for a lost replica, but gRPC decides when its channel reconnects: after 100 ms, then
        1.6x longer each time (+-20%) up to the cap. At a 2 s cap a replica back after 1.0 s was
        seen at 1.44-1.66 s, past the 1.5 s default window; at a sixth of the window (250 ms),
        at 1.01-1.17 s (5 tries each)."""
        cap = int(min(MAX_RECONNECT_BACKOFF_MS, max(MIN_RECONNECT_BACKOFF_MS, self.rejoin_wait_s * 1000 / 6)))
        return [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", cap),
        ]
