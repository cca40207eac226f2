"""Every knob of the screening core, in one documented dataclass.

The live verifier and the simulator build one :class:`ScreeningConfig` (from CLI flags or the run
manifest's verifier policy via :meth:`ScreeningConfig.from_dict`) and hand it to
:class:`sentinel.verifier.screen.Screener`; nothing in the screening core reads a global.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class ScreeningConfig:
    """Parameters of SENTINEL screening, strikes and drift handling; each default with its reason."""

    #: EMA momentum of each replica's reference profile, as in the SENTINEL paper (which reports
    #: it insensitive in 0.6-0.99).
    beta_forward: float = 0.9
    beta_backward: float = 0.8
    #: Accepted distances per boundary: each worker contributes its latest ``window // W`` (at
    #: least 8) to the fit, so the pool turns over every ~``window`` messages whatever W is.
    window: int = 100
    #: Tukey multiplier, flag above ``Q3 + fence_k * IQR``. Beyond the classic "far out" 3: honest
    #: distances are heavy-tailed (micro-batches of 8 sequences differ a lot), and at 3 a clean
    #: 8 x 8 run banned honest workers (BENCHMARKS.md, "One safe screening default").
    fence_k: float = 4.0
    #: Lower bound on the IQR: distances are scale-free, so an absolute floor is meaningful. The
    #: sign distance moves in steps of 1/D (D features), so a small floor lets one flipped
    #: coordinate of a narrow model cross the fence; 0.1 keeps a sign flip (distance ~1) far out.
    fence_iqr_floor: float = 0.1
    #: A worker's distances enter the fence fit only if its median distance is at most this
    #: multiple of the median across workers (``fences.py``): an attacker never widens its fence.
    eligibility_ratio: float = 1.5
    #: Pooled accepted distances (from honest-looking workers) before a boundary's own fences are
    #: trusted; until then verdicts are ``calibrating``.
    min_history: int = 24
    #: Distinct replicas needed before fences are trusted, so the reference is a cross-replica
    #: median and not one worker's say-so; a stage with fewer replicas falls back to temporal
    #: screening of each worker against its own past after ``solo_history`` messages.
    min_workers: int = 3
    solo_history: int = 100
    #: A replica not heard from in this many messages at a boundary leaves the stage's consensus
    #: and the drift vote: its stale state must not steer.
    recent_messages: int = 64
    #: Fixed-size strided sample of each tensor and the number of its quantiles kept, for the
    #: Wasserstein distance; fixed so that its cost does not grow with the tensor.
    sample_size: int = 1024
    num_quantiles: int = 32
    #: The sign-flip ratio counts only coordinates whose reference magnitude is at least this
    #: fraction of the reference's RMS: elsewhere the sign is noise.
    sign_rel_threshold: float = 0.1
    #: Ban at ``strike_limit`` strikes; each clean message forgives ``strike_limit / forgive_after``,
    #: so any count below the limit is wiped out by ``forgive_after`` clean messages and an honest
    #: worker's rare false positives never add up. Five, forgiven in 50: the flags that end a
    #: calibration strike honest replicas in bursts of 2-3, while a persistent attacker (flagged on
    #: every message) is still banned after five messages.
    strike_limit: int = 5
    forgive_after: int = 50
    #: When at least this fraction of the recently seen replicas (and at least two) have their
    #: latest message flagged, and those messages agree, the stage moved: recalibrate from the
    #: median of the replicas' latest profiles instead of striking them. Three quarters: with 3
    #: attackers of 8 flagged at once, one honest false positive must not make "the stage moved".
    drift_fraction: float = 0.75
    #: A flag is a strike only if the flagged tensor is at least this share of its flagged distance
    #: away from another replica's accepted recomputation of the same input
    #: (``BoundaryScreen.confirm``): the worker, not the input, must account for half the anomaly.
    confirm_share: float = 0.5
    #: A spot check (``DriverConfig.spot_check``) disagrees when
    #: :func:`~sentinel.verifier.stats.same_input_distance` reaches this: it sees about half of a
    #: white-box attacker's messages and a few percent of honest pairs, so one checker's
    #: disagreement never strikes (BENCHMARKS.md, "Spot checks").
    spot_tolerance: float = 0.05
    #: Exact spot checks: the share of accepted hops that the verifier also runs on another
    #: replica of the stage, drawn unpredictably per hop, where the replicas are identical
    #: (lockstep stages sign one version and digest; ``DriverConfig.spot_check``). Any exact
    #: disagreement goes to the stage's majority, which bans whoever it outvotes. Asynchronous
    #: replicas differ honestly, so they are not spot-checked by default. 5 %: against the
    #: white-box attacker (8 x 8, 200 steps) F1 1.00 and no honest ban, for about +6 % stage
    #: passes per token (BENCHMARKS.md, "Exact spot checks").
    spot_check: float = 0.05
    #: A replica's averaging contribution is flagged (a strike in the same ledger as pipeline
    #: flags) when its distance to the round's coordinate-wise median exceeds this many times the
    #: round's spread (``sentinel.protocol.aggregation.contribution_scores``); live, replicas
    #: complain with the contributor's signed reply and each verifier re-judges it
    #: (``sentinel.verifier.complaints``); the simulator judges every round. 0 turns it off.
    averaging_outlier_ratio: float = 3.0
    #: The spread counts as at least this fraction of the median's norm: replicas average
    #: asynchronously, so right after most of a stage averaged one honest replica that has not
    #: yet is many spreads away while only one update from the rest (docs/design.md).
    averaging_outlier_floor: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with an actionable message on an out-of-range value."""
        for name in ("beta_forward", "beta_backward"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("window", "min_history", "min_workers", "solo_history", "recent_messages",
                     "sample_size", "num_quantiles", "strike_limit", "forgive_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("fence_k", "fence_iqr_floor", "sign_rel_threshold", "eligibility_ratio",
                     "averaging_outlier_ratio", "averaging_outlier_floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if not (isinstance(self.confirm_share, (int, float)) and 0.0 < self.confirm_share <= 1.0):
            raise ValueError(f"confirm_share must be in (0, 1], got {self.confirm_share!r}")
        if not (isinstance(self.spot_check, (int, float)) and 0.0 <= self.spot_check <= 1.0):
            raise ValueError(f"spot_check must be in [0, 1], got {self.spot_check!r}")
        if not (isinstance(self.spot_tolerance, (int, float)) and 0.0 < self.spot_tolerance <= 1.0):
            raise ValueError(f"spot_tolerance must be in (0, 1], got {self.spot_tolerance!r}")
        if not 0.0 < self.drift_fraction <= 1.0:
            raise ValueError(f"drift_fraction must be in (0, 1], got {self.drift_fraction!r}")
        if self.min_history > self.window * self.min_workers and self.min_history > self.window:
            raise ValueError("min_history can never be reached with this window; raise window")

    def beta(self, direction: str) -> float:
        """EMA momentum for ``direction`` ("forward" or "backward")."""
        if direction == "forward":
            return self.beta_forward
        if direction == "backward":
            return self.beta_backward
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for the run manifest and reports)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScreeningConfig:
        """Build from a (partial) dict; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown screening config keys: {unknown}; known: {sorted(known)}")
        return cls(**d)
