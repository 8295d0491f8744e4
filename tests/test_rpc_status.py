"""Domain errors and gRPC status codes translate both ways in one table."""

from __future__ import annotations

import grpc
import pytest

from volkin import errors
from volkin.rpc_status import error_from_agent, error_from_code, error_from_rpc, status_of


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
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


def test_failed_precondition_from_the_admin_api_is_not_a_fencing_refusal() -> None:
    back = error_from_rpc(grpc.StatusCode.FAILED_PRECONDITION, "volume 'v' is already real")
    assert type(back) is errors.FailedPrecondition
    assert not isinstance(back, errors.FencedOut)


def test_failed_precondition_from_an_agent_is_its_fencing_refusal_on_both_ports() -> None:
    assert status_of(errors.FencedOut("epoch 1 is older")) == grpc.StatusCode.FAILED_PRECONDITION
    assert type(error_from_agent(grpc.StatusCode.FAILED_PRECONDITION, "old")) is errors.FencedOut
    number = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert type(error_from_code(number, "old")) is errors.FencedOut
    assert type(error_from_agent(grpc.StatusCode.NOT_FOUND, "x")) is errors.NotFound


def test_a_translated_message_does_not_repeat_the_status_code() -> None:
    back = error_from_rpc(grpc.StatusCode.FAILED_PRECONDITION, "volume 'v' is already real")
    assert back.message == "volume 'v' is already real"
    # An agent's message that went through a peer agent first: one code, none in the text.
    peer = error_from_agent(grpc.StatusCode.NOT_FOUND, "peer agent a2: no extent e1")
    relayed = error_from_agent(grpc.StatusCode.NOT_FOUND, f"agent a1 could not copy: "
                                                          f"{peer.message}")
    assert "NOT_FOUND" not in relayed.message
    unknown = error_from_rpc(grpc.StatusCode.UNIMPLEMENTED, "no such method")
    assert unknown.message == "no such method (UNIMPLEMENTED)"
