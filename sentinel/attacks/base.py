"""The attack interface: what a malicious worker does to the tensors it sends.

An attack sits between a worker's honest computation and the wire. The worker computes its true
stage output (forward) or its true input-gradient (backward) and hands it to the attack, which
returns what the worker actually sends. Returning the tensor unchanged means "no attack" for that
message.

Rules every attack follows, so the simulator and the live swarm can share them:

- all randomness comes from ``ctx.generator`` (seeded by the caller), so a run is reproducible;
  the only exception is :class:`~sentinel.attacks.adaptive.Collusion`, whose shared direction
  comes from a seed the colluders agree on;
- the output has the input's shape, dtype and device, and the input is never modified in place;
- state (replay buffers, running estimates, fixed directions) is kept per
  ``(worker, stage, direction)``, so one instance can play several malicious workers.

The base class handles what every attack has in common: the ``directions`` it attacks and the
``start_step`` before which it behaves honestly. Subclasses implement :meth:`Attack.perturb`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["DIRECTIONS", "Attack", "AttackContext", "rms", "randn_like", "rand_like", "unit_direction"]

#: Accepted values of the ``directions`` parameter.
DIRECTIONS: tuple[str, ...] = ("forward", "backward", "both")


@dataclass
class AttackContext:
    """Everything an attack may know about the message it is about to corrupt.

    Attributes:
        step: training step the message belongs to.
        stage: pipeline stage of the sending worker.
        worker: identifier of the sending worker (a peer id in the swarm, a name in the simulator).
        micro_batch: index of the micro-batch within the step.
        direction: ``"forward"`` (activations) or ``"backward"`` (activation-gradients).
        generator: seeded by the caller; attacks draw all their randomness from it.
        stage_input: what the worker received for this message, if the caller passes it.
        num_stages: number of pipeline stages, 0 if unknown.
        targets: the micro-batch's target tokens where the stage has them (the last stage).
        grad_output: backward only: the gradient the worker received for its output (None on
            the last stage, whose output is the loss).
        grad_scale: the factor the worker applies to ``grad_output`` before back-propagating
            (``1 / accumulate``), so a recomputed gradient matches the honest one's scale.
        stage_module: the worker's own stage module (read it, never train it): what a lazy
            worker skips, snapshots or imitates (:mod:`sentinel.attacks.lazy`).
        oracle: white box only (the simulator provides it): ``oracle(tensor)`` says whether the
            verifier would flag that tensor from this worker now (None while it has no fences).
        anchor: averaging only: this worker's flat parameters right after its previous averaging
            round (the point its honest update moved away from).
        peers: averaging only: the other replicas' contributions to this round, where the caller
            lets the attacker see them (the ALIE threat model: colluders know the honest spread).
    """

    step: int
    stage: int
    worker: str
    micro_batch: int
    direction: str
    generator: torch.Generator
    stage_input: torch.Tensor | None = None
    num_stages: int = 0
    targets: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None
    grad_scale: float = 1.0
    stage_module: torch.nn.Module | None = None
    oracle: Callable[[torch.Tensor], bool | None] | None = None
    anchor: torch.Tensor | None = None
    peers: list[torch.Tensor] | None = None


class Attack:
    """Base class of the attack catalogue.

    Args:
        directions: which messages to corrupt: ``"forward"``, ``"backward"`` or ``"both"``.
        start_step: the attack is inactive (the worker is honest) before this step. Real
            adversaries behave well first to earn trust and let the verifier's reference settle.
    """

    #: Name under which the attack is registered and loaded (``load_attack("name")``).
    name: ClassVar[str] = ""

    def __init__(self, *, directions: str = "both", start_step: int = 0) -> None:
        if directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}; got {directions!r}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}")
        self.directions = directions
        self.start_step = int(start_step)

    # -- public interface ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """What a malicious worker sends instead of its true stage output ``x``."""
        return self._apply(x, ctx, "forward")

    def backward(self, g: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """What a malicious worker sends instead of its true input-gradient ``g``."""
        return self._apply(g, ctx, "backward")

    def average(self, params: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """What a malicious worker contributes to its stage's averaging round instead of its true
        flat ``params``. Pipeline attacks are honest here; :mod:`sentinel.attacks.averaging`
        holds the ones that are not."""
        return params

    def attacks(self, direction: str) -> bool:
        """Whether this attack corrupts messages going in ``direction``."""
        return self.directions == "both" or self.directions == direction

    def active(self, ctx: AttackContext) -> bool:
        """Whether the attack fires for this message (direction aside). Subclasses may narrow it."""
        return ctx.step >= self.start_step

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Return the corrupted version of ``x``. Called only when the attack is active."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all per-worker state (buffers, running estimates, fixed directions)."""

    # -- helpers --------------------------------------------------------------------------------

    def _apply(self, x: torch.Tensor, ctx: AttackContext, direction: str) -> torch.Tensor:
        if ctx.direction != direction:
            ctx = dataclasses.replace(ctx, direction=direction)
        if not self.attacks(direction) or not self.active(ctx) or x.numel() == 0:
            return x
        return self.perturb(x, ctx)

    @staticmethod
    def state_key(ctx: AttackContext) -> tuple[Hashable, ...]:
        """Key under which per-worker state is kept: one stream per worker, stage and direction."""
        return (ctx.worker, ctx.stage, ctx.direction)

    def __repr__(self) -> str:
        params = []
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if hasattr(self, p.name) and all(not q.startswith(f"{p.name}=") for q in params):
                    params.append(f"{p.name}={getattr(self, p.name)!r}")
        return f"{type(self).__name__}({', '.join(params)})"


# -- tensor helpers shared by the catalogue ------------------------------------------------------


def rms(x: torch.Tensor) -> float:
    """Root mean square of ``x``: the scale that makes an attack's strength relative.

    Relative strengths matter because activations and gradients differ by orders of magnitude
    between stages and over training (early gradients are ~50x later ones).
    """
    return float(x.detach().float().pow(2).mean().sqrt())


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on its own device.

    Drawn in float32 then cast, so the same seed gives the same noise whatever ``x``'s dtype.
    """
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


def rand_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) float32 samples shaped like ``x``, on ``x``'s device."""
    u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return u.to(device=x.device)


def unit_direction(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random direction in ``x``'s feature (last) dimension, scaled to unit rms per element.

    Adding ``c * unit_direction(x, g)`` to every row shifts each feature vector by the same
    offset, whose per-element rms is ``|c|``. A 0-dim tensor has one feature.
    """
    shape = x.shape[-1:]
    d = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    d = d * (math.sqrt(d.numel()) / d.norm().clamp_min(1e-12))
    return d.to(device=x.device)
