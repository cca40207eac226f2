"""Which stage a joining worker serves: pure decisions on the swarm's state, no I/O.

Petals-style: fill the bottleneck. A new worker takes a stage with the fewest replicas and, among
those, the least service (total throughput of its live replicas); ties are broken by a hash of its
peer id, so many workers joining at the same instant spread out instead of piling onto stage 0.
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
    """The stage with the fewest replicas; among those, the one whose replicas announce the least
    total throughput (measured tokens/s, ``sentinel.worker.device``); then a per-peer pseudo-random pick.

    Replica count comes first, not throughput alone as in Petals: every stage needs an honest
    majority of *replicas* for screening and robust averaging, and a stage held by one fast GPU
    is one attacker away from being lost. Throughput decides among equally staffed stages.
    Equal totals (e.g. every claim unmeasured, 1.0 each) fall through to the per-peer pick.
    """
    counts = [len(claims.get(s, {})) for s in range(num_stages)]
    low = min(counts)
    candidates = [s for s in range(num_stages) if counts[s] == low]
    service = stage_service(num_stages, claims)
    least = min(service[s] for s in candidates)
    candidates = [s for s in candidates if service[s] <= least * (1 + 1e-9)]
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
