"""The descriptor pool of the KServe v2 messages (`inference.*`), apart from protobuf's default pool.

tritonclient and kserve register their own copies of the same proto package (`inference`) in the
default pool; registering ours there too fails at import with "duplicate symbol
'inference.ServerLiveRequest'", in whichever order the two are imported. A pool of our own lets
both live in one process: messages are matched on the wire by method path and field numbers,
never by pool, so our messages and theirs interoperate. Servers that describe these services by
reflection look them up here (`moe_serve.runtime.grpc_utils.reflection_pool`).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
