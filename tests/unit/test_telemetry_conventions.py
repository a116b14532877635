"""OpenTelemetry conventions: RPC spans (names, rpc.* attributes, status codes, CLIENT spans on the caller's
side only under a recorded span), and OTLP transport security taken from the SDK's own variables."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from moe_serve.runtime.certs import write_dev_certificates
from moe_serve.runtime.errors import InvalidInput, ServiceUnavailable
from moe_serve.runtime.telemetry import ROUTE_STREAM, Telemetry, child_span, client_span, rpc_span


@pytest.fixture
def recorded() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # samples everything
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_rpc_spans_carry_the_rpc_attributes_and_the_status_code(recorded) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("test")
    with rpc_span(tracer, ROUTE_STREAM, SpanKind.SERVER):
        pass
    with pytest.raises(InvalidInput), rpc_span(tracer, ROUTE_STREAM, SpanKind.SERVER):
        raise InvalidInput("bad layer")
    with pytest.raises(ServiceUnavailable), rpc_span(tracer, ROUTE_STREAM, SpanKind.SERVER):
        raise ServiceUnavailable("no replica")
    ok, invalid, unavailable = exporter.get_finished_spans()
    for span in (ok, invalid, unavailable):
        assert span.name == "moe_serve.v1.Router/RouteStream" and span.kind == SpanKind.SERVER
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "moe_serve.v1.Router"
        assert span.attributes["rpc.method"] == "RouteStream"
    assert [s.attributes["rpc.grpc.status_code"] for s in (ok, invalid, unavailable)] == [0, 3, 14]
    # a server span is an error only for the server's own failures (OpenTelemetry's gRPC rules)
    assert [s.status.status_code for s in (ok, invalid, unavailable)] == [
        StatusCode.UNSET,
        StatusCode.UNSET,
        StatusCode.ERROR,
    ]


def test_client_spans_exist_only_under_a_recorded_span(recorded) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("test")
    with client_span(tracer, ROUTE_STREAM) as nothing:  # no recorded parent: the T=1 hot path pays nothing
        assert nothing is None
    with (
        tracer.start_as_current_span("gateway.route"),
        pytest.raises(InvalidInput),
        client_span(tracer, ROUTE_STREAM) as span,
    ):
        assert span is not None
        raise InvalidInput("refused")
    client, parent = exporter.get_finished_spans()
    assert client.kind == SpanKind.CLIENT and client.parent.span_id == parent.context.span_id
    assert client.attributes["rpc.method"] == "RouteStream" and client.attributes["rpc.grpc.status_code"] == 3
    assert client.status.status_code == StatusCode.ERROR  # for a caller every failure is an error
    with child_span(tracer, "unrecorded") as unrecorded:  # the existing rule, unchanged
        assert unrecorded is None


class TraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps the names of the spans it gets."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.names += [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def tls_collector(tmp_path: Path) -> Iterator[tuple[TraceCollector, int, Path]]:
    """An OTLP collector on the loopback that speaks TLS only (certificate for localhost by a CA of its own)."""
    files = write_dev_certificates(tmp_path / "certs", [])
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "certs" / "gateway.key").read_bytes(), files["gateway certificate"].read_bytes())]
    )
    collector = TraceCollector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield collector, port, files["public CA"]
    server.stop(0)


def test_otlp_export_honours_the_sdk_certificate_variable(tls_collector, monkeypatch) -> None:
    """OTEL_EXPORTER_OTLP_INSECURE=false and OTEL_EXPORTER_OTLP_CERTIFICATE reach the exporter: spans
    arrive at a TLS-only collector (a hard-coded insecure channel could not even connect)."""
    collector, port, ca = tls_collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"localhost:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "false")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    telemetry = Telemetry("tls-test")
    with telemetry.tracer.start_as_current_span("exported-over-tls"):
        pass
    telemetry.shutdown()  # flushes
    assert collector.names == ["exported-over-tls"]


def test_cancellation_is_reported_as_cancelled(recorded) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("test")

    async def cancelled() -> None:
        with rpc_span(tracer, ROUTE_STREAM, SpanKind.SERVER):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled())
    (span,) = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


def test_a_scrape_right_after_an_answer_counts_what_was_recorded_off_the_critical_path() -> None:
    """The services record a request's figures with call_soon once its answer is on its way; a scrape that
    arrives while the loop is still busy waits for those records instead of reporting without them."""

    def scrape(address: str) -> str:
        port = address.rpartition(":")[2]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    async def answer_then_scrape() -> str:
        telemetry = Telemetry("scrape-barrier-test", metrics_port=0, host="127.0.0.1")
        try:
            counter = telemetry.meter.create_counter("scrape_barrier_test.answers")
            loop = asyncio.get_running_loop()
            loop.call_soon(time.sleep, 0.2)  # the loop is busy with something else first
            loop.call_soon(counter.add, 1)  # the answered request's record, queued behind it
            assert telemetry.metrics_address is not None
            return await asyncio.to_thread(scrape, telemetry.metrics_address)
        finally:
            telemetry.shutdown()

    text = asyncio.run(answer_then_scrape())
    assert re.search(r"^scrape_barrier_test_answers_total\{.*\} 1\.0$", text, re.MULTILINE), text[-600:]
