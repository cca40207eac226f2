"""Which stage a joining worker serves: pure decisions on the swarm's state, no I/O.

Petals-style: fill the bottleneck. A stage's service is the total throughput of its live
replicas; a new worker takes the stage with the least service (ties broken by a hash of its
peer id, so many workers joining at the same instant spread out instead of piling onto stage 0).
A worker on an over-served stage moves when another stage is starved, but only the one whose
hash ranks first moves, so two replicas never swap back and forth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def _rank(peer_id: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}|{peer_id}".encode(), digest_size=8).digest(), "big")


def stage_service(num_stages: int, claims: Mapping[int, Mapping[str, float]]) -> list[float]:
    """Total announced throughput per stage (a claim with no measured throughput counts as 1)."""
    return [sum(max(t, 1e-9) for t in claims.get(s, {}).values()) for s in range(num_stages)]


def choose_stage(num_stages: int, claims: Mapping[int, Mapping[str, float]], peer_id: str) -> int:
    """The least-served stage; among equally served stages, a per-peer pseudo-random pick."""
    counts = [len(claims.get(s, {})) for s in range(num_stages)]
    low = min(counts)
    candidates = [s for s in range(num_stages) if counts[s] == low]
    return min(candidates, key=lambda s: _rank(peer_id, f"stage{s}"))


def should_move(
    num_stages: int, claims: Mapping[int, Mapping[str, float]], peer_id: str, my_stage: int
) -> int | None:
    """Return a new stage if this worker should leave ``my_stage`` to relieve a starved stage.

    Moves only when the gap in replica counts is at least 2 (moving would not just invert the
    imbalance) and this worker ranks first among its stage's replicas.
    """
    counts = [len(claims.get(s, {})) for s in range(num_stages)]
    if peer_id not in claims.get(my_stage, {}):
        counts[my_stage] += 1
    target = min(range(num_stages), key=lambda s: (counts[s], s))
    if counts[my_stage] - counts[target] < 2:
        return None
    mates: Sequence[str] = sorted(set(claims.get(my_stage, {})) | {peer_id})
    mover = min(mates, key=lambda p: _rank(p, f"move{my_stage}"))
    return target if mover == peer_id else None
