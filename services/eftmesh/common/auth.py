"""Bearer tokens on a gRPC API: a server interceptor and the token file it checks against.

A call to a protected method must carry `authorization: Bearer <token>` metadata naming one of
the tokens in the file: without it (or with another scheme) it gets UNAUTHENTICATED, with a
token not in the file PERMISSION_DENIED. Other methods (health, reflection) stay open.

The file holds one token per line (blank lines and `#` comments ignored); several at once let
clients move from an old token to a new one. It is read again when it changes (its mtime,
size or inode, looked at no more than every `check_interval_s`), so updating a Kubernetes
Secret mounted as a volume rotates tokens without a restart. A file that becomes unreadable or
empty keeps the tokens last read (with a warning), so a half-written file locks nobody out.

Tokens are compared in constant time (hmac.compare_digest) and never logged or echoed.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "bearer"


def read_tokens(path: str) -> list[bytes]:
    """The tokens in a token file (one per line)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith(b"#")]


def check_token_file(path: str, flag: str) -> None:
    """Raise ValueError, naming `flag` and the file, if `path` cannot be read or holds no token."""
    try:
        tokens = read_tokens(path)
    except OSError as e:
        raise ValueError(f"cannot read {flag} {path!r}: {e.strerror or e}") from None
    if not tokens:
        raise ValueError(f"{flag} {path!r} holds no token")


class TokenFile:
    """The tokens of a file, re-read when the file changes."""

    def __init__(self, path: str, check_interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        tokens = read_tokens(path)
        if not tokens:
            raise ValueError(f"token file {path!r} holds no token")
        self._tokens = tokens
        self._checked = clock()
        log.info("bearer tokens required: %d token(s) from %s", len(tokens), path)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows symlinks: a Secret volume swaps its ..data link
        return st.st_mtime_ns, st.st_size, st.st_ino

    def tokens(self) -> list[bytes]:
        now = self._clock()
        if now - self._checked < self.check_interval_s:
            return self._tokens
        with self._lock:
            if now - self._checked >= self.check_interval_s:
                self._checked = now
                self._reload()
        return self._tokens

    def _reload(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            tokens = read_tokens(self.path)
        except OSError as e:
            log.warning("token file %s unreadable (%s): keeping the %d token(s) last read", self.path,
                        e.strerror or type(e).__name__, len(self._tokens))
            return
        if not tokens:
            log.warning("token file %s holds no token: keeping the %d token(s) last read", self.path, len(self._tokens))
            return
        self._stamp, self._tokens = stamp, tokens
        log.info("token file %s changed: %d token(s) now accepted", self.path, len(tokens))

    def accepts(self, token: bytes) -> bool:
        """Whether `token` is one of the file's, in time independent of where they differ."""
        ok = False
        for t in self.tokens():
            ok |= hmac.compare_digest(token, t)  # no short cut: every token is compared
        return ok


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The token of an `authorization: Bearer <token>` entry (gRPC metadata, or an HTTP header
    as one pair), or None."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() == SCHEME.encode() and token.strip():
            return token.strip()
        return None
    return None


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that refuses the call. The request is not deserialised."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, None, handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, None, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, None, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, handler.response_serializer)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires a bearer token from `tokens` on the methods of the `services` named
    (e.g. "eftmesh.v1.Generator"); every other method passes untouched."""

    def __init__(self, tokens: TokenFile, services: Iterable[str]) -> None:
        self.tokens = tokens
        self._prefixes = tuple(f"/{s}/" for s in services)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "this API needs 'authorization: Bearer <token>' metadata")
        if not self.tokens.accepts(token):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not accepted")
        return handler


def add_client_args(p: Any) -> None:
    """--token / --token-file of a client (default: $EFTMESH_TOKEN)."""
    p.add_argument("--token", default=None, help="bearer token sent as 'authorization: Bearer ...' (default: $EFTMESH_TOKEN; prefer --token-file, which keeps it out of the process list)")
    p.add_argument("--token-file", default=None, metavar="FILE", help="read the bearer token from this file's first line")


def client_token(a: Any, environ: dict[str, str] | None = None) -> str | None:
    if getattr(a, "token_file", None):
        tokens = read_tokens(a.token_file)
        if not tokens:
            raise ValueError(f"token file {a.token_file!r} holds no token")
        return tokens[0].decode()
    if getattr(a, "token", None):
        return a.token
    return (os.environ if environ is None else environ).get("EFTMESH_TOKEN") or None


def client_metadata(token: str | None) -> list[tuple[str, str]]:
    return [(METADATA_KEY, f"Bearer {token}")] if token else []
