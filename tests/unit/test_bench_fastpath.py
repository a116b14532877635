"""Issue 22's bench figures without starting a process: stream message counting, the arithmetic on
scraped /metrics (messages per request, gateway stages), the peer ratios and the printed section."""

from __future__ import annotations

import asyncio

import pytest
from rich.console import Console

from moe_serve.bench.fastpath import (
    hop_breakdown,
    local_address,
    messages_per_request,
    parse_metrics,
    peer_comparison,
    peer_ratios,
)
from moe_serve.bench.report import print_fast_path_report
from moe_serve.bench.runner import BenchConfig, BenchResult
from moe_serve.runtime.streams import StreamClient
from moe_serve.runtime.telemetry import STREAM_MESSAGES, StreamMessages
from tests.unit.test_streams import Message, echo_server, open_echo


class RouteRequest:
    """Stands in for the protobuf message of that name: counting goes by type name."""


class Delivery:
    pass


def test_stream_messages_count_by_type_and_direction() -> None:
    counts = StreamMessages()
    for _ in range(3):
        counts.count(RouteRequest(), "sent")
    counts.count(Delivery(), "received")
    assert counts.snapshot() == {("RouteRequest", "sent"): 3, ("Delivery", "received"): 1}
    # process-wide counts are exported by one Telemetry only, or an embedded service would double them
    assert counts.claim_export() and not counts.claim_export()


def test_stream_client_and_server_count_every_message_once_per_end() -> None:
    async def exchange() -> None:
        async with echo_server() as address:
            client: StreamClient[Message, Message] = StreamClient(address, open_echo, 1 << 20)
            try:
                for _ in range(5):
                    await client.call(Message(0, b"x"), timeout=10)
            finally:
                await client.close()

    before = STREAM_MESSAGES.snapshot()
    asyncio.run(exchange())
    after = STREAM_MESSAGES.snapshot()
    # client and server share this process: each message is counted once sent and once received
    assert after[("Message", "sent")] - before.get(("Message", "sent"), 0) == 10
    assert after[("Message", "received")] - before.get(("Message", "received"), 0) == 10


def exposition(messages: dict[tuple[str, str, str], float], stages: dict[str, tuple[float, int]]) -> str:
    """Prometheus text as the services expose it: stream messages by service, gateway stage histograms."""
    lines = ["# TYPE moe_serve_stream_messages_total counter"]
    for (service, message, direction), value in messages.items():
        lines.append(
            f'moe_serve_stream_messages_total{{direction="{direction}",message="{message}",'
            f'service="{service}"}} {value}'
        )
    lines.append("# TYPE moe_serve_gateway_stage_duration_seconds histogram")
    for stage, (seconds, count) in stages.items():
        labels = f'model="m",stage="{stage}"'
        lines += [
            f'moe_serve_gateway_stage_duration_seconds_bucket{{{labels},le="+Inf"}} {count}',
            f"moe_serve_gateway_stage_duration_seconds_sum{{{labels}}} {seconds}",
            f"moe_serve_gateway_stage_duration_seconds_count{{{labels}}} {count}",
        ]
    return "\n".join(lines) + "\n"


def test_messages_per_request_counts_senders_and_adds_the_clients_two() -> None:
    before = parse_metrics(exposition({("gateway", "RouteRequest", "sent"): 7}, {}))
    after_counts = {
        ("gateway", "RouteRequest", "sent"): 17,
        ("router", "RouteRequest", "received"): 10,
        ("router", "RoutePlan", "sent"): 10,
        ("gateway", "RoutePlan", "received"): 10,
        ("router", "ComputeRequest", "sent"): 20,
        ("w1", "ComputeRequest", "received"): 12,
        ("w2", "ComputeRequest", "received"): 8,
        ("w1", "Delivery", "sent"): 12,
        ("w2", "Delivery", "sent"): 8,
        ("gateway", "Delivery", "received"): 19,  # one still in flight: reported as unmatched
    }
    after = parse_metrics(exposition(after_counts, {}))
    figures = messages_per_request(before, after, requests=10)
    per_request = {name: entry["per_request"] for name, entry in figures["by_type"].items()}
    assert per_request == {
        "ModelInferRequest": 1.0,
        "ModelInferResponse": 1.0,
        "RouteRequest": 1.0,
        "RoutePlan": 1.0,
        "ComputeRequest": 2.0,
        "Delivery": 2.0,
    }
    assert figures["by_type"]["Delivery"]["hop"] == "worker -> gateway"
    assert figures["per_t1_request"] == 8.0
    assert figures["unmatched"] == {"Delivery": 1.0}


