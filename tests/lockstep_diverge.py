"""A test plugin with two faces, one per stage, for the live lockstep test:

- on stage 0 it is a *fault*, not an attack: at step ``at_step`` it nudges its own worker's
  parameters once, the way a flipped bit or a non-deterministic kernel would, and answers
  honestly throughout; the stage must re-sync it, not strike it;
- on any later stage it is an *attacker the fences cannot see*: from step ``noise_from`` it adds
  noise of ``eps`` times the output's RMS to every forward answer; exact spot checks must ban it.
"""

from __future__ import annotations

import torch


class DivergeOrLie:
    name = "diverge_or_lie"

    def __init__(self, at_step: int = 20, scale: float = 1e-4, noise_from: int = 10, eps: float = 0.01) -> None:
        self.at_step, self.scale, self.noise_from, self.eps = at_step, scale, noise_from, eps
        self.nudged = False

    def forward(self, y: torch.Tensor, ctx) -> torch.Tensor:
        if ctx.stage > 0:
            if ctx.step < self.noise_from:
                return y
            rms = y.detach().float().pow(2).mean().sqrt()
            return y + self.eps * rms * torch.randn(y.shape, generator=ctx.generator, dtype=y.dtype)
        if not self.nudged and ctx.step >= self.at_step and ctx.stage_module is not None:
            self.nudged = True
            with torch.no_grad():
                for p in ctx.stage_module.parameters():
                    p.add_(torch.randn(p.shape, generator=ctx.generator) * self.scale)
        return y
