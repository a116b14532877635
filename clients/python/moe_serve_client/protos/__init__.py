"""KServe v2 protobuf and gRPC modules, generated from the repository's `proto/` by
`python -m moe_serve.protos.generate`; their descriptors live in a private pool (`_pool`)."""
