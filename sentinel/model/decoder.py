"""A Llama-style decoder in plain torch: RMSNorm, rotary attention, SwiGLU MLP, pre-norm blocks.

Read top to bottom: the layers, then the deterministic initialisation, then the full model.
Pipeline stages (stages.py) are built from the same three pieces -- embedding, blocks, head -- so a
stage is literally a slice of this model.

Deterministic initialisation is a protocol requirement, not a nicety: replicas of a stage on
different machines must start bit-identical (they average parameters with each other), and the
verifier's screening assumes replicas of a stage compute the same function. So each parameter group
("embed", "layer{i}", "head") is drawn from its own torch.Generator seeded from (seed, group name),
never from the global RNG, and therefore does not depend on which stage, or which machine, builds it.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sentinel.model.config import ModelConfig

# --------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / rms(x) * gain. Cheaper than LayerNorm and no bias to drift."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding with cos/sin tables precomputed for seq_len positions.

    The tables are non-persistent buffers: derived from the config, so they are never part of a
    state dict, never averaged between replicas and never sent over the wire."""

    def __init__(self, head_dim: int, seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [T, hd/2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate x [B, H, T, hd] by position (rotate-half convention)."""
        t = x.size(-2)
        cos, sin = self.cos[:t], self.sin[:t]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)  # residual output
        self.rotary = Rotary(config.head_dim, config.seq_len, config.rope_theta)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)  # residual output

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Head(nn.Module):
    """Final RMSNorm + projection to vocabulary logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.proj = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


# ------------------------------------------------------------------------------ deterministic init

# Parameters that write into the residual stream; GPT-2 scales them by 1/sqrt(2 * n_layers) so the
# residual's variance does not grow with depth.
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")


def group_generator(seed: int, group: str) -> torch.Generator:
    """A CPU generator seeded from (seed, group) by a hash, so groups are independent streams and the
    same on every machine (Python's hash() is salted per process; BLAKE2b is not)."""
    digest = hashlib.blake2b(f"sentinel-init:{seed}:{group}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@torch.no_grad()
def init_group_(module: nn.Module, config: ModelConfig, seed: int, group: str) -> nn.Module:
    """Initialise every parameter of one group in place, in registration order, from its own generator:
    vectors (RMSNorm gains) to one, residual projections to N(0, init_std / sqrt(2 n_layers)),
    other matrices (embedding, qkv, gate/up, head) to N(0, init_std)."""
    gen = group_generator(seed, group)
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, p in module.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0)
        elif name.endswith(RESIDUAL_PROJECTIONS):
            p.normal_(0.0, residual_std, generator=gen)
        else:
            p.normal_(0.0, config.init_std, generator=gen)
    return module


def make_embedding(config: ModelConfig, seed: int) -> nn.Embedding:
    with torch.random.fork_rng(devices=[]):  # nn defaults draw from the global RNG; leave it untouched
        module = nn.Embedding(config.vocab_size, config.d_model)
    return init_group_(module, config, seed, "embed")


def make_block(config: ModelConfig, layer: int, seed: int) -> Block:
    with torch.random.fork_rng(devices=[]):
        module = Block(config)
    return init_group_(module, config, seed, f"layer{layer}")


def make_head(config: ModelConfig, seed: int) -> Head:
    with torch.random.fork_rng(devices=[]):
        module = Head(config)
    return init_group_(module, config, seed, "head")


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats over every position of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# --------------------------------------------------------------------------------------- full model


class Decoder(nn.Module):
    """The whole model in one process: embed -> blocks -> head.

    Its state-dict keys ("embed.weight", "blocks.{i}....", "head....") are exactly the union of the
    stages' keys, so stage checkpoints merge into it with load_state_dict."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embed = make_embedding(config, seed)
        self.blocks = nn.ModuleList(make_block(config, i, seed) for i in range(config.n_layers))
        self.head = make_head(config, seed)
        if config.tie_embeddings:
            self.head.proj.weight = self.embed.weight

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """Token ids [B, T] -> mean loss (0-dim) if targets are given, else logits [B, T, V]."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits if targets is None else language_model_loss(logits, targets)
