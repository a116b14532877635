"""The straggler bound and suspects (router_service/stragglers.py), without processes: when a call is
overdue for its size, how one freeze or a lasting slowdown moves the bound, and how long a replica
stays a suspect; and that a suspect gets no rows while another replica is healthy."""

from __future__ import annotations

import math
import random

import pytest

from moe_serve.cluster.placement import ExpertKey
from router_service import stragglers
from router_service.fanout import Dispatcher
from router_service.planner import choose_replica
from router_service.registry import InProcessRegistry
from router_service.stragglers import FLOOR_S, MIN_SAMPLES, MULTIPLE, REFRESH_EVERY, WINDOW, StragglerWatch
from tests.helpers import FakeClock
from tests.unit.test_registry import record


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(stragglers, "time", fake)
    return fake


def test_nothing_is_overdue_before_enough_calls_were_seen() -> None:
    watch = StragglerWatch()
    for _ in range(MIN_SAMPLES - 1):
        watch.record("a", 0.01, rows=4)
    assert watch.overdue_after_s("a", 4) == math.inf
    watch.record("a", 0.01, rows=4)
    assert watch.overdue_after_s("a", 4) == FLOOR_S


def test_the_bound_is_a_multiple_of_the_p99_above_the_floor() -> None:
    watch = StragglerWatch()
    rng = random.Random(0)
    for _ in range(WINDOW):
        watch.record("fast", rng.uniform(0.001, 0.01), rows=2)
        watch.record("slow", rng.uniform(0.05, 0.2), rows=2)
    assert watch.overdue_after_s("fast", 2) == FLOOR_S  # 4 x 10 ms: the floor rules
    slow_bound = watch.overdue_after_s("slow", 2)
    assert MULTIPLE * 0.19 <= slow_bound <= MULTIPLE * 0.2


def test_one_outlier_does_not_move_the_p99_of_a_full_window() -> None:
    watch = StragglerWatch(floor_s=0.0)
    for _ in range(WINDOW - 1):
        watch.record("a", 0.1, rows=1)
    watch.record("a", 0.35, rows=1)  # under the bound (0.4 s), recorded as it is
    for _ in range(REFRESH_EVERY):  # the next refresh
        watch.record("a", 0.1, rows=1)
    assert watch.overdue_after_s("a", 1) == pytest.approx(MULTIPLE * 0.1)


def test_a_large_batch_gets_time_in_proportion_to_its_rows() -> None:
    watch = StragglerWatch()
    for _ in range(MIN_SAMPLES):
        watch.record("a", 0.05, rows=10)  # 5 ms per row
    assert watch.overdue_after_s("a", 10) == FLOOR_S
    assert watch.overdue_after_s("a", 1000) == pytest.approx(MULTIPLE * 1000 * 0.005)


def test_a_frozen_call_counts_as_its_bound_and_a_lasting_slowdown_raises_the_bound() -> None:
    watch = StragglerWatch(floor_s=0.0)
    for _ in range(MIN_SAMPLES):
        watch.record("a", 0.01, rows=1)
    assert watch.overdue_after_s("a", 1) == pytest.approx(0.04)
    watch.record("a", 30.0, rows=1)  # a 30 s freeze ends: counted as 0.04 s
    for _ in range(REFRESH_EVERY):
        watch.record("a", 0.01, rows=1)
    assert watch.overdue_after_s("a", 1) == pytest.approx(0.16)  # p99 of 25 calls: the capped freeze
    # every call now takes 1 s: each refresh raises the bound fourfold until it covers them
    bounds = []
    for _ in range(6):
        for _ in range(REFRESH_EVERY):
            watch.record("a", 1.0, rows=1)
        bounds.append(watch.overdue_after_s("a", 1))
    assert bounds[0] == pytest.approx(0.64)
    assert bounds[1] == pytest.approx(2.56)
    assert bounds[-1] == pytest.approx(MULTIPLE * 1.0)


def test_a_new_replica_starts_from_the_pooled_times() -> None:
    watch = StragglerWatch(floor_s=0.0)
    for _ in range(MIN_SAMPLES):
        watch.record("a", 0.1, rows=1)
    assert watch.overdue_after_s("new", 1) == pytest.approx(MULTIPLE * 0.1)


def test_a_suspect_is_cleared_by_an_answer_or_after_the_suspect_period(clock: FakeClock) -> None:
    watch = StragglerWatch(suspect_s=5.0)
    watch.suspect("a")
    assert watch.is_suspect("a") and not watch.is_suspect("b")
    watch.answered("a")
    assert not watch.is_suspect("a")
    watch.suspect("a")
    clock.now += 4.9
    assert watch.is_suspect("a")
    clock.now += 0.2  # nothing answered: one batch may probe it again
    assert not watch.is_suspect("a")


def test_forgotten_replicas_lose_their_times_and_suspicion() -> None:
    watch = StragglerWatch(floor_s=0.0)
    for _ in range(MIN_SAMPLES):
        watch.record("a", 1.0, rows=1)
        watch.record("b", 0.1, rows=1)
    watch.suspect("a")
    watch.keep_only({"b"})
    assert not watch.is_suspect("a")
    assert watch.overdue_after_s("a", 1) == pytest.approx(MULTIPLE * 1.0)  # the pooled p99 (a's calls in it)
    assert watch.overdue_after_s("b", 1) == pytest.approx(MULTIPLE * 0.1)


def test_a_suspect_replica_gets_no_rows_while_another_is_healthy() -> None:
    registry = InProcessRegistry()
    registry.register(record("a", [0]))
    registry.register(record("bb", [0]))
    dispatcher = Dispatcher(registry, max_attempts=3, max_message_bytes=1 << 20)
    replicas = registry.replicas(ExpertKey(0, 0))
    dispatcher.stragglers.suspect("a")
    assert dispatcher.load(replicas[0]) == math.inf
    rng = random.Random(0)
    assert {choose_replica(replicas, dispatcher.load, rng).worker_id for _ in range(50)} == {"bb"}
    dispatcher.stragglers.suspect("bb")  # every replica suspect: they are all tried
    assert {choose_replica(replicas, dispatcher.load, rng).worker_id for _ in range(50)} == {"a", "bb"}
