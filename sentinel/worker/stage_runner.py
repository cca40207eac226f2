"""One pipeline stage's compute on a worker: forward, backward, optimizer, parameter exchange.

No networking here: the P2P worker (``worker/node.py``) and the in-process simulator both drive
this class. All methods are synchronous and meant to run on one dedicated thread per worker,
which serialises access to the parameters without locks.

Backward is served from a bounded activation cache when the cached forward matches the input
the verifier sends again and no optimizer step happened since; otherwise it recomputes the
forward from that input (stateless, as SWARM and Petals do). Either way a worker that died
between forward and backward loses nothing: the verifier re-sends the input to another replica.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from sentinel.model.stages import (
    Pass,
    StageModule,
    backward_seed,
    build_stage,
    mean_gradient,
    parameters_digest,
    recompute_gradient,
)
from sentinel.run.manifest import RunManifest


@dataclass
class StageRunnerStats:
    forwards: int = 0
    backwards: int = 0
    cache_hits: int = 0
    recomputes: int = 0
    optimizer_steps: int = 0
    averaging_rounds: int = 0
    held_steps: int = 0  # optimizer steps deferred while an overdue averaging round was in flight


class StageRunner:
    """Holds a stage's module and optimizer; applies gradients as backward passes arrive."""

    def __init__(self, manifest: RunManifest, stage: int, cache_size: int = 64,
                 device: torch.device | str = "cpu"):
        self.manifest = manifest
        self.stage = stage
        #: where the stage computes; tensors in and out of this class are always on the CPU (the wire's side)
        self.device = torch.device(device)
        self.module: StageModule = build_stage(manifest.model, stage, manifest.num_stages,
                                               seed=manifest.seed).to(self.device)
        opt = manifest.optimizer
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay
        )
        self.version = 0  # optimizer steps applied; part of the activation-cache key
        self.pending = 0  # backward passes accumulated since the last optimizer step
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]] = OrderedDict()
        self.stats = StageRunnerStats()
        self.last_loss: float | None = None
        # lockstep stages never step on their own: the stage's agreed gradient is applied at the
        # step boundary (:meth:`apply_gradient`), so every pass only accumulates
        self.lockstep = manifest.training.sync == "lockstep"
        self._digest: tuple[tuple[int, int], str] | None = None  # ((version, param_epoch), digest)

    @property
    def is_first(self) -> bool:
        return self.module.is_first

    @property
    def is_last(self) -> bool:
        return self.module.is_last

    # -- compute ---------------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    @staticmethod
    def _on_cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu()

    def _run(self, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = self._on_device(x), self._on_device(targets)
        if self.is_first:
            leaf = x
        else:
            leaf = x.detach().requires_grad_(True)
        out = self.module(leaf, targets if self.is_last else None)
        return leaf, out

    def forward(self, key: tuple, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Training forward: returns the stage output (the loss on the last stage), caches the graph."""
        leaf, out = self._run(x, targets)
        self.stats.forwards += 1
        self._cache[key] = (leaf, out, targets, self.version)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        if self.is_last:
            self.last_loss = float(out.detach())
        return self._on_cpu(out)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Forward without graph or side effects, for validation."""
        return self._on_cpu(self.module(self._on_device(x), self._on_device(targets) if self.is_last else None))

    def backward(
        self, key: tuple, x: torch.Tensor, grad_out: torch.Tensor | None, targets: torch.Tensor | None = None,
        hold: bool = False,
    ) -> torch.Tensor | None:
        """Accumulate parameter gradients; return the gradient w.r.t. the stage input (None on stage 0).

        ``hold`` defers the optimizer step this pass would take (its gradient stays accumulated
        for :meth:`step_if_due`): the worker holds steps while an overdue averaging round is in flight.
        """
        cached = self._cache.pop(key, None)
        if cached is not None and cached[3] == self.version and torch.equal(cached[0].detach(), self._on_device(x)):
            leaf, out = cached[0], cached[1]
            self.stats.cache_hits += 1
        else:
            leaf, out = self._run(x, targets)
            self.stats.recomputes += 1
        torch.autograd.backward(*self._seed(out, grad_out))
        self.stats.backwards += 1
        self.pending += 1
        if self.pending >= self.manifest.training.accumulate and not self.lockstep:
            if hold:
                self.stats.held_steps += 1
            else:
                self.step()
        if self.is_first:
            return None
        return self._on_cpu(leaf.grad)

    def probe_backward(self, x: torch.Tensor, grad_out: torch.Tensor | None,
                       targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """The input-gradient :meth:`backward` would return, with no parameter gradient kept:
        a re-check of another replica's answer must not count twice in this stage's update."""
        if self.is_first:
            return None
        leaf, out = self._run(x, targets)
        output, grad_output = self._seed(out, grad_out)
        (grad,) = torch.autograd.grad(output, leaf, grad_output)
        return self._on_cpu(grad)

    def _seed(self, out: torch.Tensor, grad_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return backward_seed(self.module, out, grad_out, 1.0 / self.manifest.training.accumulate)

    def step_if_due(self) -> bool:
        """Apply the gradients of held passes (one optimizer step for all of them)."""
        if self.pending < self.manifest.training.accumulate:
            return False
        self.step()
        return True

    def step(self) -> None:
        clip = self.manifest.optimizer.grad_clip
        params = [p for p in self.module.parameters() if p.grad is not None]
        warmup = self.manifest.optimizer.warmup_steps
        if warmup:
            lr = self.manifest.optimizer.lr * min(1.0, (self.version + 1) / warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else None
            if norm is None or math.isfinite(float(norm)):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.version += 1
        self.stats.optimizer_steps += 1
        self._cache.clear()  # cached graphs refer to pre-step parameters

    # -- lockstep: the stage's replicas apply one agreed gradient ---------------------------------
    def accumulated_gradient(self) -> tuple[torch.Tensor, int]:
        """The mean parameter gradient of the backward passes held since the last step, flat on
        the CPU (zeros where a parameter got none), and how many passes it averages."""
        return mean_gradient(self.module, self.pending, self.manifest.training.accumulate), self.pending

    def recompute_gradient(self, passes: list[Pass]) -> tuple[torch.Tensor, int]:
        """What :meth:`accumulated_gradient` returns on a replica at this version that served
        ``passes`` in that order (``sentinel.model.stages.recompute_gradient``): the exact
        re-check of another replica's lockstep contribution. My own accumulation is kept."""
        return recompute_gradient(self.module, passes, self.manifest.training.accumulate)

    def apply_gradient(self, flat: torch.Tensor) -> None:
        """Take one optimizer step with ``flat`` as every parameter's gradient, whatever this
        replica accumulated: replicas at the same version with the same optimizer state that
        apply the same gradient end bit-identical (same build, same device type)."""
        for p, part in self._split(flat, "expected a gradient of {n} values, got {got}"):
            p.grad = part.to(device=p.device, dtype=p.dtype).clone()
        self.step()

    def skip_step(self) -> None:
        """Advance the version without an update: a lockstep round in which no replica of the
        stage served a backward pass (every replica skips it alike)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.version += 1
        self._cache.clear()

    def flat_state(self) -> tuple[torch.Tensor, list[int]]:
        """Parameters, AdamW first and second moments as one flat float32 tensor (3 x
        :meth:`num_parameters`, in that order), and each parameter's AdamW step count: what a
        replica sends a peer that re-syncs (no pickle on the wire)."""
        params = list(self.module.parameters())
        moments, steps = [], []
        for name in ("exp_avg", "exp_avg_sq"):
            moments.append(torch.cat([self.optimizer.state.get(p, {}).get(name, torch.zeros_like(p)).detach()
                                      .reshape(-1).float().cpu() for p in params]))
        for p in params:
            step = self.optimizer.state.get(p, {}).get("step", 0)
            steps.append(int(step.item() if torch.is_tensor(step) else step))
        return torch.cat([self.flat_parameters().float(), *moments]), steps

    def load_flat_state(self, flat: torch.Tensor, steps: list[int], version: int) -> None:
        """Adopt a peer's :meth:`flat_state` at ``version``; held gradients and cached graphs go."""
        n, count = self.num_parameters(), len(list(self.module.parameters()))
        if flat.numel() != 3 * n or len(steps) != count:
            raise ValueError(f"expected a state of {3 * n} values and {count} step counts, "
                             f"got {flat.numel()} and {len(steps)}")
        self.optimizer.state.clear()
        parts = zip(*(self._split(flat[i * n : (i + 1) * n], "") for i in range(3)), steps, strict=True)
        for (p, value), (_, m1), (_, m2), step in parts:
            with torch.no_grad():
                p.copy_(value)
            if step > 0:  # a parameter AdamW never stepped has no state, as in a fresh optimizer
                self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                           "exp_avg": m1.to(device=p.device, dtype=p.dtype).clone(),
                                           "exp_avg_sq": m2.to(device=p.device, dtype=p.dtype).clone()}
        self.optimizer.zero_grad(set_to_none=True)
        self.restored(version)

    def state(self) -> dict[str, Any]:
        """A private copy of the parameters, optimizer state and version (for a replica to adopt)."""
        return {"module": copy.deepcopy(self.module.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "version": self.version}

    def load_state(self, state: dict[str, Any]) -> None:
        """Adopt another replica's :meth:`state`; held gradients and cached graphs are dropped."""
        self.module.load_state_dict(state["module"])
        # load_state_dict keeps tensors that need no cast: copy, or two replicas share moments
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.optimizer.zero_grad(set_to_none=True)
        self.restored(int(state["version"]))

    def digest(self) -> str:
        """BLAKE2b of the parameters' bytes: equal digests, bit-identical replicas. Hashed again
        only when the version moved or a parameter was written in place since (so a digest
        always describes the parameters as they are, at the cost of one hash per version)."""
        key = (self.version, self.param_epoch())
        if self._digest is None or self._digest[0] != key:
            self._digest = (key, parameters_digest(self.module))
        return self._digest[1]

    def digest_if_known(self) -> str | None:
        """:meth:`digest` when it is already hashed for the parameters as they are, else None:
        cheap and safe outside the compute thread."""
        d = self._digest
        return d[1] if d is not None and d[0] == (self.version, self.param_epoch()) else None

    def param_epoch(self) -> int:
        """Changes whenever any parameter is written in place (torch's per-tensor counters):
        a cheap test of "same parameters as when last hashed" for :meth:`digest`'s callers."""
        return sum(p._version for p in self.module.parameters())

    def restored(self, version: int) -> None:
        """After parameters and optimizer state were loaded from a checkpoint taken at ``version``."""
        self.version = version
        self.pending = 0
        self._cache.clear()

    # -- parameter exchange (within-stage averaging, checkpoints) --------------------------------
    def flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).cpu().clone()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def _split(self, flat: torch.Tensor, error: str) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Each parameter with its slice of ``flat`` (in ``flat_parameters`` order), shaped like
        it; ``ValueError(error.format(n=..., got=...))`` when ``flat`` has the wrong length."""
        if flat.numel() != self.num_parameters():
            raise ValueError(error.format(n=self.num_parameters(), got=flat.numel()))
        out, offset = [], 0
        for p in self.module.parameters():
            out.append((p, flat[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
        return out

    def load_flat_parameters(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, part in self._split(flat, "expected {n} parameters, got {got}"):
                p.copy_(part)  # copy_ moves it to p's device
        self._cache.clear()
        self.stats.averaging_rounds += 1
