"""Attacks on the other axis: a worker honest on the pipeline that poisons its stage's average.

The replicas of a stage average their parameters every few optimizer steps. A worker whose
activations and gradients are perfect passes every pipeline screen, yet what it contributes to
that average lands in every honest replica of its stage. Each class here sends honest tensors
forward and backward and lies only in :meth:`~sentinel.attacks.base.Attack.average`, relative to
the worker's *update* since its previous round (``ctx.anchor``): flipping or scaling raw
parameters would be absurdly loud, flipping the update is what a careful attacker does.

In a butterfly round (``sentinel.worker.butterfly``) the worker is also the reducer of some parts,
and ``average`` is called on each reduced part it serves as well (``ctx.direction ==
"reduce"``, ``ctx.anchor`` the same slice of its previous aggregate): each attack lies there the
same way it lies in its contribution. :class:`AvgReducer` lies only there.
"""

from __future__ import annotations

import torch

from sentinel.attacks.base import Attack, AttackContext, randn_like, rms

__all__ = ["AveragingAttack", "AvgAlie", "AvgRandom", "AvgReducer", "AvgScaling"]


class AveragingAttack(Attack):
    """Base: honest on the pipeline (forward and backward untouched), poisoned in averaging."""

    def attacks(self, direction: str) -> bool:
        return False  # pipeline messages go out honest: "consistent pipeline, poisoned average"

    def average(self, params: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        if not self.active(ctx):
            return params
        anchor = ctx.anchor if ctx.anchor is not None and ctx.anchor.shape == params.shape else params
        return self.poison(params, anchor, ctx)

    def poison(self, params: torch.Tensor, anchor: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError


class AvgScaling(AveragingAttack):
    """Contribute ``anchor + factor * update``: ``factor=-10`` (default) is the sign-flipped x10
    update, ``factor=10`` an amplified one.

    Args:
        factor: multiplier of the worker's honest update since its previous averaging round.

    Why it matters: with plain mean over ``n`` replicas one such contribution moves every honest
    replica by ``(factor - 1) / n`` of an update against the training direction, every round.
    """

    name = "avg_scaling"

    def __init__(self, factor: float = -10.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.factor = float(factor)

    def poison(self, params, anchor, ctx):
        return anchor + self.factor * (params - anchor)


class AvgRandom(AveragingAttack):
    """Contribute ``anchor + scale * rms(update) * noise``: a random update ``scale`` times the
    size of an honest one (at least the size of ``rms(params) * 1e-3`` before the first round).

    Args:
        scale: size of the random update relative to the honest update's rms.

    Why it matters: a free-rider that never trains but still takes part in averaging.
    """

    name = "avg_random"

    def __init__(self, scale: float = 10.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if scale < 0:
            raise ValueError(f"scale must be >= 0; got {scale}")
        self.scale = float(scale)

    def poison(self, params, anchor, ctx):
        size = max(rms(params - anchor), 1e-3 * rms(params))
        return anchor + self.scale * size * randn_like(params, ctx.generator)


class AvgAlie(AveragingAttack):
    """ALIE on averaging: contribute ``mean - z * std`` of the other replicas' contributions,
    coordinate-wise (``ctx.peers``); without them, ``anchor - z * |update|`` per coordinate.

    Args:
        z: shift in per-coordinate standard deviations.

    Why it matters: every coordinate stays inside the honest spread, so coordinate-wise trimming
    and distance-based clipping both let most of it through, and every round pushes the same way.
    """

    name = "avg_alie"

    def __init__(self, z: float = 1.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.z = float(z)

    def poison(self, params, anchor, ctx):
        peers = [p for p in (ctx.peers or []) if p.shape == params.shape]
        if len(peers) >= 2:
            stacked = torch.stack([p.float() for p in peers])
            return (stacked.mean(0) - self.z * stacked.std(0)).to(params.dtype)
        return anchor - self.z * (params - anchor).abs()


class AvgReducer(AveragingAttack):
    """An honest contributor that lies only as a butterfly reducer: it serves
    ``anchor + factor * (reduced - anchor)`` for each part it reduces for its replicas.

    Args:
        factor: multiplier of the honest reduced update (default -10, sign-flipped x10).

    Why it matters: its own contributions are clean, so no contribution screen sees it; only a
    requester that audits its answer (recomputes it from the slices it committed to) does.
    """

    name = "avg_reducer"

    def __init__(self, factor: float = -10.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.factor = float(factor)

    def poison(self, params, anchor, ctx):
        if ctx.direction != "reduce":
            return params
        return anchor + self.factor * (params - anchor)
