"""Per-tensor statistics: the only thing screening ever looks at.

:func:`compute_stats` is the hot path (every tensor crossing every boundary): three memory-bound
passes, and nothing else touches every element:

1. ``ones @ x.view(-1, D)`` (gemv) -> per-feature sums -> ``mean_vec`` and the global mean;
2. per-token norms -> RMS and their dispersion across tokens: honest activations and gradients
   concentrate on some tokens, while noise, random tensors and lazy shortcuts spread energy evenly;
3. ``aminmax(x)`` -> absmax, and finiteness for free (NaN propagates, an infinity *is* the min
   or max), so no ``isfinite(x).all()``, which is ~30x slower than a reduction.

With the hop's *source* (the input activation, or the gradient sent into the stage), one more
pass gives ``skip``, the mean over tokens of ``cos(source_t, x_t)``: a residual stage keeps each
token's output aligned with its input in both directions, so sign flips, noise, element flips and
random, lazy or stale outputs pull it down in one message, at any batch size. It also gives
``source_rms`` for the hop's gain ``rms / source_rms``, which stays near 1 for an honest stage
whatever came in (docs/design.md, "Statistics").

The shape comes from a fixed-size strided sample, so its cost does not grow with the tensor.
:class:`TensorStats` travels as ban *evidence*, so :meth:`TensorStats.from_dict` treats it as hostile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from sentinel.run.screening import ScreeningConfig

#: Largest feature dimension accepted from a (possibly hostile) evidence record.
MAX_FEATURES = 1 << 20
#: Largest number of quantiles accepted from an evidence record.
MAX_QUANTILES = 4096
#: Sample offsets are scrambled with this prime so the strided sample does not alias onto one
#: feature column when ``numel // sample_size`` is a multiple of the feature dimension.
_SCRAMBLE = 7919


@dataclass
class TensorStats:
    """Everything screening needs from one tensor.

    ``mean_vec`` is the mean over all dimensions but the last (the feature dimension); a 0-dim
    tensor (the loss) gives a 1-element vector. ``quantiles`` are ``num_quantiles`` quantiles (at
    levels ``(j + 0.5) / num_quantiles``) of a fixed strided sample of the tensor.
    """

    shape: tuple[int, ...]
    numel: int
    finite: bool
    mean_vec: torch.Tensor
    rms: float
    mean: float
    std: float
    absmax: float
    quantiles: torch.Tensor
    token_cv: float = 0.0  # std / mean of the per-token (row) L2 norms; 0 for a single row
    skip: float | None = None  # mean per-token cos(source, x) when the hop's source is known
    source_rms: float | None = None  # RMS of the hop's source, when known (for the hop's gain)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (non-finite values stay Python floats: NaN/inf)."""
        return {
            "shape": list(self.shape),
            "numel": self.numel,
            "finite": self.finite,
            "mean_vec": [float(v) for v in self.mean_vec.tolist()],
            "rms": self.rms,
            "mean": self.mean,
            "std": self.std,
            "absmax": self.absmax,
            "quantiles": [float(v) for v in self.quantiles.tolist()],
            "token_cv": self.token_cv,
            "skip": self.skip,
            "source_rms": self.source_rms,
        }

    @classmethod
    def from_dict(cls, d: Any) -> TensorStats:
        """Parse and validate; raise ``ValueError`` on anything that is not a well-formed record."""
        if not isinstance(d, dict):
            raise ValueError("tensor stats must be a dict")
        expected = {"shape", "numel", "finite", "mean_vec", "rms", "mean", "std", "absmax", "quantiles", "token_cv"}
        if not expected <= set(d) <= expected | {"skip", "source_rms"}:
            raise ValueError(f"tensor stats keys must be {sorted(expected)} (+ optional skip, source_rms), "
                             f"got {sorted(d)}")
        skip = d.get("skip")
        if skip is not None and not (_is_number(skip) and -1.0 - 1e-6 <= skip <= 1.0 + 1e-6):
            raise ValueError("skip must be null or a number in [-1, 1]")
        source_rms = d.get("source_rms")
        if source_rms is not None and not (_is_number(source_rms) and math.isfinite(source_rms) and source_rms >= 0):
            raise ValueError("source_rms must be null or a finite non-negative number")
        shape = d["shape"]
        if not isinstance(shape, (list, tuple)) or len(shape) > 16 or not all(_is_int(s) and s >= 0 for s in shape):
            raise ValueError("shape must be a list of at most 16 non-negative integers")
        shape = tuple(int(s) for s in shape)
        numel = d["numel"]
        if not _is_int(numel) or numel != math.prod(shape):
            raise ValueError("numel must be an integer equal to the product of shape")
        if not isinstance(d["finite"], bool):
            raise ValueError("finite must be a bool")
        features = shape[-1] if shape else 1
        mean_vec = _float_list(d["mean_vec"], "mean_vec", MAX_FEATURES)
        if len(mean_vec) != max(features, 1):
            raise ValueError(f"mean_vec has {len(mean_vec)} entries, shape says {features}")
        quantiles = _float_list(d["quantiles"], "quantiles", MAX_QUANTILES)
        if not quantiles:
            raise ValueError("quantiles must not be empty")
        scalars = {}
        for key in ("rms", "mean", "std", "absmax", "token_cv"):
            value = d[key]
            if not _is_number(value):
                raise ValueError(f"{key} must be a number")
            scalars[key] = float(value)
        return cls(
            shape=shape,
            numel=int(numel),
            finite=d["finite"],
            mean_vec=torch.tensor(mean_vec, dtype=torch.float32),
            quantiles=torch.tensor(quantiles, dtype=torch.float32),
            skip=None if skip is None else float(skip),
            source_rms=None if source_rms is None else float(source_rms),
            **scalars,
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float_list(v: Any, name: str, max_len: int) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) > max_len or not all(_is_number(e) for e in v):
        raise ValueError(f"{name} must be a list of at most {max_len} numbers")
    return [float(e) for e in v]


