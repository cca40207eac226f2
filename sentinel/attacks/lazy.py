"""Lazy workers: plausible tensors for credit, without (all of) the work.

A lazy volunteer is not trying to break the model; it wants the reward for serving a stage while
spending less compute than the stage costs. Each kind below computes what it sends from the
stage input through a cheaper path than the honest stage, forward and backward alike (backward:
the gradient of that cheaper path, so the lie is self-consistent):

* :class:`LazySkip` — skips the stage's transformer blocks (keeps the embedding on the first
  stage and the head on the last, where shapes require them): output = input;
* :class:`LazyStale` — runs a frozen copy of its stage taken when the attack starts, i.e. never
  applies an update (it saves the optimizer and averaging, not the forward);
* :class:`LazyRandom` — replaces the blocks with one fixed random linear map (``D x D``), a
  cheap network of the right shape;
* :class:`LazyPartial` — does the work on only the first ``fraction`` of the micro-batch's
  sequences and skips the blocks for the rest.

They need the worker's stage module and input, which callers put in the
:class:`~sentinel.attacks.base.AttackContext` (the simulator and ``sentinel.worker.node`` do).
In both, the lazy worker's own parameters still train honestly (the worker process computes the
true pass before the attack replaces what is sent), so its contribution to within-stage averaging
is honest: these classes measure what screening sees on the pipeline axis only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable

import torch
from torch import nn

from sentinel.attacks.base import Attack, AttackContext
from sentinel.model.decoder import language_model_loss

__all__ = ["LazyPartial", "LazyRandom", "LazySkip", "LazyStale", "LazyWorker"]


def _embed(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.embed(x) if getattr(m, "embed", None) is not None else x


def _blocks(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for block in m.blocks.values():
        h = block(h)
    return h


def _finish(m: nn.Module, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if getattr(m, "head", None) is None:
        return h
    logits = m.head(h)
    return logits if targets is None else language_model_loss(logits, targets)


class LazyWorker(Attack):
    """Base of the lazy kinds: subclasses define :meth:`path`, the cheap stand-in for the stage.

    Forward sends ``path(input)``; backward sends the gradient of ``path`` at the input, applied
    to the gradient the worker received (times its ``grad_scale``).
    """

    def path(self, m: nn.Module, x: torch.Tensor, targets: torch.Tensor | None,
             ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        m, inp = ctx.stage_module, ctx.stage_input
        if m is None or inp is None:
            raise ValueError(f"{self.name} needs the stage module and input in its AttackContext "
                             "(stage_module, stage_input); this caller passes neither")
        if ctx.direction == "forward":
            with torch.no_grad():
                out = self.path(m, inp, ctx.targets, ctx)
            return out.detach().to(x.dtype).reshape(x.shape)
        if not inp.is_floating_point():  # the first stage sends no gradient
            return x
        leaf = inp.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.path(m, leaf, ctx.targets, ctx)
            if out.dim() == 0:  # last stage: d loss / d input
                (grad,) = torch.autograd.grad(out * ctx.grad_scale, leaf, allow_unused=True)
            else:
                if ctx.grad_output is None:
                    raise ValueError(f"{self.name} backward needs ctx.grad_output on a stage that is not last")
                (grad,) = torch.autograd.grad(out, leaf, grad_outputs=ctx.grad_output * ctx.grad_scale,
                                              allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(leaf)
        return grad.detach().to(x.dtype).reshape(x.shape)


class LazySkip(LazyWorker):
    """Skips its layers: sends its input on (embedded on the first stage, through the head on the last).

    Why it matters: the cheapest free-rider that still looks like activations of the right scale
    (the residual stream changes little per layer in a deep model).
    """

    name = "lazy_skip"

    def path(self, m, x, targets, ctx):
        return _finish(m, _embed(m, x), targets)


class LazyStale(LazyWorker):
    """Runs a frozen copy of its stage, taken at its first attacked message: never applies updates.

    Why it matters: the worker saves the optimizer step and the averaging round; early on its
    outputs are nearly right, and they drift from the honest replicas as training moves on.
    """

    name = "lazy_stale"

    def __init__(self, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self._frozen: dict[tuple[Hashable, ...], nn.Module] = {}

    def path(self, m, x, targets, ctx):
        key = (ctx.worker, ctx.stage)
        if key not in self._frozen:
            frozen = copy.deepcopy(m)
            frozen.requires_grad_(False)
            self._frozen[key] = frozen
        return self._frozen[key](x, targets)

    def reset(self) -> None:
        self._frozen.clear()


class LazyRandom(LazyWorker):
    """Replaces its blocks with one fixed random ``D x D`` linear map (entries N(0, 1/D), so the
    output keeps the input's scale), drawn once per worker from the first message's generator.

    Why it matters: a worker that serves a stage it never loaded; cheap, shape-correct, random.
    """

    name = "lazy_random"

    def __init__(self, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self._maps: dict[tuple[Hashable, ...], torch.Tensor] = {}

    def path(self, m, x, targets, ctx):
        h = _embed(m, x)
        key = (ctx.worker, ctx.stage)
        if key not in self._maps:
            d = h.shape[-1]
            w = torch.randn((d, d), generator=ctx.generator, device=ctx.generator.device, dtype=torch.float32)
            self._maps[key] = (w / math.sqrt(d)).to(device=h.device, dtype=h.dtype)
        return _finish(m, h @ self._maps[key], targets)

    def reset(self) -> None:
        self._maps.clear()


class LazyPartial(LazyWorker):
    """Does the work on the first ``fraction`` of the micro-batch's sequences, skips the rest.

    Args:
        fraction: share of sequences (rows) computed honestly, in [0, 1]; rounded up to whole rows.

    Why it matters: most of the tensor is right, so whole-tensor statistics move by about
    ``1 - fraction`` of what :class:`LazySkip` moves them.
    """

    name = "lazy_partial"

    def __init__(self, fraction: float = 0.5, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
        self.fraction = float(fraction)

    def path(self, m, x, targets, ctx):
        h = _embed(m, x)
        k = math.ceil(self.fraction * h.shape[0])
        h = torch.cat([_blocks(m, h[:k]), h[k:]], dim=0)
        return _finish(m, h, targets)
