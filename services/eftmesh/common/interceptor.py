"""One server interceptor that maps exceptions to gRPC statuses (kserve's pattern).

It also owns the request bytes' decoding: grpc's Python server deserialises a request before
any interceptor or servicer runs, and answers a deserialiser's exception with INTERNAL
("Exception deserializing request!"). Malformed protobuf and invalid UTF-8 in a string field
are the caller's mistake, so the interceptor wraps each handler's `request_deserializer`: a
failure returns a `_BadRequest` marker instead, and the wrapped behaviour answers it with
INVALID_ARGUMENT before the servicer sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from eftmesh.common.errors import EftMeshError

log = logging.getLogger(__name__)

# The longest status message sent: messages quote caller input through `errors.quote`, and this
# is the backstop that keeps any message well inside gRPC's 8 KiB metadata limit.
MAX_DETAILS_CHARS = 1024


class _BadRequest:
    """What a request that could not be decoded deserialises to."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe_deserializer(inner: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return inner(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...: all the caller's bytes
            return _BadRequest(f"{type(exc).__name__}: {exc}")

    return deserialize


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[: MAX_DETAILS_CHARS - 40] + f"... ({len(message)} characters in all)"


def _reject_bad(request: Any, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(request, _BadRequest):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            _details(f"the request to {method} is not a valid protobuf message "
                     f"(malformed bytes or a string field that is not UTF-8): {request.reason}"),
        )


def _abort(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, EftMeshError):
        context.abort(exc.code, _details(str(exc)))
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def _is_abort(exc: BaseException, context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let it through as is.
    return type(exc) is Exception and context.code() is not None


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns `EftMeshError` into its status, undecodable requests into INVALID_ARGUMENT, and
    anything else into a logged INTERNAL."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer))
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                _reject_bad(request, context, method)
                try:
                    return inner_uu(request, context)
                except Exception as exc:  # noqa: BLE001 - this is the one place that maps all
                    if _is_abort(exc, context):
                        raise
                    _abort(exc, context, method)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                _reject_bad(request, context, method)
                try:
                    yield from inner_us(request, context)
                except Exception as exc:  # noqa: BLE001
                    if _is_abort(exc, context):
                        raise
                    _abort(exc, context, method)

            return handler._replace(unary_stream=unary_stream)

        # Client-streaming handlers (reflection): no error mapping, only the bad-bytes check.
        def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                _reject_bad(request, context, method)
                yield request

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary
            return handler._replace(stream_unary=lambda it, ctx: inner_su(checked(it, ctx), ctx))
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream
            return handler._replace(stream_stream=lambda it, ctx: inner_ss(checked(it, ctx), ctx))
        return handler