def test_hop_breakdown_is_stage_means_and_the_client_remainder() -> None:
    before = parse_metrics(exposition({}, {"total": (1.0, 100), "route": (0.5, 100)}))
    stages = {
        "decode": (0.0001 * 10, 10),
        "route": (0.5 + 0.002 * 10, 110),
        "collect": (0.001 * 10, 10),
        "combine": (0.0002 * 10, 10),
        "encode": (0.0001 * 10, 10),
        "total": (1.0 + 0.004 * 10, 110),
    }
    after = parse_metrics(exposition({}, stages))
    figures = hop_breakdown(before, after, client_ms=[5.0] * 9 + [6.0])
    assert figures["gateway_ms"]["route"] == pytest.approx(2.0)
    assert figures["gateway_ms"]["total"] == pytest.approx(4.0)
    assert figures["client_ms"] == {"p50": 5.0, "mean": pytest.approx(5.1)}
    assert figures["client_to_gateway_ms"] == pytest.approx(1.1)
    assert figures["gateway_other_ms"] == pytest.approx(4.0 - 0.1 - 2.0 - 1.0 - 0.2 - 0.1)
    assert "expert_compute_ms_per_call" not in figures  # no worker scraped


def test_announced_wildcard_metrics_addresses_are_reached_on_loopback() -> None:
    assert local_address("0.0.0.0:9100") == "127.0.0.1:9100"
    assert local_address("10.0.0.5:9100") == "10.0.0.5:9100"


def latency(p50: float) -> dict[str, float]:
    return {"p50": p50, "p99": 2 * p50, "mean": p50, "count": 10}


def test_peer_ratios_and_gap_in_echoes() -> None:
    ratios = peer_ratios(
        {"t1_latency_ms": latency(5.0), "tokens_per_s": 2000.0},
        {"t1_latency_ms": latency(2.0), "tokens_per_s": 4000.0},
        echo_p50_ms=0.5,
    )
    assert ratios == {
        "t1_p50_over_monolithic": 2.5,
        "t1_gap_ms": 3.0,
        "t1_gap_in_echoes": 6.0,
        "tokens_per_s_over_monolithic": 0.5,
    }


def section(served_names: tuple[str, ...]) -> dict:
    measured = {
        **{name: {"t1_latency_ms": latency(5.0), "tokens_per_s": 2000.0} for name in served_names},
        "monolithic": {"t1_latency_ms": latency(2.0), "tokens_per_s": 4000.0},
        "reference-eager": {"t1_latency_ms": latency(1.5)},
    }
    before = parse_metrics(exposition({}, {}))
    after = parse_metrics(
        exposition({("router", "ComputeRequest", "sent"): 15}, {"total": (0.03, 10), "route": (0.02, 10)})
    )
    probe = {"messages": messages_per_request(before, after, 10), "hops": hop_breakdown(before, after, [4.0] * 10)}
    return peer_comparison(measured, served_names, 0.5, dict.fromkeys(served_names, probe), "bench-d64")


def test_a_second_served_subject_is_one_more_name() -> None:
    figures = section(("served", "served-embedded"))
    assert list(figures["ratios"]) == ["served", "served-embedded"]
    assert list(figures["t1_latency_ms"]) == ["served", "served-embedded", "monolithic"]
    assert figures["monolithic"] == {"in_process_block_p50_ms": 1.5, "client_hop_ms": 0.5}
    assert figures["messages"]["served-embedded"]["per_t1_request"] == 3.5


def test_report_prints_the_fast_path_section() -> None:
    result = BenchResult(config={"throughput_tokens": 2048}, machine={})
    result.fast_path = {"standard": section(("served",)), "thin": section(("served", "served-embedded"))}
    console = Console(record=True, width=250)
    print_fast_path_report(result, console)
    text = console.export_text()
    for expected in (
        "Fast path (issue 22)",
        "messages per T=1 request",
        "ComputeRequest",
        "route (gateway -> router -> plan)",
        "thin: served-embedded",
        "6.0",  # (5.0 - 2.0) / 0.5 echoes
    ):
        assert expected in text


def test_thin_is_a_default_section_and_fast_path_requests_must_be_positive() -> None:
    assert "thin" in BenchConfig().sections
    with pytest.raises(ValueError, match="fast_path_requests"):
        BenchConfig(fast_path_requests=0)
