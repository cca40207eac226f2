"""Which replica a lockstep round re-syncs from (``Lockstep._resync_source``): a strict majority's
digest, else the smallest peer id's, and any replica already past the round's version."""

from __future__ import annotations

import torch

from sentinel.run.manifest import RunManifest
from sentinel.worker.lockstep import Lockstep, Snapshot
from sentinel.worker.replica import Replica


def _source(mine: str, digests: dict[str, str], ahead: list[str] | None = None) -> list[str]:
    ls = Lockstep(runtime=None, checker=None, manifest=RunManifest(), replica=Replica(stage=0), run_blocking=None,
                  replicas=None, claimants=None)
    contributions = {p: Snapshot(7, torch.zeros(1), 1, d) for p, d in digests.items()}
    return ls._resync_source(mine, contributions, ahead or [])


def test_a_replica_off_the_majority_resyncs_from_it() -> None:
    assert _source("x", {"a": "x", "b": "y", "c": "y"}) == ["b", "c"]
    assert _source("y", {"a": "x", "b": "y", "c": "y"}) == []


def test_without_a_strict_majority_the_smallest_peer_id_is_the_reference() -> None:
    # a stage of two that diverged: both end on a's state, whichever of them computes this
    assert _source("x", {"a": "x", "b": "y"}) == []
    assert _source("y", {"a": "x", "b": "y"}) == ["a"]
    assert _source("z", {"a": "x", "b": "y", "c": "z", "d": "z"}) == ["a"]


def test_replicas_past_the_version_come_first() -> None:
    assert _source("x", {"a": "x", "b": "x"}, ahead=["c"]) == ["c"]
