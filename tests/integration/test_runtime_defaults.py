"""Process-wide defaults every service starts with: the event loop, span sampling without an
exporter, and the start-up memory settling. Unit-level; the stack tests run through all of them."""

from __future__ import annotations

import asyncio
import gc

import pytest
import ray
import uvloop
from opentelemetry import trace
from pydantic import ValidationError

from moe_serve.config import RouterSettings
from moe_serve.runtime import eventloop
from moe_serve.runtime.allocator import ARENA_TUNABLE, ray_worker_environment, settle_startup_memory
from moe_serve.runtime.telemetry import Telemetry, extract_context, inject_context

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_services_run_on_uvloop_unless_asked_for_the_standard_loop() -> None:
    chosen = eventloop.new_event_loop()
    standard = eventloop.new_event_loop("asyncio")
    try:
        assert isinstance(chosen, uvloop.Loop)
        assert not isinstance(standard, uvloop.Loop)
    finally:
        chosen.close()
        standard.close()

    async def loop_type() -> type:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    assert eventloop.run(loop_type()) is uvloop.Loop
    assert eventloop.run(loop_type(), "asyncio") is not uvloop.Loop


def test_event_loop_setting_reads_the_environment_and_refuses_unknown_loops(monkeypatch, tmp_path) -> None:
    assert RouterSettings(checkpoint=tmp_path).event_loop == "auto"
    monkeypatch.setenv("MOE_SERVE_EVENT_LOOP", "asyncio")
    assert RouterSettings(checkpoint=tmp_path).event_loop == "asyncio"
    monkeypatch.setenv("MOE_SERVE_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        RouterSettings(checkpoint=tmp_path)


def _caller_context(sampled: bool) -> dict[str, str]:
    return {"traceparent": f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-{'01' if sampled else '00'}"}


@pytest.fixture
def no_exporter(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)


def test_without_an_exporter_spans_are_not_recorded_but_the_trace_goes_on(no_exporter) -> None:
    tracer = Telemetry("test-service").tracer
    with tracer.start_as_current_span("hop", context=extract_context(_caller_context(sampled=False))) as span:
        assert not span.is_recording()
        carrier: dict[str, str] = {}
        inject_context(carrier)
    # the next hop continues the caller's trace under this hop's span
    downstream = trace.get_current_span(extract_context(carrier)).get_span_context()
    assert f"{downstream.trace_id:032x}" == CALLER_TRACE_ID
    assert downstream.span_id == span.get_span_context().span_id
    with tracer.start_as_current_span("root") as root:  # no caller context: a new, unrecorded trace
        assert not root.is_recording() and root.get_span_context().is_valid


def test_a_caller_who_samples_its_trace_is_recorded_even_without_an_exporter(no_exporter) -> None:
    tracer = Telemetry("test-service").tracer
    with tracer.start_as_current_span("hop", context=extract_context(_caller_context(sampled=True))) as span:
        assert span.is_recording()


def test_a_configured_sampler_or_exporter_records_every_span(no_exporter, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    with Telemetry("test-service").tracer.start_as_current_span("root") as span:
        assert span.is_recording()
    monkeypatch.delenv("OTEL_TRACES_SAMPLER")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # never reached: nothing ends
    telemetry = Telemetry("test-service")
    try:
        with telemetry.tracer.start_as_current_span("root") as span:
            assert span.is_recording()
    finally:
        telemetry.shutdown()


def test_settling_start_up_memory_freezes_what_start_up_allocated() -> None:
    try:
        before = gc.get_freeze_count()
        settle_startup_memory()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_ray_workers_get_the_arena_limit_beside_the_users_own_tunables() -> None:
    assert ray_worker_environment({}) == {"GLIBC_TUNABLES": ARENA_TUNABLE}
    assert ray_worker_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.tcache_count=0:{ARENA_TUNABLE}"
    }
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
    assert ray_worker_environment(chosen) == chosen  # the user's own choice stands


def test_expert_worker_processes_start_with_one_malloc_arena(fp32_stack) -> None:
    """Ray starts a worker process before our code runs in it: the limit must be in its environment."""
    pids = ray.get(fp32_stack.controller.worker_pids.remote())
    assert pids
    for pid in pids.values():
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = dict(entry.split(b"=", 1) for entry in environ.read().split(b"\0") if b"=" in entry)
        assert ARENA_TUNABLE.encode() in variables[b"GLIBC_TUNABLES"].split(b":")
