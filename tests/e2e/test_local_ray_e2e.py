"""The local Ray the search starts by default (`init_ray` with no RAY_ADDRESS): its servers listen
beyond loopback (Ray 2.60 maps a loopback node address to the machine's), so token
authentication is what keeps others out; a client without the cluster's token is refused."""

from __future__ import annotations

import os

import grpc
import pytest
import ray
from ray._private.test_utils import auth_token_grpc_metadata
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc


def _ask_gcs(metadata: tuple = ()) -> object:
    """One read-only call to the cluster's GCS, as any gRPC client on the network can make."""
    channel = grpc.insecure_channel(ray.get_runtime_context().gcs_address)
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
    try:
        return stub.GetAllNodeInfo(
            gcs_service_pb2.GetAllNodeInfoRequest(), timeout=15, metadata=metadata
        )
    finally:
        channel.close()


def test_embedded_ray_refuses_a_client_without_its_token(ray_cluster) -> None:
    assert os.environ["RAY_AUTH_MODE"] == "token"
    ((header, value),) = auth_token_grpc_metadata()  # the cluster's own token
    assert value.startswith("Bearer ") and len(value) > len("Bearer ") + 16

    for metadata in ((), ((header, "Bearer " + "0" * 32),)):  # no token, a wrong one
        with pytest.raises(grpc.RpcError) as refused:
            _ask_gcs(metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value

    # The same call with the token answers: the refusals above are the token's doing.
    reply = _ask_gcs(((header, value),))
    assert any(n.state == n.ALIVE for n in reply.node_info_list)
