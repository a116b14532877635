"""OpenTelemetry for every service: metrics (Prometheus /metrics port and/or OTLP) and traces (OTLP).

- Metrics: a MeterProvider per process with a Prometheus reader (text format at
  http://host:port/metrics; on by default, each service on its own port, see moe_serve.config) and
  an OTLP reader when OTEL_EXPORTER_OTLP_ENDPOINT is set.
- Traces: W3C trace context rides in gRPC metadata from the client to the gateway, and in a
  `trace_context` map inside each internal stream message (the streams are long-lived, so their
  metadata cannot carry a request's context); each hop opens its spans under it. Spans go to OTLP
  when OTEL_EXPORTER_OTLP_ENDPOINT is set; without it spans are still created but not recorded
  (unless the caller's context is sampled, or OTEL_TRACES_SAMPLER says otherwise), so propagation
  works end to end without paying for spans nobody exports.
- Telemetry never breaks serving: exporters run on their own threads; an unreachable collector is
  logged once when it fails and once when it recovers, never per request or per attempt.

Metric names follow OpenTelemetry conventions (dot-separated, unit in the unit field); the
Prometheus exporter turns `moe_serve.request.duration` (s) into `moe_serve_request_duration_seconds`
and counters into `..._total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from moe_serve.runtime.errors import ConfigurationError, MoEServeError
from moe_serve.runtime.outage import OutageLog

logger = logging.getLogger(__name__)
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
# seconds; the default OpenTelemetry buckets are sized for milliseconds
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class _OutageAwareSpanExporter(SpanExporter):
    """Wraps an exporter: a failing collector is logged once, and again once when it recovers."""

    def __init__(self, inner: SpanExporter, outage: OutageLog) -> None:
        self.inner, self.outage = inner, outage

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.outage.outcome(result == SpanExportResult.SUCCESS, "span export failed")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _OutageAwareMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, outage: OutageLog) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality, preferred_aggregation=inner._preferred_aggregation
        )
        self.inner, self.outage = inner, outage

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self.outage.outcome(result == MetricExportResult.SUCCESS, "metric export failed")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class WireBytes:
    """`moe_serve.wire.bytes`: tensor data bytes one service sent and received, by hop and direction
    (counted from tensor shapes; message headers, under 1% of a large message, are not counted)."""

    def __init__(self, meter: Meter, service: str) -> None:
        self.service = service
        self._counter = meter.create_counter(
            "moe_serve.wire.bytes", unit="By", description="Tensor data bytes sent and received, by hop"
        )

    def __call__(self, hop: str, direction: str, size: int) -> None:
        self._counter.add(size, {"service": self.service, "hop": hop, "direction": direction})


class StreamMessages:
    """Messages this process wrote to and read from its internal streams (`moe_serve.runtime.streams`), by
    message type (RouteRequest, RoutePlan, ComputeRequest, ...) and direction ("sent", "received").

    A locked dict increment per message (well under a microsecond), not an OpenTelemetry counter
    call (several microseconds, on every hop of every request); the first Telemetry of the process
    with an exporter reports it as the observable counter `moe_serve.stream.messages`.
    """

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()  # the exporters read from their own threads
        self._exported = False

    def claim_export(self) -> bool:
        """True once per process: the counts are process-wide, and two Telemetry objects in one
        process (an embedded service) share the Prometheus registry, so a second export would
        count every message twice."""
        with self._lock:
            claimed, self._exported = not self._exported, True
            return claimed

    def count(self, message: object, direction: str) -> None:
        key = (type(message).__name__, direction)
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


# one per process: the streams count into it wherever they are opened
STREAM_MESSAGES = StreamMessages()


def record_soon(record: Callable[..., None], *args: object) -> None:
    """Record a metric off the request's critical path: on an event loop, after the current step
    (which writes the reply; an OpenTelemetry record costs 15-25 us, measured); elsewhere (a compute
    thread, which the reply does not wait for), at once. A scrape still counts it (_ScrapeBarrier)."""
    try:
        asyncio.get_running_loop().call_soon(record, *args)
    except RuntimeError:
        record(*args)


class _ScrapeBarrier:
    """A Prometheus collector, registered before the OpenTelemetry one, that lets the service's event
    loop run what it has queued before a scrape reads the meters.

    The services record a request's figures with `record_soon`, after its answer is on its way: off
    the critical path. Without this, a client that scrapes right after its answer could find the request
    not counted yet. The scrape thread waits (bounded) for a no-op queued behind those records."""

    WAIT_S = 0.5  # a loop busy longer than this is reported as it stands, not waited for

    def __init__(self) -> None:
        # None: not built inside a service's loop, where record_soon defers nothing
        self._loop = _running_loop()

    def describe(self) -> list[Any]:
        return []  # names nothing, so registering it does not collect

    def collect(self) -> list[Any]:
        loop = self._loop
        if loop is None or loop.is_closed() or loop is _running_loop():
            return []  # on the loop's own thread, waiting for it would only delay the scrape
        drained = threading.Event()
        try:
            loop.call_soon_threadsafe(drained.set)
        except RuntimeError:  # closed meanwhile
            return []
        drained.wait(self.WAIT_S)
        return []


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Telemetry:
    """The meter and tracer of one service process.

    metrics_port: serve Prometheus text on this port (0 picks a free one; None: no endpoint).
    """

    def __init__(self, service_name: str, metrics_port: int | None = None, host: str = "0.0.0.0") -> None:
        self.service_name = service_name
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
        readers: list[Any] = []
        self.metrics_address: str | None = None
        self._scrape_barrier: _ScrapeBarrier | None = None
        if metrics_port is not None:
            readers.append(self._prometheus_reader(host, metrics_port))
        if metrics_endpoint := _otlp_endpoint("METRICS"):
            readers.append(self._otlp_metric_reader(metrics_endpoint))
        traces_endpoint = _otlp_endpoint("TRACES")
        sampler = _default_sampler(traces_endpoint)
        # False: a span outside a caller's sampled trace is never recorded, so callers may skip it
        self.samples_roots = sampler is None
        self.tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        # nothing reads the metrics (--no-metrics, no OTLP): the no-op meter records nothing, where the
        # SDK's would still build and dispatch every measurement (about 4% of a T=1 request's CPU)
        self.meter_provider: MeterProvider | NoOpMeterProvider = (
            MeterProvider(metric_readers=readers, resource=resource) if readers else NoOpMeterProvider()
        )
        if traces_endpoint:
            self._add_otlp_spans(traces_endpoint)
        self.meter: Meter = self.meter_provider.get_meter("moe_serve")
        self.tracer: Tracer = self.tracer_provider.get_tracer("moe_serve")
        if readers and STREAM_MESSAGES.claim_export():
            self.meter.create_observable_counter(
                "moe_serve.stream.messages",
                [self._observe_stream_messages],
                unit="{message}",
                description="Messages on the internal streams, by message type and direction (sent / received)",
            )

    def _observe_stream_messages(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(count, {"service": self.service_name, "message": message, "direction": direction})
            for (message, direction), count in STREAM_MESSAGES.snapshot().items()
        ]

    def _prometheus_reader(self, host: str, port: int) -> Any:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import REGISTRY, start_http_server

        try:
            server, _ = start_http_server(port, addr=host)
        except OSError as error:
            raise ConfigurationError(
                f"{self.service_name}: cannot serve metrics on {host}:{port} ({error.strerror}); "
                "give another --metrics-port (0 = any free port) or --no-metrics"
            ) from None
        self._scrape_barrier = _ScrapeBarrier()
        REGISTRY.register(self._scrape_barrier)  # before the reader's collector: collected in order
        reader = PrometheusMetricReader()
        self.metrics_address = f"{host}:{server.server_port}"
        logger.info("%s metrics at http://%s/metrics", self.service_name, self.metrics_address)
        return reader

    def _otlp_metric_reader(self, endpoint: str) -> Any:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        _quiet_otlp_exporter_logs()
        exporter = _OutageAwareMetricExporter(
            OTLPMetricExporter(timeout=_otlp_timeout_s("METRICS")),
            OutageLog(f"{self.service_name} OTLP metrics to {endpoint}"),
        )
        return PeriodicExportingMetricReader(exporter)

    def _add_otlp_spans(self, endpoint: str) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _quiet_otlp_exporter_logs()
        exporter = _OutageAwareSpanExporter(
            OTLPSpanExporter(timeout=_otlp_timeout_s("TRACES")),
            OutageLog(f"{self.service_name} OTLP traces to {endpoint}"),
        )
        self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

    def shutdown(self) -> None:
        """Flush what is pending (bounded by the exporters' own timeouts)."""
        self.tracer_provider.shutdown()
        if isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.shutdown()
        if barrier := self._scrape_barrier:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(barrier)
            self._scrape_barrier = None


def _otlp_endpoint(signal: str) -> str | None:
    """Where OTLP `signal` ("TRACES", "METRICS") goes: OTEL_EXPORTER_OTLP_<signal>_ENDPOINT, else
    OTEL_EXPORTER_OTLP_ENDPOINT; None: not exported. The exporters read the endpoint and its transport
    security themselves (OTEL_EXPORTER_OTLP[_<signal>]_INSECURE, _CERTIFICATE, _CLIENT_KEY,
    _CLIENT_CERTIFICATE; an https:// endpoint is TLS), so nothing here decides it."""
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get(OTLP_ENDPOINT_ENV) or None


def _otlp_timeout_s(signal: str) -> float | None:
    """5 s per export (the SDK's default is 10 s) unless OTEL_EXPORTER_OTLP[_<signal>]_TIMEOUT is set
    (None: the exporter reads it)."""
    if os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT"):
        return None
    return 5.0


def _default_sampler(endpoint: str | None) -> Sampler | None:
    """None (the SDK reads OTEL_TRACES_SAMPLER, else samples everything) when spans are exported or
    a sampler is configured; otherwise only the spans of a caller who sampled its own trace."""
    if endpoint or os.environ.get(OTEL_TRACES_SAMPLER):
        return None
    return ParentBased(ALWAYS_OFF)


def _quiet_otlp_exporter_logs() -> None:
    # the OTLP exporters log every retry; our wrappers log an outage once instead
    logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)


