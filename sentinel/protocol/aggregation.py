"""Aggregation rules for averaging parameters among the replicas of one stage.

Pure tensor math, shared by the live worker and the simulator. ``mean`` is plain data-parallel
averaging; ``trimmed-mean`` and ``centered-clip`` bound what a minority of poisoned contributions
can do (the replicas of a stage trust each other no more than the verifiers trust them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


def aggregate(vectors: Sequence[torch.Tensor], rule: str = "mean", **kw: float) -> torch.Tensor:
    """Combine flat parameter vectors of equal length with ``rule``."""
    if not vectors:
        raise ValueError("nothing to aggregate")
    stacked = torch.stack([v.reshape(-1).float() for v in vectors])
    if rule == "mean":
        return stacked.mean(0)
    if rule == "trimmed-mean":
        return trimmed_mean(stacked, kw.get("trim", 0.25))
    if rule == "centered-clip":
        return centered_clip(stacked, tau=kw.get("tau", 0.0), iters=int(kw.get("iters", 3)))
    raise ValueError(f"unknown aggregation rule {rule!r}: use mean, trimmed-mean or centered-clip")


def trimmed_mean(stacked: torch.Tensor, trim: float = 0.25) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``trim`` fraction of extremes on each side."""
    n = stacked.shape[0]
    k = min(int(n * trim), (n - 1) // 2)
    if k == 0:
        return stacked.median(0).values if n > 2 else stacked.mean(0)
    s = stacked.sort(0).values
    return s[k : n - k].mean(0)


def centered_clip(stacked: torch.Tensor, tau: float = 0.0, iters: int = 3) -> torch.Tensor:
    """CenteredClip (Karimireddy et al.; BTARD): start at the coordinate-wise median, then
    repeatedly move by the mean of the clipped differences ``min(1, tau/|x_i - v|) (x_i - v)``.

    ``tau <= 0`` picks the radius adaptively as the median distance of the inputs to the start,
    so honest replicas that drifted apart are averaged while far outliers are clipped.
    """
    v = stacked.median(0).values
    if tau <= 0:
        tau = float((stacked - v).norm(dim=1).median()) or 1e-12
    for _ in range(iters):
        diff = stacked - v
        norms = diff.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = v + (diff * torch.clamp(tau / norms, max=1.0)).mean(0)
    return v


def partition(numel: int, peers: int, max_part: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` parts of a flat vector of ``numel`` for a butterfly round among
    ``peers``: at least one part per peer (each reduces its share), and as many more as needed
    so no part exceeds ``max_part`` elements (one part is one message, whatever the model's size).
    Part ``i`` belongs to peer ``i % peers`` of the group sorted by peer id, so every peer that
    sees the same group computes the same assignment without talking to the others."""
    if numel < 1 or peers < 1 or max_part < 1:
        raise ValueError(f"cannot partition {numel} elements among {peers} peers in parts of {max_part}")
    k = min(numel, max(peers, -(-numel // max_part)))
    base, extra = divmod(numel, k)
    bounds, lo = [], 0
    for i in range(k):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def same_reduction(claimed: torch.Tensor, contributions: Sequence[torch.Tensor], rule: str,
                   rtol: float = 1e-4) -> bool:
    """Whether ``claimed`` is what ``rule`` makes of ``contributions`` (an audit of a reducer).

    The reduction is deterministic for a given order of inputs, so an honest reducer's answer
    matches to rounding; the tolerance only absorbs float differences between machines. Its scale
    is the larger of the expected answer's norm and the *median* input's, in float64: never the
    largest input's, or a reducer could commit to a huge slice of its own to widen the tolerance
    until any answer passes."""
    if not contributions or claimed.shape != contributions[0].reshape(-1).shape:
        return False
    expected = aggregate(contributions, rule).double()
    norms = torch.stack([c.reshape(-1).double().norm() for c in contributions])
    scale = max(float(expected.norm()), float(norms.median()), 1e-12)
    if not (torch.isfinite(expected).all() and torch.isfinite(claimed).all()) or not math.isfinite(scale):
        return False
    return float((claimed.double() - expected).norm()) <= rtol * scale


def canonical_part(numel: int, max_part: int, lo: int, hi: int, max_peers: int = 256) -> bool:
    """Whether ``[lo, hi)`` is one of the parts :func:`partition` makes of ``numel`` for some
    group of up to ``max_peers``. Replicas sign slices only of such parts: a slice of a few
    hand-picked coordinates would let a complainer find, in an honest replica's ordinary drift,
    a handful that look like an outlier (a part is large, so its drift averages out)."""
    if not 0 <= lo < hi <= numel or max_part < 1:
        return False
    least = -(-numel // max_part)
    for k in sorted({min(numel, max(g, least)) for g in range(1, max_peers + 1)}):
        base, extra = divmod(numel, k)
        big = extra * (base + 1)
        if lo < big:
            i, r = divmod(lo, base + 1)
            size = base + 1
        else:
            i, r = divmod(lo - big, base)
            i, size = i + extra, base
        if r == 0 and i < k and hi == lo + size:
            return True
    return False


def contribution_scores(vectors: Sequence[torch.Tensor], floor: float = 0.0) -> list[float]:
    """Each contribution's distance to the coordinate-wise median of all of them, in units of
    ``max(median distance, floor * |median|)``.

    Distances are taken to the median, not to the aggregate the round uses: a plain mean is
    pulled towards a poisoned contribution, which would make honest replicas look far too.
    The ``floor`` (relative to the parameters' norm) is the spread below which replicas count
    as agreeing: right after most of a stage averaged, its replicas are nearly identical and the
    median distance collapses, so one honest replica that has not averaged yet is many
    "median distances" away while only a normal training update from the rest.
    Fewer than three contributions cannot say which one is odd: every score is 0.
    """
    if len(vectors) < 3:
        return [0.0] * len(vectors)
    stacked = torch.stack([v.reshape(-1).float() for v in vectors])
    centre = stacked.median(0).values
    dist = (stacked - centre).norm(dim=1)
    unit = max(float(dist.median()), floor * float(centre.norm()), 1e-12)
    return [float(d) / unit if math.isfinite(float(d)) else math.inf for d in dist]


def contribution_outliers(vectors: Sequence[torch.Tensor], ratio: float = 3.0, floor: float = 0.0) -> list[bool]:
    """Which contributions to one averaging round score above ``ratio``
    (:func:`contribution_scores`); ``ratio <= 0`` flags none."""
    if ratio <= 0:
        return [False] * len(vectors)
    return [s > ratio for s in contribution_scores(vectors, floor)]


@dataclass(frozen=True)
class AveragingGap:
    """How far this replica had drifted from its stage when one averaging round pulled it back."""

    step: int  # highest verifier step seen
    optimizer_steps: int  # since the previous successful round
    seconds: float  # since the previous successful round
    divergence: float  # |own - average| / |average| of the flat parameters
    peers: int


class AveragingLog:
    """Drift between rounds, kept for the node's report: replicas that drift apart look
    different to the verifiers' screen, so the largest gaps say how tight averaging keeps them."""

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep
        self.rounds = 0
        self.divergence_sum = 0.0
        self.largest: list[AveragingGap] = []
        self._last: tuple[int, float] | None = None

    def record(self, step: int, version: int, own: torch.Tensor, agg: torch.Tensor, peers: int) -> AveragingGap:
        now = time.time()
        last_version, last_time = self._last or (0, now)
        div = float((own.float() - agg).norm() / agg.norm().clamp_min(1e-12))
        gap = AveragingGap(step, version - last_version, round(now - last_time, 3), div, peers)
        self._last = (version, now)
        self.rounds += 1
        self.divergence_sum += div
        self.largest = sorted([*self.largest, gap], key=lambda g: -g.divergence)[: self.keep]
        return gap

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "divergence_mean": self.divergence_sum / self.rounds if self.rounds else 0.0,
            "largest": [asdict(g) for g in self.largest],
        }
