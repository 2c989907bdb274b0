"""One server interceptor that maps exceptions to gRPC statuses (kserve's pattern)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from eftmesh.common.errors import EftMeshError

log = logging.getLogger(__name__)


def _abort(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, EftMeshError):
        context.abort(exc.code, str(exc))
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def _is_abort(exc: BaseException, context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let it through as is.
    return type(exc) is Exception and context.code() is not None


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns `EftMeshError` into its status and anything else into a logged INTERNAL."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
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
                try:
                    yield from inner_us(request, context)
                except Exception as exc:  # noqa: BLE001
                    if _is_abort(exc, context):
                        raise
                    _abort(exc, context, method)

            return handler._replace(unary_stream=unary_stream)
        return handler
