"""What every service process shares: the `Service` skeleton, transport and process plumbing.

- `service`: the base class of the gateway, router and worker services (start, health, drain,
  serve, stop);
- transport: `streams` (long-lived internal streams), `channels` (stub pools), `codec` (tensors
  on the wire), `transports` (how rows reach a worker: `shared_arena`, same-host
  zero-copy, or `nixl_transport`, one-sided transfers across hosts), `grpc_utils` (servers, health, reflection);
- security: `security` (cluster secret, internal and public TLS), `certs` (generating them);
- observability: `telemetry` (metrics and traces), `log_format`, `outage` (one log line per outage);
- `errors`: the one exception hierarchy and its gRPC status codes;
- process: `eventloop` (uvloop or asyncio), `allocator` (glibc malloc tuning).
"""
