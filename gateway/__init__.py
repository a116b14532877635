"""Gateway: the public KServe v2 gRPC API, admission, capacity policy and combine."""
