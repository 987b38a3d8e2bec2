"""GatewayService over gRPC: the servicer (servicer.py) and the proto <-> group
conversion (convert.py).

May import services.gateway.trajectory, the generated stubs (clotho.v1) and grpc;
nothing of the HTTP side."""
