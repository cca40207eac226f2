"""Attacks that play with time: stale replays, occasional strikes, and slowly growing pushes.

A verifier that screens each message against a moving reference has two blind spots in time:
messages that were once legitimate (replay), and drift slow enough to be absorbed into the
reference (ramp). Intermittent attacks probe the strike counter's forgiveness.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import torch

from sentinel.attacks.base import Attack, AttackContext, rms, unit_direction

__all__ = ["Delay", "Intermittent", "SlowRamp"]


class Delay(Attack):
    """Stale replay: send the honest output this worker produced ``k`` steps earlier.

    For each ``(worker, stage, direction)`` the attack keeps a bounded FIFO of honest outputs,
    one per step (the latest message of that step), at most ``k + 1`` entries. At step ``t`` it
    sends the newest stored output from a step ``<= t - k`` with the same shape and dtype. Before
    ``k`` steps of history exist it sends the oldest stored output that fits, and the very first
    message of a worker goes out unchanged (there is nothing to replay yet).

    Args:
        k: staleness in steps (the paper uses 100).

    Why it matters: every replayed tensor was a genuine, well-formed output, so per-message
    statistics look normal; yet it belongs to another micro-batch and to old parameters, which
    poisons the gradient of the stages around it. A lazy worker gets paid without computing.
    """

    name = "delay"

    def __init__(self, k: int = 100, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.k = int(k)
        self._history: dict[tuple[Hashable, ...], deque[tuple[int, torch.Tensor]]] = {}

    def reset(self) -> None:
        self._history.clear()

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        history = self._history.setdefault(self.state_key(ctx), deque(maxlen=self.k + 1))
        fits = [(s, t) for s, t in history if t.shape == x.shape and t.dtype == x.dtype]
        stale = [t for s, t in fits if s <= ctx.step - self.k]
        if stale:
            sent = stale[-1].clone()
        elif fits:
            sent = fits[0][1].clone()
        else:
            sent = x
        self._remember(history, ctx.step, x)
        return sent

    @staticmethod
    def _remember(history: deque[tuple[int, torch.Tensor]], step: int, x: torch.Tensor) -> None:
        kept = x.detach().clone()
        if history and history[-1][0] == step:
            history[-1] = (step, kept)
        else:
            history.append((step, kept))


class Intermittent(Attack):
    """Apply another attack with probability ``p`` per message; behave honestly otherwise.

    Args:
        inner: the attack to apply — a catalogue name (``"sign_flip"``), a full spec string, or
            an :class:`Attack` instance. Its own parameters go in the spec as ``inner.key=value``.
        p: probability that a message is attacked.

    Why it matters: a strike counter that forgives clean messages can be gamed by an attacker
    who stays under the ban threshold; sign flips on 25% of micro-batches already stall training.
    """

    name = "intermittent"

    def __init__(
        self,
        inner: str | Attack = "sign_flip",
        p: float = 0.25,
        *,
        directions: str = "both",
        start_step: int = 0,
    ) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        if isinstance(inner, str):
            from sentinel.attacks.loader import load_attack  # local import: the loader imports us

            inner = load_attack(inner)
        self.inner = inner
        self.p = float(p)

    def reset(self) -> None:
        reset = getattr(self.inner, "reset", None)
        if callable(reset):
            reset()

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        hit = float(torch.rand((), generator=ctx.generator, device=ctx.generator.device)) < self.p
        if not hit:
            return x
        if ctx.direction == "forward":
            return self.inner.forward(x, ctx)
        return self.inner.backward(x, ctx)


class SlowRamp(Attack):
    """A perturbation whose strength grows linearly from zero: ``rate * (step - start_step)``.

    Args:
        rate: strength gained per step after ``start_step``.
        mode: ``"additive"`` adds ``strength * rms(x)`` per element along a fixed random direction
            of the feature dimension (drawn from ``ctx.generator`` on first use); ``"scale"``
            multiplies the tensor by ``1 + strength``.
        max_strength: the strength stops growing here (``inf`` = never).

    Why it matters: a verifier whose reference follows legitimate drift can be walked away from
    the honest distribution if each step's change is inside the noise — the boiling-frog attack.
    Catching it needs a reference anchored to what the other replicas send at the same time.
    """

    name = "slow_ramp"

    MODES = ("additive", "scale")

    def __init__(
        self,
        rate: float = 0.01,
        mode: str = "additive",
        max_strength: float = float("inf"),
        *,
        directions: str = "both",
        start_step: int = 0,
    ) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}; got {mode!r}")
        if rate < 0 or max_strength < 0:
            raise ValueError(f"rate and max_strength must be >= 0; got rate={rate}, max_strength={max_strength}")
        self.rate = float(rate)
        self.mode = mode
        self.max_strength = float(max_strength)
        self._directions: dict[tuple[Hashable, ...], torch.Tensor] = {}

    def reset(self) -> None:
        self._directions.clear()

    def strength(self, step: int) -> float:
        """Perturbation strength at ``step`` (0 at ``start_step``)."""
        return min(self.rate * max(step - self.start_step, 0), self.max_strength)

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        s = self.strength(ctx.step)
        if self.mode == "scale":
            return x * (1.0 + s)
        key = (*self.state_key(ctx), tuple(x.shape[-1:]))
        direction = self._directions.get(key)
        if direction is None:
            direction = self._directions[key] = unit_direction(x, ctx.generator)
        return x + (direction * (s * rms(x))).to(x.dtype)
