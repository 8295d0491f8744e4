"""Who may do what on the admin API: identities are client certificates' common names.

With TLS every client has a certificate the cluster's CA signed (the handshake
refuses anyone else). Its common name decides the rest:

- in `tls_admins` (default `*`, every certificate): any RPC;
- else in `tls_readers` (default `*`): only the reads (`controller.service.READS`);
  a mutation is PERMISSION_DENIED;
- else: PERMISSION_DENIED for everything but the health service.

Without TLS there are no identities and everything is allowed, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from controller.service import MUTATIONS, READS, audit_name
from volkin.log import event
from volkin.tls import peer_name

Context = grpc.aio.ServicerContext[Any, Any]
ADMIN_SERVICE = "volkin.api.v1.Admin"
_audit = logging.getLogger("controller.audit")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return "*" in patterns or name in patterns


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, admins: Sequence[str], readers: Sequence[str]) -> None:
        self._admins = tuple(admins)
        self._readers = tuple(readers)

    def refusal(self, rpc: str, context: Context) -> str:
        """Why the caller may not call `rpc` ('' if it may)."""
        auth = context.auth_context()
        if not auth.get("x509_common_name") and not auth.get("x509_pem_cert"):
            return ""  # plaintext: no identities
        name = peer_name(auth)
        if _matches(name, self._admins):
            return ""
        if _matches(name, self._readers):
            if rpc in READS:
                return ""
            return (f"client certificate {name!r} may only read (tls_readers); {rpc} needs "
                    f"an identity in tls_admins")
        return f"client certificate {name!r} is in neither tls_admins nor tls_readers"

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Any, Any]]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        service, _, rpc = details.method.strip("/").rpartition("/")
        if handler is None or service != ADMIN_SERVICE:
            return handler
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                await self._check(rpc, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            streaming: Any = handler.unary_stream

            async def stream(request: Any, context: Context) -> Any:
                await self._check(rpc, context)
                async for item in streaming(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    async def _check(self, rpc: str, context: Context) -> None:
        why = self.refusal(rpc, context)
        if why:
            if rpc in MUTATIONS:  # a refused mutation is audited like any other
                event(_audit, f"audit.{audit_name(rpc)}", logging.WARNING,
                      who=peer_name(context.auth_context()), error=why,
                      result=grpc.StatusCode.PERMISSION_DENIED.name)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
