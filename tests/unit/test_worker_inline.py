"""Where an expert worker computes a decode-sized batch: on its event loop or on its compute threads
(expert_service/servicer.py, _compute_segments), in one process with the worker's own expert store."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from expert_service.experts import ExpertStore
from expert_service.servicer import INLINE_ALL_BELOW_MS, INLINE_MAX_ROWS, ExpertWorkerServicer
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.placement import ExpertKey
from moe_serve.worker_record import WorkerRecord
from tests.helpers import save_tiny_mixtral

KEYS = [ExpertKey(0, expert) for expert in range(4)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("inline") / "tiny-mixtral")


@pytest.fixture
def servicer(checkpoint: Path):
    store = ExpertStore(Checkpoint(checkpoint), KEYS, torch.float32, torch.device("cpu"))
    servicer = ExpertWorkerServicer(store, WorkerRecord("w0", "127.0.0.1:1", tuple(KEYS)), checkpoint, 2, 1 << 20)
    threads: list[str] = []
    compute = store.compute

    def recording(key: ExpertKey, rows: torch.Tensor) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return compute(key, rows)

    store.compute = recording  # type: ignore[method-assign]
    servicer.threads = threads  # type: ignore[attr-defined]
    yield servicer
    asyncio.run(servicer.close())


def compute(
    servicer: ExpertWorkerServicer, rows_per_segment: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Outputs of one batch, what each expert computes alone, and the thread of each segment."""
    rows = torch.randn(sum(rows_per_segment), 64, generator=torch.Generator().manual_seed(len(rows_per_segment)))
    segments = list(zip(KEYS, rows_per_segment, strict=False))
    servicer.threads.clear()  # type: ignore[attr-defined]
    outputs = asyncio.run(servicer._compute_segments(segments, rows, None))
    threads = list(servicer.threads)  # type: ignore[attr-defined]
    pieces = zip(KEYS, rows.split(rows_per_segment), strict=False)
    expected = torch.cat([servicer.store.compute(key, piece) for key, piece in pieces])
    return outputs, expected, threads


def test_an_unmeasured_worker_computes_only_the_last_small_segment_on_its_loop(servicer) -> None:
    outputs, expected, threads = compute(servicer, [1, 1])
    assert torch.equal(outputs, expected)
    assert threads[0].startswith("expert-compute") and threads[1] == "MainThread"


def test_segments_faster_than_a_thread_hand_off_are_all_computed_on_the_loop(servicer) -> None:
    compute(servicer, [1])
    assert 0 < servicer._small_segment_ms < float("inf")  # measured from the first small segment
    # as the tiny model's segments measure once warm (microseconds); set, not awaited, so that a busy
    # host's slow samples cannot decide what this checks
    servicer._small_segment_ms = INLINE_ALL_BELOW_MS / 2
    outputs, expected, threads = compute(servicer, [1, 1, 2])
    assert torch.equal(outputs, expected)
    assert threads == ["MainThread"] * 3


def test_slow_small_segments_and_prefill_batches_keep_the_compute_threads(servicer) -> None:
    servicer._small_segment_ms = 5.0  # as large experts at one row: the threads compute in parallel
    _, _, threads = compute(servicer, [1, 1])
    assert threads[0].startswith("expert-compute") and threads[1] == "MainThread"
    outputs, expected, threads = compute(servicer, [INLINE_MAX_ROWS, 1])  # more rows than a decode step
    assert torch.equal(outputs, expected)
    assert all(name.startswith("expert-compute") for name in threads)
