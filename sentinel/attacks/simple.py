"""Memoryless attacks: each message is corrupted on its own, with no state across steps.

These are the classic baselines of the Byzantine-robustness literature. They differ in how
visible they are (zeros and constants are obvious; invisible noise is not) and in how much damage
they do (a sign flip on a quarter of micro-batches stalls training; 1% noise is harmless), which is
why the simulator reports detection next to damage.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from sentinel.attacks.base import Attack, AttackContext, rand_like, randn_like, rms, unit_direction

__all__ = ["Bias", "Constant", "ElementFlip", "Gaussian", "Invisible", "Random", "Scaling", "SignFlip", "Zeros"]


class Zeros(Attack):
    """Send all zeros.

    Why it matters: the cheapest free-rider (or a crashed worker that still answers) — it does no
    work, and a zero gradient silently stops learning in every stage upstream of it.
    """

    name = "zeros"

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return torch.zeros_like(x)


class Constant(Attack):
    """Send a tensor filled with one value.

    Args:
        value: the fill value.

    Why it matters: like zeros, a lazy or broken worker that returns junk of the right shape;
    a large value also tests that screening catches the norm blowing up.
    """

    name = "constant"

    def __init__(self, value: float = 1.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.value = float(value)

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return torch.full_like(x, self.value)


class Random(Attack):
    """Replace the tensor with Gaussian noise of the same rms (matched scale).

    Why it matters: a lazy worker that skips the computation but tries to look plausible; the
    norm is right, so only direction- and distribution-aware statistics can tell.
    """

    name = "random"

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return randn_like(x, ctx.generator) * rms(x)


class Scaling(Attack):
    """Multiply the tensor by ``factor``.

    Args:
        factor: the multiplier; -1 (default) flips the sign, 10 amplifies ten-fold.

    Why it matters: a sign flip turns gradient descent into ascent for the stages upstream and is
    among the most damaging simple attacks (``results/detection_table.md``); amplification (x10) lets one
    worker dominate the average of its stage's replicas.
    """

    name = "scaling"

    def __init__(self, factor: float = -1.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.factor = float(factor)

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return x * self.factor


class SignFlip(Scaling):
    """Alias of ``scaling`` with ``factor=-1``: send the negated tensor."""

    name = "sign_flip"


class Gaussian(Attack):
    """Add Gaussian noise of standard deviation ``sigma * rms(x)``.

    Args:
        sigma: noise level relative to the tensor's own rms (1.0 = as loud as the signal).

    Why it matters: degrades training without an obvious signature; with backward noise the
    gradient's direction survives on average, so the damage is moderate but steady.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0; got {sigma}")
        self.sigma = float(sigma)

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return x + randn_like(x, ctx.generator) * (self.sigma * rms(x))


class Invisible(Gaussian):
    """Add tiny relative noise (``eps * rms(x)``, default 1e-3).

    Args:
        eps: noise level relative to the tensor's rms.

    Why it matters: it is the control for false positives — harmless by design, it must not be
    banned more eagerly than honest numerical noise; a verifier that bans it is too tight.
    """

    name = "invisible"

    def __init__(self, eps: float = 1e-3, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(sigma=eps, directions=directions, start_step=start_step)
        self.eps = float(eps)


class ElementFlip(Attack):
    """Flip the sign of a random ``fraction`` of the elements.

    Args:
        fraction: share of elements flipped per message, in [0, 1].

    Why it matters: keeps the norm and most of the distribution intact, so norm- and
    moment-based screens miss it; only an element-wise sign statistic sees it.
    """

    name = "element_flip"

    def __init__(self, fraction: float = 0.1, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
        self.fraction = float(fraction)

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        flip = rand_like(x, ctx.generator) < self.fraction
        return torch.where(flip, -x, x)


class Bias(Attack):
    """Add a constant offset along a fixed random direction of the feature dimension.

    The offset has a per-element rms of ``bias * rms(x)`` and is the same for every row (token,
    sample) and every step. The direction is drawn from ``ctx.generator`` on the worker's first
    message and then kept.

    Args:
        bias: offset size relative to the tensor's rms.

    Why it matters: a systematic shift accumulates in the parameters instead of averaging out the
    way noise does — a backdoor-style push that looks like an ordinary activation pattern.
    """

    name = "bias"

    def __init__(self, bias: float = 0.5, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.bias = float(bias)
        self._directions: dict[tuple[Hashable, ...], torch.Tensor] = {}

    def reset(self) -> None:
        self._directions.clear()

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        key = (*self.state_key(ctx), tuple(x.shape[-1:]))
        direction = self._directions.get(key)
        if direction is None:
            direction = self._directions[key] = unit_direction(x, ctx.generator)
        return x + (direction * (self.bias * rms(x))).to(x.dtype)
