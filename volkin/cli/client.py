"""The connection to the controller's admin API, and the one place its errors become words.

Every call has a deadline; a failed call becomes a `CommandError` whose message is
the controller's own (it says what was wrong), prefixed with what we tried to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar, cast

import grpc

import volkin.tls
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.errors import InvalidArgument, VolkinError
from volkin.tls import Tls

ENV = "VOLKIN_CONTROLLER"
CALL_TIMEOUT = 30.0
_PROBE_TIMEOUT = 1.0
T = TypeVar("T")


# What a standby's refusal says (controller/service.py).
STANDBY = "is a standby; use the active controller"
_HANDSHAKE = "andshake"  # gRPC's "Ssl handshake failed" / "Handshake failed"


def _tls_reason(details: str) -> str:
    """The part of gRPC's handshake failure a person can act on."""
    for marks, reason in ((("BAD_SIGNATURE", "CERTIFICATE_VERIFY_FAILED", "UNKNOWN_CA"),
                           "its certificate is not signed by the CA you trust (--tls-ca)"),
                          (("CERTIFICATE_EXPIRED", "certificate has expired"),
                           "its certificate has expired"),
                          (("Peer name", "hostname", "HOSTNAME"),
                           "its certificate does not name the address you dialled")):
        if any(mark in details for mark in marks):
            return reason
    return " ".join(details.split())[-160:]


class CommandError(VolkinError):
    """The command was well formed but did not succeed (exit code 1, or `exit_code`)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def controller_address(flag: str | None, environ: Mapping[str, str]) -> str:
    """`--controller`, else VOLKIN_CONTROLLER; must be host:port."""
    address = flag or environ.get(ENV, "")
    if not address:
        raise InvalidArgument(f"no controller address: pass --controller HOST:PORT or set {ENV} "
                              "(volkin dev up prints it)")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"controller address {address!r} is not host:port")
    return address


class Controller:
    """A channel to one controller; use as a context manager."""

    def __init__(self, address: str, tls: Tls | None = None) -> None:
        self.address = address
        self.tls = tls
        self._channel = volkin.tls.channel(address, tls=tls)
        self.stub = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._channel.close()

    def call(self, what: str, method: Callable[..., T], request: object) -> T:
        """`method(request)` with a deadline; a failure raises CommandError naming `what`.
        A standby's refusal is not a failure: the call goes once more, to the active
        controller the standby names (a standby changed nothing)."""
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            leader = self._leader_instead(exc)
            if not leader:
                raise self.error(what, exc) from None
        method = self._switch(leader, method)
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise self.error(what, exc) from None

    def _leader_instead(self, exc: grpc.RpcError) -> str:
        """The active controller's admin address if `exc` is a standby's refusal and the
        standby knows who leads, else ''."""
        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE
                and STANDBY in (exc.details() or "")):
            return ""
        try:
            status = self.stub.GetClusterStatus(admin_pb2.GetClusterStatusRequest(),
                                                timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            return ""
        leader = str(status.controller.leader_admin_address)
        return leader if leader and leader != self.address else ""

    def _switch(self, address: str, method: Callable[..., T]) -> Callable[..., T]:
        """Talks to `address` from now on; returns `method` of the new channel's stub."""
        name = next(n for n, m in vars(self.stub).items() if m is method)
        self._channel.close()
        self.address = address
        self._channel = volkin.tls.channel(address, tls=self.tls)
        self.stub = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        return cast(Callable[..., T], getattr(self.stub, name))

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[admin_pb2.Job]:
        """The job's updates until it finishes, or until `timeout` seconds have passed (the
        stream then just ends); a broken stream raises CommandError."""
        try:
            yield from self.stub.WatchJob(admin_pb2.GetJobRequest(id=job_id), timeout=timeout)
        except grpc.RpcError as exc:
            if timeout is not None and isinstance(exc, grpc.Call) \
                    and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise self.error(f"watch job {job_id}", exc) from None

    def error(self, what: str, exc: grpc.RpcError) -> CommandError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        if code == grpc.StatusCode.UNAVAILABLE and _HANDSHAKE in details:
            return CommandError(f"TLS handshake with the controller at {self.address} failed: "
                                f"{_tls_reason(details)} (check --tls-ca, --tls-cert and "
                                f"--tls-key or VOLKIN_TLS_*)")
        if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details:
            if self.tls:
                return CommandError(f"the controller at {self.address} refused the TLS "
                                    f"handshake: is your certificate signed by the cluster's "
                                    f"CA and still valid? (--tls-cert or VOLKIN_TLS_CERT)")
            return CommandError(f"the controller at {self.address} closed the connection: it "
                                f"may require TLS (--tls-ca, --tls-cert and --tls-key or "
                                f"VOLKIN_TLS_*)")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                and not self._reachable():
            hint = "" if self.tls else "; if the cluster uses TLS, set VOLKIN_TLS_*"
            return CommandError(f"cannot reach the controller at {self.address}: is it running? "
                                f"(--controller or {ENV}{hint})")
        return CommandError(f"{what}: {details} ({code.name})")

    def _reachable(self) -> bool:
        # The controller answers UNAVAILABLE itself (no agent registered) over a
        # working connection; only a connection that cannot be made means "not there".
        try:
            grpc.channel_ready_future(self._channel).result(timeout=_PROBE_TIMEOUT)
            return True
        except grpc.FutureTimeoutError:
            return False
