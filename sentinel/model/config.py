"""Model configuration: one dataclass, shared verbatim by every node through the run manifest.

The defaults describe a small Llama-style byte-level decoder (1,252,992 parameters) that a swarm of
2-core CPU volunteers can train: six layers, so it splits into up to six pipeline stages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    """Shape of the decoder. Every replica of every stage must agree on it bit for bit."""

    vocab_size: int = 256
    """Byte-level: every UTF-8 byte is a token, so any text file is a corpus with no tokenizer files."""
    seq_len: int = 64
    """Context length; also the length of the rotary tables, so longer inputs are rejected."""
    d_model: int = 128
    """Width of the residual stream, i.e. of every tensor that crosses a stage boundary."""
    n_layers: int = 6
    """Transformer blocks in total, split across the pipeline stages."""
    n_heads: int = 4
    """Attention heads; d_model / n_heads must be even for rotary embeddings."""
    d_ff: int = 344
    """SwiGLU hidden width, about 8/3 * d_model (Llama's ratio keeps the MLP at ~2/3 of block params)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of weights; residual-output projections get init_std / sqrt(2 * n_layers)."""
    tie_embeddings: bool = False
    """Share the embedding with the output head. Only possible when one stage holds both ends; stages
    of a pipeline live on different machines, so the default is untied."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even (rotary)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain dict for the run manifest (msgpack/JSON friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of to_dict. Unknown keys are an error: a typo in a manifest must not silently
        fall back to a default and build a different model than the rest of the swarm."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def stage_layers(self, num_stages: int) -> list[range]:
        """Global layer indices held by each stage: an even split, earlier stages take the remainder
        (stage 0 also embeds and the last stage also runs the head, so this roughly balances work)."""
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
        if num_stages > self.n_layers:
            raise ValueError(f"cannot split {self.n_layers} layers into {num_stages} stages (at most one stage per layer)")
        base, extra = divmod(self.n_layers, num_stages)
        ranges, start = [], 0
        for stage in range(num_stages):
            size = base + (1 if stage < extra else 0)
            ranges.append(range(start, start + size))
            start += size
        return ranges

    def hidden_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of the activation that crosses every stage boundary."""
        return (batch, self.seq_len, self.d_model)
