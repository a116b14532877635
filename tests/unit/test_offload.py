"""The device tier of expert offloading, in one process: budget, eviction, pins, prefetch accounting, exactness."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from expert_service.experts import ExpertStore
from expert_service.offload import DeviceTier, LFUPolicy, LRUPolicy, parse_budget
from moe_serve.checkpoint import Checkpoint, ExpertWeights
from moe_serve.cluster.placement import ExpertKey
from moe_serve.runtime.errors import ConfigurationError
from tests.helpers import save_tiny_mixtral

KEYS = [ExpertKey(0, e) for e in range(8)]
SIZE = 1000


def test_budget_parsing() -> None:
    assert parse_budget(None, 8000) is None and parse_budget("", 8000) is None
    assert parse_budget("0.25", 8000) == 2000 and parse_budget("25%", 8000) == 2000 and parse_budget("1.0", 8) == 8
    assert parse_budget("512MiB", 1) == 512 * 2**20 and parse_budget("2GB", 1) == 2 * 10**9
    assert parse_budget("4096", 1) == 4096
    for bad in ("1.5", "0.0", "-3", "12 parsecs", "0%"):
        with pytest.raises(ValueError):
            parse_budget(bad, 8000)


def test_lru_and_windowed_lfu_choose_their_victims() -> None:
    lru = LRUPolicy()
    for key in (KEYS[0], KEYS[1], KEYS[2], KEYS[0]):
        lru.record_use(key)
    assert lru.victim([KEYS[0], KEYS[1], KEYS[2]]) == KEYS[1]
    now = [0.0]
    lfu = LFUPolicy(window_s=10, clock=lambda: now[0])
    for key in (KEYS[0], KEYS[0], KEYS[0], KEYS[1], KEYS[2]):
        lfu.record_use(key)
    assert lfu.victim([KEYS[0], KEYS[1], KEYS[2]]) == KEYS[1]  # fewest uses, then least recent
    now[0] = 11.0  # the old uses leave the window: expert 0 is no longer protected by them
    lfu.record_use(KEYS[1])
    lfu.record_use(KEYS[2])
    assert lfu.victim([KEYS[0], KEYS[1], KEYS[2]]) == KEYS[0]


def fake_weights(key: ExpertKey) -> ExpertWeights:
    value = float(key.expert + 1)
    return ExpertWeights("swiglu", torch.full((4, 2), value), torch.full((2, 2), value))


class CheckedPolicy(LRUPolicy):
    """LRU that also checks, at every eviction, that the victim is not being used by any thread."""

    def __init__(self, in_use: dict[ExpertKey, int], lock: threading.Lock) -> None:
        super().__init__()
        self.in_use, self.lock, self.victims = in_use, lock, 0

    def victim(self, candidates: list[ExpertKey]) -> ExpertKey:
        chosen = super().victim(candidates)
        with self.lock:
            assert self.in_use.get(chosen, 0) == 0, f"{chosen} evicted while in use"
        self.victims += 1
        return chosen


def test_budget_is_never_exceeded_and_an_expert_in_use_is_never_evicted() -> None:
    in_use: dict[ExpertKey, int] = {}
    lock = threading.Lock()
    policy = CheckedPolicy(in_use, lock)

    def slow_load(key: ExpertKey) -> ExpertWeights:
        time.sleep(random.uniform(0, 0.002))
        return fake_weights(key)

    tier = DeviceTier(3 * SIZE, slow_load, lambda key: SIZE, policy)
    errors: list[BaseException] = []
    loaders: list[threading.Thread] = []

    def start_load(load) -> None:
        thread = threading.Thread(target=load)
        loaders.append(thread)
        thread.start()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                key = rng.choice(KEYS)
                with tier.use(key) as weights:
                    with lock:
                        in_use[key] = in_use.get(key, 0) + 1
                    assert tier.used_bytes <= 3 * SIZE
                    time.sleep(rng.uniform(0, 0.0005))
                    assert float(weights.up[0, 0]) == key.expert + 1  # the right expert's weights, intact
                    with lock:
                        in_use[key] -= 1
                if rng.random() < 0.2:
                    tier.prefetch(rng.sample(KEYS, 2), start_load)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for thread in loaders:  # prefetch loads the clients started, all of them by now
        thread.join(60)
    assert not errors, errors[0]
    assert tier.peak_bytes <= 3 * SIZE and tier.used_bytes <= 3 * SIZE
    assert policy.victims > 100  # the budget forced evictions all along
    assert len(tier.resident()) <= 3
    stats = tier.stats
    assert stats.hits + stats.misses == 6 * 300
    assert stats.bytes_moved == SIZE * sum(stats.loads.values())


def test_hinted_loads_are_hits_and_a_batch_own_loads_are_misses() -> None:
    tier = DeviceTier(2 * SIZE, fake_weights, lambda key: SIZE, LRUPolicy())
    run_now = lambda load: load()  # noqa: E731 - loads inline, deterministic
    assert tier.prefetch([KEYS[0], KEYS[1]], run_now) == 2
    with tier.use(KEYS[0]), tier.use(KEYS[1]):
        pass
    assert (tier.stats.hits, tier.stats.misses) == (2, 0)
    with tier.batch([KEYS[2], KEYS[3]], run_now):
        with tier.use(KEYS[2]):
            pass
        with tier.use(KEYS[3]):
            pass
    assert (tier.stats.hits, tier.stats.misses) == (2, 2)
    # a prefetch never evicts what a batch in progress still needs: it waits for the batch to finish
    with tier.batch([KEYS[2], KEYS[3]], run_now):
        assert tier.prefetch([KEYS[4]], run_now) == 0
        assert KEYS[4] not in tier.resident()
    assert KEYS[4] in tier.resident()
    assert tier.stats.loads["hint"] == 3 and tier.stats.loads["lookahead"] == 2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-offload")


def test_an_offloaded_store_computes_exactly_what_a_resident_one_does(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint(tiny_checkpoint)
    keys = [ExpertKey(layer, e) for layer in checkpoint.spec.moe_layers for e in range(8)]
    resident = ExpertStore(checkpoint, keys, torch.float32, torch.device("cpu"))
    offloaded = ExpertStore(checkpoint, keys, torch.float32, torch.device("cpu"), "0.25", "lfu")
    assert offloaded.offloading and not resident.offloading
    budget = offloaded.tier.budget_bytes
    rng = random.Random(0)
    for _ in range(60):
        key = rng.choice(keys)
        rows = torch.randn(rng.randint(1, 9), 64)
        assert torch.equal(offloaded.compute(key, rows), resident.compute(key, rows))
        assert offloaded.tier.used_bytes <= budget
    assert len(offloaded.tier.resident()) <= len(keys) // 4
    assert offloaded.tier.stats.evictions > 0
    with pytest.raises(ConfigurationError, match="cannot hold one expert"):
        ExpertStore(checkpoint, keys, torch.float32, torch.device("cpu"), "100")
    resident.close()
    offloaded.close()
    checkpoint.close()


def test_forecast_learns_which_experts_follow_which_within_a_sequence() -> None:
    from router_service.prefetch import ExpertForecast

    forecast = ExpertForecast((0, 1), num_experts=8)
    # tokens that use 0 and 1 at layer 0 use 6 and 7 at layer 1; tokens on 2, 3 go to 4, 5
    for sequence in range(20):
        forecast.observe(f"s{sequence}", 0, torch.tensor([[0, 1], [2, 3]]))
        forecast.observe(f"s{sequence}", 1, torch.tensor([[6, 7], [4, 5]]))
    assert forecast.learnt_pairs > 0
    assert set(forecast.predict(0, torch.tensor([[0, 1]]))) == {ExpertKey(1, 6), ExpertKey(1, 7)}
    assert set(forecast.predict(0, torch.tensor([[2, 3]]))) == {ExpertKey(1, 4), ExpertKey(1, 5)}
    assert forecast.predict(1, torch.tensor([[6, 7]])) == []  # the last MoE layer has no next one
    # no sequence id: popularity of the next layer is the whole guess
    popular = ExpertForecast((0, 1), num_experts=8)
    for _ in range(5):
        popular.observe("", 1, torch.tensor([[3, 5]]))
    assert set(popular.predict(0, torch.tensor([[0, 1]]))) == {ExpertKey(1, 3), ExpertKey(1, 5)}
    # ids beyond the experts (a dropped slot's marker) are ignored, not an error
    popular.observe("", 0, torch.tensor([[0, 8]]))
