"""The committed gRPC stubs import on a fresh install and describe the services of the brief."""

from volkin.api.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc


def test_agent_service_has_the_block_store_calls() -> None:
    service = agent_pb2.DESCRIPTOR.services_by_name["BlockStore"]
    names = {m.name for m in service.methods}
    assert {"CreateExtent", "Read", "Write", "Flush", "Zero", "Copy"} <= names
    assert agent_pb2_grpc.BlockStoreStub is not None


def test_every_mutating_agent_request_carries_a_fencing_epoch() -> None:
    for name in ["CreateExtentRequest", "DeleteExtentRequest", "WriteRequest", "FlushRequest",
                 "ZeroRequest", "CopyRequest"]:
        fields = agent_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name
        assert "epoch" in fields, name


def test_admin_service_has_volume_snapshot_refresh_and_job_calls() -> None:
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    names = {m.name for m in service.methods}
    assert {"CreateVolume", "CreateSnapshot", "StartRefresh", "ListJobs", "PauseJob"} <= names
    assert admin_pb2_grpc.AdminStub is not None
