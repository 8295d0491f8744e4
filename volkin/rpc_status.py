"""The one place that translates domain errors to gRPC status codes and back.

Servers call `status_of` to answer a domain error; clients call `error_from_rpc`
to turn a peer's status back into the domain error it stood for.
"""

from __future__ import annotations

import grpc

from volkin import errors

_STATUS: dict[type[errors.VolkinError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    # Last, so that FAILED_PRECONDITION from an agent reads back as FencedOut:
    # fencing is the only precondition an agent's block store checks.
    errors.FencedOut: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StorageIOError: grpc.StatusCode.INTERNAL,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_ERROR: dict[grpc.StatusCode, type[errors.VolkinError]] = {v: k for k, v in _STATUS.items()}


def status_of(error: errors.VolkinError) -> grpc.StatusCode:
    """The status code that answers `error` (UNKNOWN for a subclass nobody mapped)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.UNKNOWN


def error_from_rpc(code: grpc.StatusCode, details: str) -> errors.VolkinError:
    """The domain error a peer meant by answering `code` (Unavailable for transport codes)."""
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return errors.Unavailable(f"{code.name}: {details}")
    return _ERROR.get(code, errors.VolkinError)(f"{code.name}: {details}")


_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(number: int, message: str) -> errors.VolkinError:
    """The domain error for a status code sent as its number (the block data protocol)."""
    code = _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
    return error_from_rpc(code, message)
