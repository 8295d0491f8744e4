"""The one place that translates domain errors to gRPC status codes and back.

Servers call `status_of` to answer a domain error; clients call `error_from_rpc`
to turn a peer's status back into the domain error it stood for, and
`error_from_agent` (`error_from_code` on the block data port) when the peer is an
agent: FAILED_PRECONDITION means `FencedOut` only there, because the epoch is the one
precondition an agent's block store checks. From anyone else — the admin API above
all — it is a plain `FailedPrecondition` ("volume is already real"), never a fencing
refusal.

A translated error's message is the peer's own: the code is not repeated in it
(the error's type says it), so a message that travels through several peers does
not collect "FAILED_PRECONDITION: …" once per hop.
"""

from __future__ import annotations

import grpc

from volkin import errors

_STATUS: dict[type[errors.VolkinError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    # FencedOut is a FailedPrecondition and answers its status; it reads back as
    # itself only from an agent (`error_from_agent`).
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
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
    """The domain error a peer meant by answering `code` (Unavailable for transport codes).
    Its message is `details`; a code that no domain error stands for is named after it."""
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return errors.Unavailable(details)
    error = _ERROR.get(code)
    if error is None:
        return errors.VolkinError(f"{details} ({code.name})")
    return error(details)


def error_from_agent(code: grpc.StatusCode, details: str) -> errors.VolkinError:
    """As `error_from_rpc`, for an answer from an agent: its FAILED_PRECONDITION is the
    fencing refusal (agent.fencing), `FencedOut`, which deposes the caller's term."""
    error = error_from_rpc(code, details)
    if type(error) is errors.FailedPrecondition:
        return errors.FencedOut(error.message)
    return error


_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(number: int, message: str) -> errors.VolkinError:
    """The domain error for a status code sent as its number on an agent's block data port
    (`volkin.blockwire`): an agent's answer, so as `error_from_agent`."""
    code = _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
    return error_from_agent(code, message)
