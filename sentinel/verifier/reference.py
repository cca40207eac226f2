"""Scale-free reference profiles, their EMA, their robust median, and the distances between them.

A :class:`Profile` is the scale-free view of :class:`~sentinel.verifier.stats.TensorStats` (its
fields say what each is). Only ``log_rms`` carries the scale, so a legitimate change of scale moves
exactly one statistic, whose EMA follows it smoothly; nothing has to be re-learnt.

The distances, all dimensionless (docs/design.md, "Profiles and distances"):

* ``l1``, ``l2`` on ``direction``, normalised symmetrically to [0, 1] (sign flip ~1, zeros 1), so
  a tiny reference (backward batch-means are mostly noise) cannot blow them up;
* ``sign``: share of sign disagreements where the reference is not ~0 (``sign_rel_threshold``);
* ``w1``: Wasserstein-1 distance of the ``shape_q`` quantile functions, in reference RMS units;
* ``norm_ratio``: ``|log(gain / gain_ref)|`` where the hop has a source, else ``|log(rms / rms_ref)|``;
  two-sided, so zeros and scaling both show. A gradient's RMS follows the incoming gradient's
  swings and any scaling accepted downstream; an honest residual stage's gain stays near 1;
* ``spread``: ``|log(token_cv / token_cv_ref)|``; additive noise of a gradient's own RMS halves
  the dispersion while moving the norm by only sqrt(2), inside honest variation;
* ``skip``: ``|log_skip - log_skip_ref|``, two-sided: outputs that turn away from their inputs
  more than the replicas' (sign flip, noise, stale or random) and far less (a lazy identity)
  both show; 0 when either side has no source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sentinel.verifier.stats import MAX_FEATURES, MAX_QUANTILES, TensorStats

#: Names of the fenced distances, in a fixed order (also the column order of the histories).
DISTANCES: tuple[str, ...] = ("l1", "l2", "sign", "w1", "norm_ratio", "spread", "skip")
#: Misalignments (1 - cosine) below about this are treated as equal: float noise and a model at
#: initialisation (blocks that add almost nothing) must not look infinitely far apart on a log axis.
SKIP_RESOLUTION = 0.01
_LOG_SKIP_MIN = math.log(SKIP_RESOLUTION)  # cosine +1
_LOG_SKIP_MAX = math.log(2.0 + SKIP_RESOLUTION)  # cosine -1
#: token_cv below this is treated as this (a single-row tensor or perfectly even spread).
MIN_SPREAD = 1e-6
#: RMS below this counts as an all-zero tensor (log_rms is clamped here: log(1e-30) ~ -69).
TINY = 1e-30


@dataclass
class Profile:
    """Scale-free statistics of one tensor, or an EMA / median of several (see module docstring)."""

    #: ``mean_vec / rms``: the batch-mean direction, independent of the overall scale.
    direction: torch.Tensor
    #: The scale, on a log axis so that "x10" and "x0.1" are equally far and an EMA of it is a
    #: geometric mean (gradients decaying 50x are a straight line, not a cliff).
    log_rms: float
    #: ``quantiles / rms``: the distribution's shape, independent of scale.
    shape_q: torch.Tensor
    #: The raw batch-mean, kept only for the paper's substitution fallback.
    mean_vec: torch.Tensor
    #: Log of the dispersion of per-token norms (``token_cv``), scale-free.
    log_spread: float = math.log(MIN_SPREAD)
    #: ``log(1 - skip + SKIP_RESOLUTION)``: how far each token's output turned from its own input,
    #: on a log axis so that "10x more misaligned than the replicas" is the same distance whatever
    #: the honest misalignment. None where the hop has no source (stage 0 forward, last backward, loss).
    log_skip: float | None = None
    #: ``log(rms / source_rms)``: the scale the hop itself adds. None without a source or when the
    #: source is ~0.
    log_gain: float | None = None

    @property
    def features(self) -> int:
        return int(self.direction.numel())

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction.tolist(),
            "log_rms": self.log_rms,
            "shape_q": self.shape_q.tolist(),
            "mean_vec": self.mean_vec.tolist(),
            "log_spread": self.log_spread,
            "log_skip": self.log_skip,
            "log_gain": self.log_gain,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Parse a gossiped profile; ``ValueError`` on anything malformed or non-finite."""
        keys = {"direction", "log_rms", "shape_q", "mean_vec", "log_spread"}
        if not isinstance(d, dict) or not keys <= set(d) <= keys | {"log_skip", "log_gain"}:
            raise ValueError("profile must be a dict with direction, log_rms, shape_q, mean_vec, log_spread "
                             "(and optionally log_skip, log_gain)")
        direction = _finite_vector(d["direction"], "direction", MAX_FEATURES)
        mean_vec = _finite_vector(d["mean_vec"], "mean_vec", MAX_FEATURES)
        shape_q = _finite_vector(d["shape_q"], "shape_q", MAX_QUANTILES)
        if direction.numel() != mean_vec.numel():
            raise ValueError("direction and mean_vec sizes differ")
        log_rms = d["log_rms"]
        for name in ("log_rms", "log_spread"):
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number")
        log_skip = d.get("log_skip")
        if log_skip is not None and not (
            isinstance(log_skip, (int, float)) and not isinstance(log_skip, bool)
            and _LOG_SKIP_MIN - 1e-6 <= log_skip <= _LOG_SKIP_MAX + 1e-6
        ):
            raise ValueError(f"log_skip must be null or a number in [{_LOG_SKIP_MIN:.3f}, {_LOG_SKIP_MAX:.3f}]")
        log_gain = d.get("log_gain")
        if log_gain is not None and (isinstance(log_gain, bool) or not isinstance(log_gain, (int, float))
                                     or not math.isfinite(log_gain)):
            raise ValueError("log_gain must be null or a finite number")
        return cls(direction, float(log_rms), shape_q, mean_vec, float(d["log_spread"]),
                   None if log_skip is None else float(log_skip), None if log_gain is None else float(log_gain))


