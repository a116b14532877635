"""`moe-serve bench`: the served layer against the in-process reference and a bare gRPC echo, in one run."""
