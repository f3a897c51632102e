"""Generated protobuf and gRPC stubs for moe_serve.v1 (scripts/gen_proto.py); never hand-edited."""
