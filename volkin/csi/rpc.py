"""How every CSI call is answered: a domain error becomes its gRPC code and message, in
one place (`volkin.rpc_status`); anything else is logged here and answered INTERNAL, so
that a caller never sees a traceback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from volkin.errors import VolkinError
from volkin.log import event
from volkin.rpc_status import status_of

Context = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
Q = TypeVar("Q")
R = TypeVar("R")
_log = logging.getLogger("volkin.csi")


def answer(method: Callable[[S, Q, Context], Awaitable[R]]
           ) -> Callable[[S, Q, Context], Awaitable[R]]:
    @functools.wraps(method)
    async def call(self: S, request: Q, context: Context) -> R:
        try:
            return await method(self, request, context)
        except VolkinError as exc:
            code = status_of(exc)
            event(_log, "csi.refused", call=method.__name__, code=code.name, error=exc.message)
            await context.abort(code, exc.message)
            raise  # abort raises; this keeps type checkers sure nothing returns
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            _log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {exc}")
            raise
    return call
