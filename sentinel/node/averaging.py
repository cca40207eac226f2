"""Aggregation rules for averaging parameters among the replicas of one stage.

Pure tensor math, shared by the live worker and the simulator. ``mean`` is plain data-parallel
averaging; ``trimmed-mean`` and ``centered-clip`` bound what a minority of poisoned contributions
can do (the replicas of a stage trust each other no more than the verifiers trust them).
"""

from __future__ import annotations

from collections.abc import Sequence

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