def _finite_vector(v: Any, name: str, max_len: int) -> torch.Tensor:
    if not isinstance(v, list) or not 0 < len(v) <= max_len:
        raise ValueError(f"{name} must be a non-empty list of at most {max_len} numbers")
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
        raise ValueError(f"{name} must contain numbers only")
    t = torch.tensor(v, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def profile_of(stats: TensorStats) -> Profile:
    """Scale-free profile of finite stats."""
    rms = max(stats.rms, TINY)
    inv = 1.0 / rms
    return Profile(
        direction=stats.mean_vec.float() * inv,
        log_rms=math.log(rms),
        shape_q=stats.quantiles.float() * inv,
        mean_vec=stats.mean_vec.float(),
        log_spread=math.log(max(stats.token_cv, MIN_SPREAD)),
        log_skip=None if stats.skip is None else math.log(max(1.0 - stats.skip, 0.0) + SKIP_RESOLUTION),
        log_gain=(None if stats.source_rms is None or not stats.source_rms > TINY
                  else math.log(rms) - math.log(stats.source_rms)),
    )


def ema_update(ref: Profile, new: Profile, beta: float) -> Profile:
    """``beta * ref + (1 - beta) * new`` coordinate-wise (a new object; ``ref`` is not mutated)."""
    a = 1.0 - beta
    return Profile(
        direction=torch.lerp(ref.direction, new.direction, a),
        log_rms=beta * ref.log_rms + a * new.log_rms,
        shape_q=torch.lerp(ref.shape_q, new.shape_q, a),
        mean_vec=torch.lerp(ref.mean_vec, new.mean_vec, a),
        log_spread=beta * ref.log_spread + a * new.log_spread,
        log_skip=_ema_optional(ref.log_skip, new.log_skip, beta),
        log_gain=_ema_optional(ref.log_gain, new.log_gain, beta),
    )


def _ema_optional(ref: float | None, new: float | None, beta: float) -> float | None:
    """EMA of an optional statistic: a missing side leaves the other as it is."""
    if ref is None or new is None:
        return new if ref is None else ref
    return beta * ref + (1.0 - beta) * new


def _median0(rows: list[torch.Tensor]) -> torch.Tensor:
    if len(rows) == 1:
        return rows[0]
    if len(rows) == 2:
        return (rows[0] + rows[1]) * 0.5
    if len(rows) == 3:  # the common case (4 replicas: "the other three"), without stack + sort
        a, b, c = rows
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    s = torch.stack(rows).sort(0).values
    n = len(rows)
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) * 0.5


def median_profile(profiles: Sequence[Profile]) -> Profile:
    """Coordinate-wise median (mean of the two middle values for an even count).

    With an honest majority every coordinate of the result lies within the range of the honest
    values, whatever the minority sends.
    """
    if not profiles:
        raise ValueError("median of no profiles")
    if len(profiles) == 1:
        return profiles[0]
    return Profile(
        direction=_median0([p.direction for p in profiles]),
        log_rms=_median_scalar([p.log_rms for p in profiles]),
        shape_q=_median0([p.shape_q for p in profiles]),
        mean_vec=_median0([p.mean_vec for p in profiles]),
        log_spread=_median_scalar([p.log_spread for p in profiles]),
        log_skip=_median_or_none([p.log_skip for p in profiles]),
        log_gain=_median_or_none([p.log_gain for p in profiles]),
    )


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return _median_scalar(present) if present else None


def _median_scalar(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def distances(p: Profile, ref: Profile, sign_rel_threshold: float) -> dict[str, float]:
    """The fenced distances of ``p`` to ``ref`` (see module docstring); all finite, >= 0."""
    a, b = p.direction, ref.direction
    diff = a - b
    abs_a, abs_b = a.abs(), b.abs()
    l1 = float(diff.abs().sum()) / (float(abs_a.sum()) + float(abs_b.sum()) + TINY)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    l2 = float(torch.linalg.vector_norm(diff)) / (na + nb + TINY)
    rms_b = nb / math.sqrt(max(b.numel(), 1))
    if rms_b > TINY:
        mask = abs_b >= sign_rel_threshold * rms_b
        counted = int(mask.sum())
        sign = float(((a * b) <= 0)[mask].sum()) / counted if counted else 0.0
    else:
        sign = 0.0
    w1 = float((p.shape_q - ref.shape_q).abs().mean())
    if p.log_gain is not None and ref.log_gain is not None:
        norm_ratio = abs(p.log_gain - ref.log_gain)
    else:
        norm_ratio = abs(p.log_rms - ref.log_rms)
    spread = abs(p.log_spread - ref.log_spread)
    skip = abs(p.log_skip - ref.log_skip) if p.log_skip is not None and ref.log_skip is not None else 0.0
    return {"l1": l1, "l2": l2, "sign": sign, "w1": w1, "norm_ratio": norm_ratio, "spread": spread, "skip": skip}
