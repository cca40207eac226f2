"""An example of your own attack, loaded without editing Sentinel.

Run it with ``--attack examples/my_attack.py:Freeze`` (or ``...:Freeze,every=5``), or from code:
``load_attack("examples/my_attack.py:Freeze")``. A plugin only needs a constructor that works
with no arguments and any of ``forward(x, ctx)``, ``backward(g, ctx)`` and
``average(params, ctx)``: it attacks the directions whose methods it defines, unless the
launcher is told otherwise (``--attack-direction``). Subclassing ``sentinel.attacks.Attack`` (as
``Freeze`` does) adds ``directions`` and ``start_step`` parameters. ``Dampen`` shows the minimal
form, with no Sentinel import at all: it attacks backward only.
"""

from __future__ import annotations

import torch

from sentinel.attacks import Attack, AttackContext


class Freeze(Attack):
    """Send the first output seen, refreshed only every ``every`` steps.

    A lazy worker that computes rarely and resends a cached answer in between: the tensors are
    genuine outputs, but mostly for the wrong micro-batch.
    """

    name = "freeze"

    def __init__(self, every: int = 10, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}")
        self.every = every
        self._cache: dict[tuple, tuple[int, torch.Tensor]] = {}

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        key = self.state_key(ctx)
        cached = self._cache.get(key)
        if cached is None or ctx.step - cached[0] >= self.every or cached[1].shape != x.shape:
            self._cache[key] = (ctx.step, x.detach().clone())
            return x
        return cached[1].clone()


class Dampen:
    """Scale gradients down by ``factor``: slows the stages upstream without looking odd."""

    name = "dampen"

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def backward(self, g: torch.Tensor, ctx: object) -> torch.Tensor:
        return g * self.factor
