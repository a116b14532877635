"""Which registry records a router may route to.

One validation for every record, whether it came through the router's WorkerRegistry RPC or from
Redis: address syntax and port range, finite non-negative loads, experts the served model has,
the served weights' version, a known compute datatype. Records in Redis are also signed with a key
derived from the cluster secret (anyone who can write to Redis could otherwise claim every expert
and answer with anything), and a signature covers an expiry time, so an old record replayed after
its worker left is refused too. A refused record is never routed to: the caller logs it and counts
it (`RecordPolicy.rejected`, exported as `moe_serve.registry.rejected_records`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from moe_serve.cluster.placement import ExpertKey
from moe_serve.worker_record import LOAD_FIELDS, WorkerRecord

COMPUTE_DATATYPES = frozenset({"FP32", "FP16", "BF16"})
VERSION_PATTERN = re.compile(r"[0-9a-f]{16}")
HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
FIELD_TYPES = {
    "worker_id": str,
    "address": str,
    "node_id": str,
    "gpu_id": int,
    "weights_version": str,
    "compute_datatype": str,
    "load": dict,
    "metrics_address": str,
    "offload": dict,
}
# clocks of the hosts that write and read a record may disagree by this much
CLOCK_SKEW_S = 30.0


class RejectedRecord(Exception):
    """A record no router may use; `reason` is a short label (for the metric), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def valid_host(host: str) -> bool:
    """A DNS name (RFC 1123 labels, underscores allowed as container names have them) or an IP address."""
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(candidate)
        return True
    except ValueError:
        pass
    if not candidate or len(candidate) > 253 or re.fullmatch(r"[0-9.]+", candidate):
        return False  # digits and dots that are no IPv4 address, e.g. 999.999.1.1
    return all(HOST_LABEL.fullmatch(label) for label in candidate.removesuffix(".").split("."))


def address_problem(name: str, value: str) -> str | None:
    host, _, port = value.rpartition(":")
    if valid_host(host) and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"{name} must be host:port with a port in 1-65535, got {value[:80]!r}"


@dataclass
class RecordPolicy:
    """What a router accepts. Empty `known_experts` or `weights_version` skip those checks (a registry
    not tied to one model); `record_key` None accepts unsigned Redis records (--insecure-internal)."""

    known_experts: frozenset[ExpertKey] = frozenset()
    weights_version: str = ""
    record_key: bytes | None = field(default=None, repr=False)
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> records refused

    def problems(self, record: WorkerRecord, ttl_s: float = 0.0) -> list[str]:
        """Everything wrong with `record` (empty when it may be routed to)."""
        wrong_types = [name for name, kind in FIELD_TYPES.items() if not isinstance(getattr(record, name), kind)]
        if wrong_types:
            return [f"fields {', '.join(wrong_types)} have the wrong type"]
        found = []
        if not record.worker_id or len(record.worker_id) > 256 or not record.worker_id.isprintable():
            found.append("worker_id must be 1-256 printable characters")
        if problem := address_problem("address", record.address):
            found.append(problem)
        if record.metrics_address and (problem := address_problem("metrics_address", record.metrics_address)):
            found.append(problem)
        if len(record.node_id) > 256 or not record.node_id.isprintable():
            found.append("node_id must be at most 256 printable characters")
        if record.gpu_id < -1:
            found.append(f"gpu_id must be -1 (none) or a device index, got {record.gpu_id}")
        if not record.experts or any(key.layer < 0 or key.expert < 0 for key in record.experts):
            found.append("experts must name at least one (layer, expert), none negative")
        elif self.known_experts and (unknown := sorted(set(record.experts) - self.known_experts)):
            shown = ", ".join(f"{key.layer}:{key.expert}" for key in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            found.append(f"experts {shown}{more} are not experts of the served model")
        loads = [record.load.get(name, 0.0) for name in LOAD_FIELDS]
        if not all(isinstance(value, int | float) and math.isfinite(value) and value >= 0 for value in [*loads, ttl_s]):
            found.append("ttl_s and load figures must be finite and >= 0")
        if not VERSION_PATTERN.fullmatch(record.weights_version):
            found.append(f"weights_version must be 16 hex digits, got {record.weights_version[:40]!r}")
        elif self.weights_version and record.weights_version != self.weights_version:
            found.append(
                f"weights_version {record.weights_version} is not the served checkpoint's ({self.weights_version}): "
                f"the worker holds other weights"
            )
        if record.compute_datatype not in COMPUTE_DATATYPES:
            found.append(f"compute_datatype must be one of {sorted(COMPUTE_DATATYPES)}")
        return found

    def check(self, record: WorkerRecord, ttl_s: float = 0.0) -> WorkerRecord:
        """`record`, or RejectedRecord("invalid", ...) naming its problems."""
        if found := self.problems(record, ttl_s):
            raise RejectedRecord("invalid", f"record of worker {record.worker_id[:80]!r} refused: {'; '.join(found)}")
        return record

    def verify(self, text: str | bytes, worker_id: str, now: float | None = None) -> tuple[WorkerRecord, float]:
        """The record a Redis entry holds, and the wall-clock time it expires; RejectedRecord when
        it is unreadable, unsigned or wrongly signed (with a key), expired, not `worker_id`'s, or invalid."""
        now = time.time() if now is None else now
        try:
            document = json.loads(text)
            body, expires_at, signature = document["record"], float(document["expires_at"]), document["signature"]
            if not isinstance(body, str) or not isinstance(signature, str):
                raise TypeError("record and signature must be strings")
        except (ValueError, KeyError, TypeError) as error:
            raise RejectedRecord("malformed", f"entry of {worker_id!r} is not a registry record: {error}") from None
        if self.record_key is not None:
            if not hmac.compare_digest(signature, record_signature(self.record_key, body, expires_at)):
                raise RejectedRecord(
                    "bad_signature",
                    f"entry of {worker_id!r} is not signed with this cluster's secret (written by another "
                    f"stack, or by something that is not a worker of this one)",
                )
            if now > expires_at + CLOCK_SKEW_S:
                raise RejectedRecord("expired", f"entry of {worker_id!r} expired {now - expires_at:.0f} s ago")
        try:
            record = WorkerRecord.from_json(body)
        except (ValueError, KeyError, TypeError) as error:
            raise RejectedRecord("malformed", f"entry of {worker_id!r} is not a worker record: {error}") from None
        if record.worker_id != worker_id:
            raise RejectedRecord("invalid", f"entry of {worker_id!r} holds the record of {record.worker_id[:80]!r}")
        return self.check(record), expires_at


def record_signature(key: bytes, body: str, expires_at: float) -> str:
    return hmac.new(key, f"{expires_at!r}\n{body}".encode(), hashlib.sha256).hexdigest()


def signed_entry(record: WorkerRecord, key: bytes | None, ttl_s: float, now: float | None = None) -> str:
    """The Redis value of `record`: its JSON, an expiry `ttl_s` from now, and their signature
    (empty without a key, i.e. --insecure-internal)."""
    body = record.to_json()
    expires_at = round((time.time() if now is None else now) + ttl_s, 3)
    signature = "" if key is None else record_signature(key, body, expires_at)
    return json.dumps({"record": body, "expires_at": expires_at, "signature": signature})