@lru_cache(maxsize=64)
def _sample_index(numel: int, m: int) -> torch.Tensor:
    """``m`` element indices spread over ``[0, numel)``: one per block, at a scrambled offset."""
    stride = numel // m
    i = torch.arange(m, dtype=torch.int64)
    return i * stride + (i * _SCRAMBLE) % stride


@lru_cache(maxsize=64)
def _quantile_weights(m: int, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-interpolation positions of quantile levels ``(j + 0.5) / q`` in a sorted ``m``-vector."""
    pos = (torch.arange(q, dtype=torch.float64) + 0.5) / q * (m - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=m - 1)
    frac = (pos - lo.double()).float()
    return lo, hi, frac


@lru_cache(maxsize=16)
def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32)


def compute_stats(x: torch.Tensor, config: ScreeningConfig, source: torch.Tensor | None = None) -> TensorStats:
    """Statistics of ``x`` in three memory-bound passes (see module docstring).

    ``source`` (same shape as ``x``, else ignored) adds ``skip``, the mean per-token cosine
    between the hop's source and ``x``, and ``source_rms``.
    """
    shape = tuple(x.shape)
    numel = x.numel()
    features = shape[-1] if shape else 1
    q = config.num_quantiles
    if numel == 0:
        return TensorStats(shape, 0, True, torch.zeros(max(features, 1)), 0.0, 0.0, 0.0, 0.0, torch.zeros(q))
    if x.dtype != torch.float32:
        x = x.float()
    flat = x.reshape(-1, features)
    rows = flat.shape[0]
    if rows <= 64:
        col_sum = flat.sum(0)  # gemv setup costs more than it saves on a handful of rows
    else:
        col_sum = _ones(rows) @ flat
    mean_vec = col_sum / rows
    row_norms = torch.linalg.vector_norm(flat, dim=1)
    rms = float(torch.linalg.vector_norm(row_norms)) / math.sqrt(numel)
    if rows > 1:
        mean_norm = float(row_norms.mean())
        token_cv = float(row_norms.std()) / mean_norm if mean_norm > 0 else 0.0
    else:
        token_cv = 0.0
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    finite = math.isfinite(lo_f) and math.isfinite(hi_f)
    mean = float(col_sum.sum()) / numel
    std = math.sqrt(max(rms * rms - mean * mean, 0.0)) if finite else float("nan")
    absmax = max(abs(lo_f), abs(hi_f))

    m = min(config.sample_size, numel)
    values = x.reshape(-1)
    sample = values if m == numel else values[_sample_index(numel, m)]
    ordered = torch.sort(sample).values
    qlo, qhi, frac = _quantile_weights(m, q)
    quantiles = torch.lerp(ordered[qlo], ordered[qhi], frac)
    if not math.isfinite(token_cv):
        token_cv = 0.0
    skip = source_rms = None
    if source is not None and tuple(source.shape) == shape and rows > 0 and finite:
        skip, source_rms = _skip_cosine(source.reshape(-1, features).float(), flat, row_norms)
    return TensorStats(shape, numel, finite, mean_vec, rms, mean, std, absmax, quantiles, token_cv, skip,
                       source_rms)


_DOT_CHUNK = 1 << 18  # elements per chunk of the row-dot pass: a 1 MiB temporary stays in cache


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of two ``(rows, features)`` tensors, one pass over each.

    Chunked multiply-and-sum: on one core of the 2-core machine, for 16x1024x1024 fp32, 14 ms
    against 27 ms for batched 1x1 ``bmm``, 27 ms for ``einsum`` and 60-75 ms for ``vecdot`` or a
    whole-tensor ``(a * b).sum(1)`` (whose 67 MB temporary goes through memory twice).
    """
    rows, features = a.shape
    step = max(1, _DOT_CHUNK // max(features, 1))
    if rows <= step:
        return (a * b).sum(1)
    dots = torch.empty(rows, dtype=a.dtype)
    for i in range(0, rows, step):
        torch.sum(a[i:i + step] * b[i:i + step], 1, out=dots[i:i + step])
    return dots


def _skip_cosine(src: torch.Tensor, out: torch.Tensor,
                 out_norms: torch.Tensor) -> tuple[float | None, float | None]:
    """(Mean over rows of ``cos(src_i, out_i)``, over the rows whose source is not ~0; RMS of ``src``).

    A zero *output* row has no direction: it counts as orthogonal (cos 0), which is what makes an
    all-zeros reply score like a random one. A zero *source* row (a token that got no gradient)
    says nothing about the reply and is left out; None when every row is like that, or when the
    source is non-finite (it was screened upstream, so that would be the verifier's own bug).
    """
    src_norms = torch.linalg.vector_norm(src, dim=1)
    src_rms = float(torch.linalg.vector_norm(src_norms)) / math.sqrt(max(src.numel(), 1))
    if not math.isfinite(src_rms):
        return None, None
    dots = _row_dots(src, out)
    denom = src_norms * out_norms
    live = src_norms > 1e-30
    count = int(live.sum())
    if count == 0:
        return None, src_rms
    cos = torch.where(denom > 0, dots / denom.clamp_min(1e-30), torch.zeros_like(dots))
    value = float(cos[live].sum()) / count if count < cos.numel() else float(cos.mean())
    if not math.isfinite(value):
        return None, src_rms
    return max(-1.0, min(1.0, value)), src_rms


def same_input_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / (||a|| + ||b||)`` over the whole tensors, in [0, 1]: how far two answers to
    the same input are apart (0 identical, 1 opposite or one of them zero).

    Used by spot checks (``BoundaryScreen.disagree``). Symmetric, scale-free, and over the raw
    tensors rather than a profile: two honest replicas' outputs for one batch differ by their
    parameter divergence only, which scale-free profile statistics (log gain, per-token
    alignment) magnify, while a push of ``m * rms`` along a fixed direction shows as ~``m / 2``.
    Computed in float32; non-finite input gives NaN.
    """
    a32, b32 = a.detach().reshape(-1).float(), b.detach().reshape(-1).float()
    den = float(torch.linalg.vector_norm(a32)) + float(torch.linalg.vector_norm(b32))
    num = float(torch.linalg.vector_norm(a32 - b32))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("nan")
    return num / den
