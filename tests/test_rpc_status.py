"""Domain errors and gRPC status codes translate both ways in one table."""

from __future__ import annotations

import grpc
import pytest

from volkin import errors
from volkin.rpc_status import error_from_rpc, status_of


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FencedOut, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StorageIOError, grpc.StatusCode.INTERNAL),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
])
def test_each_domain_error_has_one_status_and_comes_back_as_itself(
        error: type[errors.VolkinError], code: grpc.StatusCode) -> None:
    assert status_of(error("what went wrong")) == code
    back = error_from_rpc(code, "what went wrong")
    assert type(back) is error
    assert "what went wrong" in back.message


def test_subclasses_take_their_parents_status_and_transport_codes_mean_unavailable() -> None:
    class LeaseGone(errors.NotFound):
        pass

    assert status_of(LeaseGone("x")) == grpc.StatusCode.NOT_FOUND
    assert status_of(errors.VolkinError("x")) == grpc.StatusCode.UNKNOWN
    assert isinstance(error_from_rpc(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"),
                      errors.Unavailable)
    assert type(error_from_rpc(grpc.StatusCode.UNKNOWN, "?")) is errors.VolkinError


def test_a_refused_state_change_is_failed_precondition_and_fencing_is_one_of_them() -> None:
    assert status_of(errors.FailedPrecondition("dependents")) == (
        grpc.StatusCode.FAILED_PRECONDITION)
    assert issubclass(errors.FencedOut, errors.FailedPrecondition)
