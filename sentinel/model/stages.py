"""Pipeline stages: stage k = embedding (if first) + blocks[a:b] + head (if last).

A thin layer over decoder.py. Stage parameters come from the same per-group generators as the full
model, so composing build_stage(cfg, k, S, seed) for k = 0..S-1 computes exactly what
build_full_model(cfg, seed) computes, and every replica of stage k starts bit-identical.

Backward across machines (what a worker does, statelessly):

    x.requires_grad_()            # middle/last stages; stage 0's input is token ids
    out = stage(x, targets)       # targets only on the last stage
    out.backward(grad_out)        # grad_out = None on the last stage (out is the loss)
    send(x.grad)                  # upstream; stage 0 has nothing to send

`StageModule.recompute_backward` does exactly this.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from sentinel.model.config import ModelConfig
from sentinel.model.decoder import Decoder, language_model_loss, make_block, make_embedding, make_head


class StageModule(nn.Module):
    """One pipeline stage. Blocks are keyed by their global layer index, so state-dict keys match
    the full model's ("blocks.3.attn.qkv.weight") and stage checkpoints merge without renaming."""

    def __init__(self, config: ModelConfig, stage: int, num_stages: int, seed: int = 0) -> None:
        super().__init__()
        layers = config.stage_layers(num_stages)  # validates num_stages
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
        if config.tie_embeddings and num_stages > 1:
            raise ValueError("tie_embeddings needs embedding and head on one stage; use num_stages=1 or untie")
        self.config = config
        self.stage = stage
        self.num_stages = num_stages
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        self.layers: range = layers[stage]
        self.embed = make_embedding(config, seed) if self.is_first else None
        self.blocks = nn.ModuleDict({str(i): make_block(config, i, seed) for i in self.layers})
        self.head = make_head(config, seed) if self.is_last else None
        if config.tie_embeddings:
            self.head.proj.weight = self.embed.weight

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """First stage: token ids [B, T] int64; later stages: hidden [B, T, D] float32.
        Last stage: mean cross-entropy (0-dim) if targets are given, else logits [B, T, V].
        Other stages: hidden [B, T, D]."""
        self._check_input(x)
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.head is None:
            return x
        logits = self.head(x)
        return logits if targets is None else language_model_loss(logits, targets)

    def recompute_backward(self, x: Tensor, grad_out: Tensor | None = None,
                           targets: Tensor | None = None) -> Tensor | None:
        """Stateless backward: recompute forward from the input, accumulate parameter gradients
        (into .grad, on top of what is there), and return the gradient for the upstream stage
        (None for the first stage, whose input is token ids). On the last stage grad_out may be None
        (out is the scalar loss, d loss / d loss = 1)."""
        x = x.detach()
        if not self.is_first:
            x.requires_grad_(True)
        with torch.enable_grad():
            out = self(x, targets)
            out.backward(grad_out)
        return None if self.is_first else x.grad

    def input_spec(self, batch: int) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of what this stage accepts, for checking messages against the manifest."""
        if self.is_first:
            return ("int64", (batch, self.config.seq_len))
        return ("float32", self.config.hidden_shape(batch))

    def output_spec(self, batch: int) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of what this stage returns in training: the loss scalar for the last stage."""
        if self.is_last:
            return ("float32", ())
        return ("float32", self.config.hidden_shape(batch))

    def _check_input(self, x: Tensor) -> None:
        cfg = self.config
        if self.is_first:
            ok = x.dtype == torch.int64 and x.dim() == 2
            want = "int64 token ids [B, T]"
        else:
            ok = x.dtype == torch.float32 and x.dim() == 3 and x.size(-1) == cfg.d_model
            want = f"float32 hidden states [B, T, {cfg.d_model}]"
        if not ok or not 1 <= x.size(1) <= cfg.seq_len:
            raise ValueError(f"stage {self.stage}/{self.num_stages} expects {want} with T <= {cfg.seq_len}, "
                             f"got {x.dtype} {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"stage={self.stage}/{self.num_stages}, layers={list(self.layers)}"


def build_stage(config: ModelConfig, stage: int, num_stages: int, seed: int = 0) -> StageModule:
    """Stage `stage` of `num_stages`, initialised deterministically from `seed`."""
    return StageModule(config, stage, num_stages, seed)


def build_full_model(config: ModelConfig, seed: int = 0) -> Decoder:
    """The whole model in one module, with the same parameters as all stages composed."""
    return Decoder(config, seed)


def stage_parameters_count(config: ModelConfig, stage: int, num_stages: int) -> int:
    """Parameters held by one stage, computed from the config without building anything."""
    layers = config.stage_layers(num_stages)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
    d, v = config.d_model, config.vocab_size
    per_block = 2 * d + 4 * d * d + 3 * d * config.d_ff  # two norms, qkv + proj, gate/up/down
    count = len(layers[stage]) * per_block
    if stage == 0:
        count += v * d
    if stage == num_stages - 1:
        count += d + (0 if config.tie_embeddings else v * d)
    return count


def arithmetic_signature(device: torch.device) -> str:
    """What decides a stage's bits besides its parameters: the torch build, the device model
    and, on a CPU, the thread count (parallel reductions sum in another order). Two replicas
    with the same signature, version and digest must answer one input bit-identically."""
    if device.type == "cuda":
        return f"torch {torch.__version__} cuda:{torch.cuda.get_device_name(device)}"
    model = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"torch {torch.__version__} cpu:{model}:{torch.get_num_threads()}threads"


def parameters_digest(module: nn.Module) -> str:
    """BLAKE2b of the parameters' bytes, in order: equal digests, bit-identical stages. What a
    lockstep replica signs with every answer and what a re-check is held to."""
    h = hashlib.blake2b(digest_size=16)
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


#: One backward pass a replica served: (input, gradient from the next stage or None on the last
#: stage, targets on the last stage else None).
Pass = tuple[Tensor, "Tensor | None", "Tensor | None"]


def backward_seed(module: StageModule, out: Tensor, grad_out: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor | None]:
    """What back-propagation through ``module`` starts from, scaled by ``scale`` (1 / the passes
    a step accumulates): the loss on the last stage, else the stage output with the gradient the
    next stage sent back."""
    if module.is_last:
        return out * scale, None
    if grad_out is None:
        raise ValueError("backward on a non-last stage needs grad_out")
    return out, grad_out.to(out.device) * scale


def mean_gradient(module: nn.Module, passes: int, accumulate: int = 1) -> Tensor:
    """The mean parameter gradient of the ``passes`` backward passes accumulated in ``module``,
    flat float32 on the CPU (zeros where a parameter got none; each pass was scaled by
    ``1 / accumulate``)."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                      for p in module.parameters()]).cpu().float()
    return flat * (accumulate / max(1, passes))


def recompute_gradient(module: StageModule, passes: Sequence[Pass], accumulate: int = 1) -> tuple[Tensor, int]:
    """:func:`mean_gradient` of ``passes`` as a replica holding these parameters accumulates them
    (the same operations in the same order, so the same bits on the same arithmetic), and how
    many passes it averages. The module's own accumulated gradients are left as they were: this
    is the re-check of another replica's contribution."""
    params = list(module.parameters())
    device = params[0].device
    saved = [q.grad for q in params]
    for q in params:
        q.grad = None
    try:
        for x, grad_out, targets in passes:
            x = x.to(device)
            leaf = x if module.is_first else x.detach().requires_grad_(True)
            out = module(leaf, targets.to(device) if module.is_last and targets is not None else None)
            torch.autograd.backward(*backward_seed(module, out, grad_out, 1.0 / accumulate))
        return mean_gradient(module, len(passes), accumulate), len(passes)
    finally:
        for q, g in zip(params, saved, strict=True):
            q.grad = g


def merge_stage_states(stages: list[StageModule]) -> dict[str, Tensor]:
    """Union of the stages' state dicts: load it into build_full_model(cfg) to evaluate the pipeline's
    current parameters in one process."""
    merged: dict[str, Tensor] = {}
    for stage in stages:
        merged.update(stage.state_dict())
    return merged
