"""One inference request from arrival to answer, whichever transport carried it (gRPC or REST).

Both transports hand over a KServe `ModelInferRequest` (REST builds one from its JSON and binary
body) and get a `ModelInferResponse` back, so validation, admission, deadlines, metrics,
statistics and the trace span are the same code for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer

from gateway.converters import build_infer_response, parse_infer_request
from gateway.dataplane import DataPlane
from gateway.metrics import GatewayMetrics
from gateway.shared_memory import SharedMemoryRegistry
from gateway.triton_extensions import InferenceStatistics
from moe_serve.runtime.errors import MoEServeError
from moe_serve.runtime.telemetry import attach, detach, metadata_context, record_soon, rpc_span
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2


class InferenceHandler:
    """Decodes, runs and encodes requests on the data plane; records each one's outcome."""

    def __init__(
        self,
        dataplane: DataPlane,
        default_timeout_s: float,
        metrics: GatewayMetrics,
        tracer: Tracer,
        shared_memory: SharedMemoryRegistry,
        samples_roots: bool = True,
    ) -> None:
        """`samples_roots`: False when a request outside a client's trace is never recorded
        (Telemetry.samples_roots): such a request then starts no span at all."""
        self.samples_roots = samples_roots
        self.dataplane, self.default_timeout_s, self.metrics, self.tracer = (
            dataplane,
            default_timeout_s,
            metrics,
            tracer,
        )
        self.shared_memory = shared_memory
        self.statistics = InferenceStatistics()
        dataplane.record_stages = self._record_dispatch_stages

    async def infer(
        self,
        request: kserve_pb2.ModelInferRequest,
        span_name: str,
        trace_headers: Sequence[tuple[str, Any]] | None,
        client_timeout_s: float | None,
        rpc: bool = True,
    ) -> kserve_pb2.ModelInferResponse:
        """Answer `request` within the client's timeout (seconds; None: none given) and the default.

        `trace_headers`: the call's metadata or HTTP headers, whose traceparent the span continues.
        Domain errors propagate (each transport maps them to its own status); every outcome is counted.
        `rpc`: a gRPC call, whose span carries OpenTelemetry's RPC attributes; REST's is a plain SERVER span.
        """
        arrived, status, tokens = time.monotonic(), grpc.StatusCode.OK, 0
        context = metadata_context(trace_headers)
        token = attach(context)
        # the regions the request reads and writes stay open until it is answered, even if unregistered
        shared_memory = self.shared_memory.lease()
        try:
            scope: contextlib.AbstractContextManager[Any]
            if not self.samples_roots and not trace.get_current_span(context).get_span_context().is_valid:
                # no client trace, and this one would not be sampled: a span would record nothing, yet
                # its (valid, unsampled) context would ride every internal message and start spans there
                scope = contextlib.nullcontext(trace.INVALID_SPAN)
            elif rpc:
                scope = rpc_span(self.tracer, span_name, SpanKind.SERVER)
            else:
                scope = self.tracer.start_as_current_span(span_name, kind=SpanKind.SERVER)
            with scope as span:
                model = self.dataplane.model
                inference = parse_infer_request(request, model, uuid.uuid4().hex, shared_memory)
                decoded = time.monotonic()
                # tensor bytes on the wire: what came through shared memory did not
                received = inference.hidden_states.nbytes - shared_memory.bytes_read
                record_soon(self.metrics.wire, "client_to_gateway", "received", received)
                tokens = inference.num_tokens
                span.set_attributes(
                    {"moe_serve.model": model.name, "moe_serve.layer": inference.layer, "moe_serve.tokens": tokens}
                )
                timeout = (
                    self.default_timeout_s
                    if client_timeout_s is None
                    else min(client_timeout_s, self.default_timeout_s)
                )
                result = await self.dataplane.infer(inference, timeout)
                inferred = time.monotonic()
                response = build_infer_response(request, inference, result, model, shared_memory)
                encoded = time.monotonic()
                sent = sum(t.nbytes for t in result.tensors.values()) - shared_memory.bytes_written
                # the figures are recorded once the answer is on its way: off the request's critical path
                record_soon(self._record_success, arrived, decoded, result.dispatched_at, inferred, encoded, sent)
                return response
        except MoEServeError as error:
            status = error.status_code
            if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.rejected(error.reason or "unspecified")
            raise
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            raise
        finally:
            shared_memory.release()
            detach(token)
            record_soon(self._record_outcome, status, time.monotonic() - arrived, tokens)

    def _record_outcome(self, status: grpc.StatusCode, seconds: float, tokens: int) -> None:
        succeeded = status == grpc.StatusCode.OK
        self.metrics.request_done(status.name, seconds, tokens, tokens if succeeded else 0)
        if succeeded:
            self.dataplane.window.record_request(seconds, tokens)
        else:
            self.statistics.record_failure(seconds)

    def _record_dispatch_stages(self, route_s: float, collect_s: float, combine_s: float) -> None:
        def record() -> None:
            for stage, seconds in (("route", route_s), ("collect", collect_s), ("combine", combine_s)):
                self.metrics.stage(stage, seconds)

        record_soon(record)

    def _record_success(
        self, arrived: float, decoded: float, dispatched: float, inferred: float, encoded: float, sent: int
    ) -> None:
        """decode: message to tensors; encode: tensors to message; total: the whole request here."""
        self.metrics.stage("decode", decoded - arrived)
        self.metrics.stage("encode", encoded - inferred)
        self.metrics.stage("total", encoded - arrived)
        self.metrics.wire("gateway_to_client", "sent", sent)
        self.statistics.record_success(arrived, decoded, dispatched, inferred, encoded)
