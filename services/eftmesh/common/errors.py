"""The exception hierarchy of eftmesh: each class carries the gRPC status it maps to.

Domain code raises these; one server interceptor (`eftmesh.common.interceptor`) turns them
into statuses. A caller's mistake is never INTERNAL: anything that is not an `EftMeshError`
is a server fault, logged with its traceback.
"""

from __future__ import annotations

import grpc


# The start of the message of an item a draining logit service refuses (UNAVAILABLE): it takes
# no new session, and the combiner starts that session on another replica (from position 0)
# instead of failing it. A wire constant: both services read it from here.
DRAINING_PREFIX = "draining:"


class EftMeshError(Exception):
    """Base class. `code` is the gRPC status the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(EftMeshError):
    """The request itself is malformed: fix the request."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EftMeshError):
    """A named thing (a session, a role) does not exist here."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(EftMeshError):
    """The request is well-formed but the server's state does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(EftMeshError):
    """A position or length beyond a limit, e.g. the model's context."""

    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(EftMeshError):
    """The server is at capacity: retry later or elsewhere. `reason` names the limit that was
    hit, for the combiner's `eftmesh.generations.rejected` (e.g. "queue_timeout")."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, *args: object, reason: str = "other") -> None:
        super().__init__(*args)
        self.reason = reason


class Unavailable(EftMeshError):
    """A dependency (an upstream logit service) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EftMeshError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(EftMeshError):
    """The caller went away."""

    code = grpc.StatusCode.CANCELLED


# How much caller input an error message may quote: enough to recognise it, never enough to
# overflow a status trailer (gRPC's default metadata limit is 8 KiB) or to flood a log.
QUOTE_LIMIT = 100


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to at most `limit` characters (plus a note of the full length).

    Every message that echoes caller input (a session id, a role name, a prompt, a stop
    string) goes through this, so a 1 MiB id gives a short message, not a trailer overflow.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'} in all)"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[: limit + 2] + "..."
