"""A test plugin (not an attack on the pipeline's tensors): at step ``at_step`` it nudges its own
worker's parameters once, the way a flipped bit or a non-deterministic kernel would, and answers
honestly throughout. A lockstep stage must notice the wrong digest and re-sync that replica."""

from __future__ import annotations

import torch


class Diverge:
    name = "diverge"

    def __init__(self, at_step: int = 20, scale: float = 1e-4) -> None:
        self.at_step, self.scale, self.done = at_step, scale, False

    def forward(self, y: torch.Tensor, ctx) -> torch.Tensor:
        if not self.done and ctx.step >= self.at_step and ctx.stage_module is not None:
            self.done = True
            with torch.no_grad():
                for p in ctx.stage_module.parameters():
                    p.add_(torch.randn(p.shape, generator=ctx.generator) * self.scale)
        return y
