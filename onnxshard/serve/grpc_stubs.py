"""The KServe v2 gRPC service's generated stubs, as tritonclient ships them (``inference.GRPCInferenceService``;
the same messages tritonclient.grpc sends). Their classes name their module ``grpc_service_pb2`` (the name they
were generated under), and Ray Serve pickles request and response messages between its gRPC proxy and the
replica, so that name is made importable wherever this module is: in the proxy (which imports the servicer
function below) and in the ingress replica."""

import sys

from tritonclient.grpc import service_pb2, service_pb2_grpc

sys.modules.setdefault("grpc_service_pb2", service_pb2)

add_GRPCInferenceServiceServicer_to_server = service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
pb = service_pb2
