"""Stage choice (sentinel.worker.stage_selection) and the throughput it uses (sentinel.worker.device)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from sentinel.model.config import ModelConfig
from sentinel.run.manifest import RunManifest
from sentinel.worker.device import DeviceError, cached_throughput, measure_throughput, resolve_device
from sentinel.worker.node import _throughput_of
from sentinel.worker.stage_selection import choose_stage, should_move


def test_fewest_replicas_first_even_against_a_slower_stage() -> None:
    claims = {0: {"a": 100.0, "b": 100.0}, 1: {"c": 5.0, "d": 5.0}, 2: {"e": 900.0}}
    assert choose_stage(3, claims, "new") == 2  # one replica, however fast, is the bottleneck of safety


def test_throughput_decides_among_equally_staffed_stages() -> None:
    claims = {0: {"a": 300.0, "b": 300.0}, 1: {"c": 50.0, "d": 80.0}, 2: {"e": 400.0, "f": 100.0}}
    assert all(choose_stage(3, claims, f"peer{i}") == 1 for i in range(20))


def test_unmeasured_claims_spread_new_peers_over_the_tied_stages() -> None:
    claims = {0: {"a": 1.0}, 1: {"b": 1.0}, 2: {"c": 1.0}, 3: {"d": 1.0}}
    picks = Counter(choose_stage(4, claims, f"peer{i}") for i in range(200))
    assert set(picks) == {0, 1, 2, 3} and min(picks.values()) > 20


def test_only_one_replica_moves_and_only_for_a_gap_of_two() -> None:
    claims = {0: {"a": 1.0, "b": 1.0, "c": 1.0}, 1: {"d": 1.0}}
    movers = [p for p in "abc" if should_move(2, claims, p, 0) == 1]
    assert len(movers) == 1
    assert should_move(2, {0: {"a": 1.0, "b": 1.0}, 1: {"d": 1.0}}, "a", 0) is None


@pytest.mark.parametrize("value", ["fast", None, True, -3, 0, float("nan"), float("inf"), [1]])
def test_hostile_throughput_in_a_claim_counts_as_unmeasured(value: object) -> None:
    assert _throughput_of({"throughput": value}) == 1.0
    assert _throughput_of({"throughput": 250}) == 250.0


def test_devices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="choose one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")


def small_manifest(d_model: int = 16) -> RunManifest:
    model = ModelConfig(vocab_size=64, seq_len=8, d_model=d_model, n_layers=3, n_heads=2, d_ff=32)
    return RunManifest(num_stages=3, model=model)


def test_measured_throughput_is_positive_tokens_per_second() -> None:
    assert measure_throughput(small_manifest(), torch.device("cpu"), budget_s=0.2) > 0


def test_throughput_is_measured_once_then_cached_per_model(tmp_path: Path) -> None:
    calls: list[int] = []

    def fake(manifest, device) -> float:
        calls.append(manifest.model.d_model)
        return 123.0 * len(calls)

    cache = tmp_path / "sub" / "tp.json"
    cpu = torch.device("cpu")
    assert cached_throughput(small_manifest(), cpu, cache, fake) == (123.0, False)
    assert cached_throughput(small_manifest(), cpu, cache, fake) == (123.0, True)
    assert cached_throughput(small_manifest(32), cpu, cache, fake) == (246.0, False)  # another model
    assert calls == [16, 32]
    cache.write_text("{not json")
    assert cached_throughput(small_manifest(), cpu, cache, fake) == (369.0, False)  # corrupt: re-measured
    assert len(json.loads(cache.read_text())) == 1


class _Records:
    """Stands in for the runtime's DHT read: key -> {peer: value} (the validator already ran)."""

    def __init__(self, by_key: dict[str, dict[str, dict]]):
        self.by_key = by_key

    async def get(self, key: str) -> dict[str, dict]:
        return self.by_key.get(key, {})


def test_a_key_claiming_several_stages_is_ignored_in_all_of_them() -> None:
    import asyncio

    from sentinel.metrics import METRICS
    from sentinel.net.view import read_stage_claims
    from sentinel.protocol.keys import stage_key

    def claim(stage: int, state: str = "ONLINE") -> dict:
        return {"run": "r", "stage": stage, "state": state, "throughput": 1.0}

    def counted() -> float:
        return METRICS.snapshot().get("sentinel_multi_stage_claims_total", {}).get("", 0.0)

    before = counted()
    records = _Records({
        stage_key("r", 0): {"sybil": claim(0), "a": claim(0), "mover": claim(0, "OFFLINE")},
        stage_key("r", 1): {"sybil": claim(1), "mover": claim(1)},
        stage_key("r", 2): {"sybil": claim(2), "b": claim(2)},
    })
    claims = asyncio.run(read_stage_claims(records, "r", 3))
    assert {s: set(c) for s, c in claims.items()} == {0: {"a", "mover"}, 1: {"mover"}, 2: {"b"}}
    assert claims[0]["mover"]["state"] == "OFFLINE"  # a worker that moved stays visible where it went
    assert counted() == before + 1  # once per key, not once per read
    asyncio.run(read_stage_claims(records, "r", 3))
    assert counted() == before + 1