def child_span(tracer: Tracer, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span under the current one, or nothing when the current one is not recorded.

    Under a parent-based sampler a child of an unrecorded span is unrecorded too, so skipping it
    changes no trace; it spares the request's critical path seven span starts (about 8% of the
    gateway's CPU at T=1, profiled). Context propagation is unchanged: the current span's context
    is what goes on the wire either way.
    """
    if not trace.get_current_span().is_recording():
        return contextlib.nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes or None)


# the internal RPCs by their gRPC full names (`package.Service/Method`), as OpenTelemetry names RPC spans
ROUTE_STREAM = "moe_serve.v1.Router/RouteStream"
COMPUTE_STREAM = "moe_serve.v1.ExpertWorker/ComputeStream"
DELIVERY_STREAM = "moe_serve.v1.DeliveryService/DeliveryStream"
# codes a server span reports as an error (OpenTelemetry's gRPC conventions); a client's span, any but OK
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def rpc_attributes(full_method: str) -> dict[str, str]:
    """OpenTelemetry's RPC attributes of a gRPC method named `package.Service/Method`."""
    service, _, method = full_method.partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception reaches the caller as (one mapping: moe_serve.runtime.errors)."""
    if isinstance(error, MoEServeError):
        return error.status_code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


@contextlib.contextmanager
def rpc_span(
    tracer: Tracer, full_method: str, kind: SpanKind, context: otel_context.Context | None = None
) -> Iterator[trace.Span]:
    """A span of one call (one message of a stream) named and described as OpenTelemetry's RPC
    conventions say, ending with `rpc.grpc.status_code`: 0, or the code of the error that left it."""
    with tracer.start_as_current_span(
        full_method,
        context=context,
        kind=kind,
        attributes=rpc_attributes(full_method),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as error:
            if span.is_recording():
                code = status_code_of(error)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if kind == SpanKind.CLIENT or code in _SERVER_ERROR_CODES:
                    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {error}"))
            raise
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])


def client_span(tracer: Tracer, full_method: str) -> contextlib.AbstractContextManager[trace.Span | None]:
    """The caller's CLIENT span of an internal call, or nothing (None) when the current trace is not
    sampled: as child_span, so an unsampled request's hot path starts no span here. Asked of the
    sampled flag, not is_recording(): the router's sends run in tasks that outlive their parent span
    (router.dispatch), and an ended span no longer records."""
    if not trace.get_current_span().get_span_context().trace_flags.sampled:
        return contextlib.nullcontext()
    return rpc_span(tracer, full_method, SpanKind.CLIENT)


def inject_context(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context (W3C traceparent/tracestate) into a message's map.

    Nothing to write outside a trace (no OTLP endpoint, no client traceparent): skipped, as the
    propagators would find nothing either, at ~10 us on every hop of every request."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context a message (or request metadata) carries."""
    if not carrier:  # sent outside a trace: what the propagators return for it, without asking them
        return otel_context.Context()
    return propagate.extract(dict(carrier))


def metadata_context(metadata: Sequence[tuple[str, Any]] | None) -> otel_context.Context:
    """Trace context from gRPC invocation metadata (the client's traceparent header)."""
    return extract_context({key: value for key, value in (metadata or ()) if isinstance(value, str)})


def attach(context: otel_context.Context) -> object:
    return otel_context.attach(context)


def detach(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


def current_span() -> trace.Span:
    return trace.get_current_span()
