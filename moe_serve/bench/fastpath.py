"""Issue 22's figures: the served stack against the monolithic peer, messages per request, hop breakdown.

- Peer ratios: a served subject's T=1 p50 and tokens/s against the monolithic KServe server's
  (`bench.monolithic`), and the p50 gap in bare-echo units.
- Messages per request: every service counts the messages it writes and reads on its internal
  streams (`moe_serve.stream.messages`, by message type and direction); the bench scrapes each
  process's /metrics before and after a batch of T=1 requests and divides the messages *sent* by
  the requests (each message counted once, at its sender). The client's request and the gateway's
  reply are unary calls, one message each.
- Hop breakdown: the gateway's per-request stage durations (`moe_serve.gateway.stage.duration`) and
  the workers' expert compute time (`moe_serve.expert.compute.duration`), as deltas of their
  Prometheus sums and counts over the same batch, so every figure is a mean over those requests.

The scraping and the arithmetic are separate: everything below `probe_fast_path` is pure.
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MESSAGES_METRIC = "moe_serve_stream_messages_total"
STAGE_METRIC = "moe_serve_gateway_stage_duration_seconds"
COMPUTE_METRIC = "moe_serve_expert_compute_duration_seconds"
# the sender and receiver of each internal message type, for the report
HOPS = {
    "RouteRequest": "gateway -> router",
    "RoutePlan": "router -> gateway",
    "ComputeRequest": "router -> worker",
    "Delivery": "worker -> gateway",
    "DeliveryAck": "gateway -> worker",
    # with the router in the gateway (embedded), this answer carries the rows: worker -> gateway
    "ComputeResult": "worker -> router",
}
# unary calls outside the internal streams: one message each way per request
CLIENT_MESSAGES = {"ModelInferRequest": "client -> gateway", "ModelInferResponse": "gateway -> client"}
GATEWAY_STAGES = ("decode", "route", "collect", "combine", "encode")
# the last request's trailing messages (acks, compute results) may still be in flight when its
# answer reaches the client; they are counted once this has passed
SETTLE_S = 0.3


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: name (with its _total/_sum/_count suffix), labels, value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str) -> str:
        return dict(self.labels).get(key, "")


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition."""
    return [
        Sample(sample.name, tuple(sorted(sample.labels.items())), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape(address: str, timeout_s: float = 5.0) -> list[Sample]:
    """The samples at http://address/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        return parse_metrics(response.read().decode())


def local_address(address: str) -> str:
    """A metrics address a service announced (bound to every interface) as this machine reaches it."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "::", "[::]") else address


def sums(samples: Iterable[Sample], name: str, by: str) -> dict[str, float]:
    """Values of the samples called `name`, added up per value of label `by`."""
    totals: dict[str, float] = {}
    for sample in samples:
        if sample.name == name:
            key = sample.label(by)
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def sent_messages(samples: Iterable[Sample]) -> dict[str, float]:
    """Messages sent on the internal streams, by message type (summed over services)."""
    return sums((s for s in samples if s.label("direction") == "sent"), MESSAGES_METRIC, "message")


def received_messages(samples: Iterable[Sample]) -> dict[str, float]:
    return sums((s for s in samples if s.label("direction") == "received"), MESSAGES_METRIC, "message")


def messages_per_request(before: list[Sample], after: list[Sample], requests: int) -> dict[str, Any]:
    """Messages per request by type (with its hop), their sum with the client's two, and whether
    every message sent was also received (`unmatched`: sent minus received, per type, when not zero)."""
    sent = delta(sent_messages(before), sent_messages(after))
    received = delta(received_messages(before), received_messages(after))
    by_type = {name: {"hop": CLIENT_MESSAGES[name], "per_request": 1.0} for name in CLIENT_MESSAGES}
    for name, count in sorted(sent.items(), key=lambda item: list(HOPS).index(item[0]) if item[0] in HOPS else 99):
        if count:
            by_type[name] = {"hop": HOPS.get(name, "?"), "per_request": count / requests}
    unmatched = {name: sent.get(name, 0.0) - received.get(name, 0.0) for name in {*sent, *received}}
    return {
        "requests": requests,
        "by_type": by_type,
        "per_t1_request": sum(entry["per_request"] for entry in by_type.values()),
        "unmatched": {name: value for name, value in sorted(unmatched.items()) if value},
    }


def histogram_means(before: list[Sample], after: list[Sample], metric: str, by: str) -> dict[str, tuple[float, float]]:
    """(mean seconds, observations) per label value of a histogram, over the samples' interval."""
    total = delta(sums(before, f"{metric}_sum", by), sums(after, f"{metric}_sum", by))
    count = delta(sums(before, f"{metric}_count", by), sums(after, f"{metric}_count", by))
    return {key: (total[key] / count[key], count[key]) for key in count if count[key] > 0}


def hop_breakdown(before: list[Sample], after: list[Sample], client_ms: list[float]) -> dict[str, Any]:
    """Where a T=1 request's time went (ms, means over the batch), from the gateway's stages and the
    workers' compute. client_to_gateway: the client's mean minus the gateway's total (both directions,
    gRPC framing and protobuf); gateway_other: the gateway's total minus its named stages
    (admission, scheduling, splitting the answer)."""
    stages = histogram_means(before, after, STAGE_METRIC, "stage")
    gateway_ms = {stage: mean * 1000 for stage, (mean, _) in stages.items()}
    client_mean = statistics.fmean(client_ms)
    figures: dict[str, Any] = {
        "requests": len(client_ms),
        "client_ms": {"p50": statistics.median(client_ms), "mean": client_mean},
        "gateway_ms": gateway_ms,
    }
    if "total" in gateway_ms:
        figures["client_to_gateway_ms"] = client_mean - gateway_ms["total"]
        figures["gateway_other_ms"] = gateway_ms["total"] - sum(gateway_ms.get(s, 0.0) for s in GATEWAY_STAGES)
    compute = histogram_means(before, after, COMPUTE_METRIC, "model")
    if compute:
        seconds = sum(mean * calls for mean, calls in compute.values())
        calls = sum(calls for _, calls in compute.values())
        figures["expert_compute_ms_per_call"] = seconds / calls * 1000
        figures["expert_calls_per_request"] = calls / len(client_ms)
    return figures


def peer_ratios(served: Mapping[str, Any], monolithic: Mapping[str, Any], echo_p50_ms: float) -> dict[str, float]:
    """A served subject against the monolithic peer: T=1 p50 and tokens/s ratios, and the p50 gap in echoes."""
    served_p50, peer_p50 = served["t1_latency_ms"]["p50"], monolithic["t1_latency_ms"]["p50"]
    ratios = {
        "t1_p50_over_monolithic": served_p50 / peer_p50,
        "t1_gap_ms": served_p50 - peer_p50,
        "t1_gap_in_echoes": (served_p50 - peer_p50) / echo_p50_ms,
    }
    if "tokens_per_s" in served and "tokens_per_s" in monolithic:
        ratios["tokens_per_s_over_monolithic"] = served["tokens_per_s"] / monolithic["tokens_per_s"]
    return ratios


def peer_comparison(
    measured: Mapping[str, Mapping[str, Any]],
    served_names: Iterable[str],
    echo_p50_ms: float,
    probes: Mapping[str, Mapping[str, Any]],
    checkpoint: str,
    reference: str = "reference-eager",
) -> dict[str, Any]:
    """One checkpoint's section: every served subject, the monolithic peer and the echo, with ratios,
    messages and hops per served subject (`probes`, from probe_fast_path). The monolithic peer's own
    hop is its T=1 p50 minus the in-process block's (`reference`, the implementation it runs)."""
    served_names = list(served_names)
    names = [*served_names, "monolithic"]
    peer_p50, block_p50 = measured["monolithic"]["t1_latency_ms"]["p50"], measured[reference]["t1_latency_ms"]["p50"]
    return {
        "checkpoint": checkpoint,
        "t1_latency_ms": {name: dict(measured[name]["t1_latency_ms"]) for name in names},
        "echo_p50_ms": echo_p50_ms,
        "monolithic": {"in_process_block_p50_ms": block_p50, "client_hop_ms": peer_p50 - block_p50},
        "tokens_per_s": {name: measured[name]["tokens_per_s"] for name in names if "tokens_per_s" in measured[name]},
        "ratios": {name: peer_ratios(measured[name], measured["monolithic"], echo_p50_ms) for name in served_names},
        **{key: {name: probe[key] for name, probe in probes.items()} for key in ("messages", "hops")},
    }


def probe_fast_path(call: Callable[[], object], metrics_addresses: Iterable[str], requests: int) -> dict[str, Any]:
    """Messages per request and hop breakdown of `requests` T=1 calls (`call` sends the next one),
    from the /metrics of every process of the subject (gateway, router, workers)."""
    addresses = sorted({local_address(address) for address in metrics_addresses if address})
    for _ in range(5):  # warm: a first call after a pause is slower
        call()
    time.sleep(SETTLE_S)
    before = [sample for address in addresses for sample in scrape(address)]
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000)
    time.sleep(SETTLE_S)
    after = [sample for address in addresses for sample in scrape(address)]
    return {
        "messages": messages_per_request(before, after, requests),
        "hops": hop_breakdown(before, after, latencies),
    }
