"""Generated protobuf and gRPC modules, built from `proto/` by `python -m moe_serve.protos.generate`."""
