"""The soak's mixed load: concurrent KServe v2 clients sending varied requests back to back, each
OK answer checked against transformers' MoE block in process.

Request kinds, drawn at random per request:
- `plain`: output only; must succeed.
- `logits`: also asks for `router_logits`; must succeed, and both outputs are checked.
- `deadline`: a client deadline of a few milliseconds; DEADLINE_EXCEEDED is by design, an answer
  that beats it is checked like any other.
- `cancel`: cancelled by the client a few milliseconds after sending; CANCELLED is by design, an
  answer that arrives first is checked.
Any other status, for any kind, is an unexpected failure.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from moe_serve.bench.reference import ReferenceLayer
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime.grpc_utils import channel_options
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from moe_serve_client.requests import infer_request, response_tensors

KINDS = ("plain", "logits", "deadline", "cancel")
BY_DESIGN = {"deadline": "DEADLINE_EXCEEDED", "cancel": "CANCELLED"}
MAX_EXAMPLES = 5  # wrong answers and unexpected failures described in the result, at most
NORMAL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LoadMix:
    """Shares of each request kind (the rest are `plain`), token counts and fault timings."""

    max_tokens: int = 512
    logits_share: float = 0.2
    deadline_share: float = 0.08
    cancel_share: float = 0.08
    deadline_ms: tuple[float, float] = (2.0, 30.0)
    cancel_after_ms: tuple[float, float] = (0.0, 15.0)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        shares = (self.logits_share, self.deadline_share, self.cancel_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"request-kind shares must be >= 0 and sum to <= 1, got {shares}")


@dataclass
class LoadTally:
    """Outcomes per request kind: status code name -> count; OK answers that were wrong."""

    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: {kind: Counter() for kind in KINDS})
    wrong_answers: int = 0
    tokens_ok: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    unexpected_examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> int:
        return sum(counts["OK"] for counts in self.outcomes.values())

    @property
    def failed_by_design(self) -> dict[str, int]:
        return {code: self.outcomes[kind][code] for kind, code in BY_DESIGN.items()}

    @property
    def unexpected(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for kind, codes in self.outcomes.items():
            for code, count in codes.items():
                if code != "OK" and code != BY_DESIGN.get(kind):
                    counts[code] += count
        return dict(counts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed_by_design": self.failed_by_design,
            "unexpected_failures": self.unexpected,
            "wrong_answers": self.wrong_answers,
            "tokens_ok": self.tokens_ok,
            "by_kind": {kind: dict(counts) for kind, counts in self.outcomes.items()},
            "wrong_examples": self.wrong_examples,
            "unexpected_examples": self.unexpected_examples,
        }


@dataclass
class Target:
    """What the clients call and what they check against."""

    address: str
    model_name: str
    hidden_size: int
    dtype: torch.dtype
    references: dict[int, ReferenceLayer]  # MoE layer -> transformers' block and router

    @property
    def tolerance(self) -> float:
        # float32 agrees to rounding; 16-bit answers may differ by one step of their dtype
        return 1e-5 if self.dtype == torch.float32 else 1.6e-2


def build_request(
    target: Target, hidden: torch.Tensor, layer: int, outputs: tuple[str, ...]
) -> kserve_pb2.ModelInferRequest:
    return infer_request(target.model_name, hidden, layer=layer, outputs=outputs)


def check_answer(
    target: Target, response: kserve_pb2.ModelInferResponse, hidden: torch.Tensor, layer: int, logits: bool
) -> str | None:
    """None when the answer equals the reference within tolerance, else what differs."""
    tensors = response_tensors(response)
    layer_reference = target.references[layer]
    expected = {"output": layer_reference.output(hidden)}
    if logits:
        expected["router_logits"] = layer_reference.router_logits(hidden)
    for name, reference in expected.items():
        served = tensors.get(name)
        if served is None or served.shape != reference.shape:
            return f"{name}: shape {None if served is None else list(served.shape)}, expected {list(reference.shape)}"
        difference = (served.float() - reference.float()).abs()
        if not torch.all(difference <= target.tolerance * (1 + reference.float().abs())):
            return f"{name}: max |difference| {difference.max().item():.3g}"
    return None


def token_count(rng: random.Random, max_tokens: int) -> int:
    """Log-uniform over 1..max_tokens: single tokens and full prompts both come up often."""
    return min(max_tokens, int(math.exp(rng.uniform(0.0, math.log(max_tokens + 1)))))


def choose_kind(rng: random.Random, mix: LoadMix) -> str:
    draw = rng.random()
    for kind, share in (("logits", mix.logits_share), ("deadline", mix.deadline_share), ("cancel", mix.cancel_share)):
        if draw < share:
            return kind
        draw -= share
    return "plain"


def call(
    stub: kserve_grpc.GRPCInferenceServiceStub,
    request: kserve_pb2.ModelInferRequest,
    kind: str,
    mix: LoadMix,
    rng: random.Random,
) -> tuple[str, kserve_pb2.ModelInferResponse | None, str]:
    """(status code name, response when OK, error details) of one request of `kind`."""
    timeout = rng.uniform(*mix.deadline_ms) / 1000 if kind == "deadline" else NORMAL_TIMEOUT_S
    future = stub.ModelInfer.future(request, timeout=timeout)
    if kind == "cancel":
        time.sleep(rng.uniform(*mix.cancel_after_ms) / 1000)
        future.cancel()
    try:
        return "OK", future.result(), ""
    except grpc.FutureCancelledError:
        return "CANCELLED", None, ""
    except grpc.RpcError as error:
        return error.code().name, None, str(error.details())


def run_client(index: int, target: Target, mix: LoadMix, seed: int, end: float, tally: LoadTally) -> None:
    """One client: requests back to back until the monotonic time `end`."""
    rng = random.Random(seed * 1000 + index)
    generator = torch.Generator().manual_seed(seed * 1000 + index)
    layers = sorted(target.references)
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    with grpc.insecure_channel(target.address, options=options) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < end:
            kind, layer = choose_kind(rng, mix), rng.choice(layers)
            tokens = token_count(rng, mix.max_tokens)
            hidden = torch.randn(tokens, target.hidden_size, generator=generator).to(target.dtype)
            outputs = ("output", "router_logits") if kind == "logits" else ()
            code, response, details = call(stub, build_request(target, hidden, layer, outputs), kind, mix, rng)
            problem = None if response is None else check_answer(target, response, hidden, layer, kind == "logits")
            with tally.lock:
                tally.outcomes[kind][code] += 1
                what = f"{kind} request, layer {layer}, T={tokens}"
                if code == "OK":
                    tally.tokens_ok += tokens
                elif code != BY_DESIGN.get(kind) and len(tally.unexpected_examples) < MAX_EXAMPLES:
                    tally.unexpected_examples.append(f"{what}: {code} {details}")
                if problem is not None:
                    tally.wrong_answers += 1
                    if len(tally.wrong_examples) < MAX_EXAMPLES:
                        tally.wrong_examples.append(f"{what}: {problem}")


def run_load(target: Target, mix: LoadMix, clients: int, duration_s: float, seed: int) -> LoadTally:
    """`clients` threads send requests for `duration_s` seconds; returns what they saw."""
    tally = LoadTally()
    end = time.monotonic() + duration_s
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            run_client(index, target, mix, seed, end, tally)
        except BaseException as error:  # reported in the caller's thread below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,), name=f"soak-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return tally
