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
    """Parameters of SENTINEL screening, strikes and drift handling.

    Defaults and why:

    * ``beta_forward`` / ``beta_backward`` — EMA momentum of each replica's reference statistics,
      as reported by the SENTINEL paper (insensitive in 0.6-0.99).
    * ``window`` — accepted distances kept *per worker* per boundary; the fences are fitted on
      the pooled windows of the honest-looking workers (see ``screen.py``).
    * ``fence_k`` — Tukey multiplier: flag when a distance exceeds ``Q3 + fence_k * IQR``.
      3.0 is Tukey's "far out" fence. Measured on the synthetic honest streams of
      ``tests/test_screening.py`` (4 replicas, 3 seeds x 2000 messages; forward activations
      growing 50x while their direction rotates, backward gradients decaying 50x; five distances
      each): false-positive rate 0.65 % forward / 0.17 % backward per message with k=3.0,
      against 4.4 % / 3.9 % with the classic k=1.5. With k=3.0, attacks by 1 of 4 replicas from
      step 0 are still flagged on 100 % of the attacker's messages (sign flip, zeros, x10;
      97-98 % live, the rest retroactively) and 91 % for additive Gaussian noise sigma=1 on
      gradients, the hardest case (the norm ratio, ~0.35 against an honest ~0.05, carries it).
    * ``fence_iqr_floor`` — lower bound on the IQR (distances are scale-free, so an absolute
      floor is meaningful): a perfectly constant history must not flag float noise.
    * ``eligibility_ratio`` — a worker's distances enter the fence fit only if its median
      distance is at most this multiple of the median across workers (``fences.py``).
    * ``min_history`` — pooled accepted distances (from honest-looking workers) needed before
      a boundary's own fences are trusted; before that verdicts are ``calibrating``.
    * ``min_workers`` — distinct replicas needed before fences are trusted, so the reference
      is a cross-replica median and not one worker's say-so. A stage served by fewer replicas
      falls back to temporal screening after ``solo_history`` messages.
    * ``recent_messages`` — a replica not heard from in this many messages at a boundary is
      no longer part of the stage's consensus or of the drift vote.
    * ``sample_size`` / ``num_quantiles`` — fixed-size strided sample of each tensor and the
      number of its quantiles kept, for the distribution (Wasserstein) distance.
    * ``sign_rel_threshold`` — the sign-flip ratio only counts coordinates whose reference
      magnitude is at least this fraction of the reference's RMS (elsewhere the sign is noise).
    * ``strike_limit`` / ``forgive_after`` — ban at ``strike_limit`` strikes; each clean
      message forgives ``strike_limit / forgive_after`` strikes, so any strike count below the
      limit is fully forgiven after ``forgive_after`` clean messages.
    * ``confirm_share`` — a fence flag becomes a strike only if the flagged tensor is at least
      this share of its flagged distance away from another replica's accepted recomputation of
      the same input (``BoundaryScreen.confirm``): with 0.5, the worker must account for at
      least half of the anomaly. Honest same-input pairs sit at a few percent of the fences.
    * ``spot_tolerance`` — a spot check (``DriverConfig.spot_check``: another replica
      recomputes an *accepted* hop) disagrees with the checked tensor when their
      :func:`~sentinel.verifier.stats.same_input_distance` reaches this. Measured in the
      simulator (16 x 8, tiny model, tinyshakespeare, 80 steps; BENCHMARKS "Spot checks"): honest
      same-input pairs at median 0.003-0.005 forward and 0.001-0.002 backward, 99th percentile
      0.04-0.08 forward and 0.09-0.16 backward (replicas diverge between averaging rounds, and
      gradients magnify it); the white-box attacker riding just below the fences at median
      0.05-0.06 from an honest recomputation. So 0.05 sees about half of its messages, and an
      honest pair disagrees on a few percent: one checker's disagreement never strikes (see
      ``DriverConfig.spot_check``).
    * ``drift_fraction`` — when at least this fraction of the recently seen replicas (and at
      least two) have their latest message fence-flagged, the stage moved: recalibrate from
      the median of the replicas' latest statistics instead of striking them.
    * ``recalibration_guard`` — off (0) by default. While a boundary recalibrates after a shift
      its own fences are not trusted; with a factor k > 0 every message is still judged by the
      fences from before the shift times k, so a gross attack that begins inside the window (a
      sign flip: 3.4-4x the fences on ``sign`` and ``skip``, measured live) is flagged instead of
      passed on. Measured cost, and why it is off: in the simulator (3 x 3, default model, 12
      micro-batches per step, 60 clean steps, seeds 0-1) k=3 raised the honest flags from 74 to
      108 and the honest strikes from 8 to 22 on seed 0 and banned an honest stage-0 replica at
      step 8 (none with the guard off): early in training the stage moves too fast for fences
      a few steps old, and the recomputation that should clear an honest flag comes from a
      replica that has drifted too. With 4 micro-batches per step (8 seeds, attack from step
      12 of 30) k=2 doubled the honest flags and k=3 added a sixth, without changing the ban
      latencies.
    * ``averaging_outlier_ratio`` — 3. The other axis: a replica's contribution to its
      stage's averaging round is flagged (a strike, through the same ledger as pipeline flags)
      when its distance to the coordinate-wise median of the round's contributions exceeds k
      times the round's spread (``sentinel.protocol.aggregation.contribution_scores``). Live, the
      replica that saw the contribution complains with the contributor's signed reply and each
      verifier re-judges it against the stage's other replicas (``sentinel.verifier.complaints``);
      the simulator applies the same rule to every round. 0 turns it off.
    * ``averaging_outlier_floor`` — 0.02: the spread counts as at least this fraction of the
      median's norm. Without it the rule cannot work: replicas average asynchronously, and
      right after most of a stage averaged they are near-identical, so one honest replica that
      has not averaged yet is many median distances away while only one training update from
      the rest. Measured in the simulator (4 x 8, 3 attackers per stage, tiny model, lr 3e-3,
      40 steps, plain mean, rounds from step 10): with no floor honest scores reach q99 6.0 and
      max 26 on a clean run, with floor 0.02 max 2.2 (0 of 3528 above 3); under ``avg_scaling``
      (sign-flipped x10 updates) 47 % of the attackers' contributions score above 3 and 1.3 %
      of the honest ones (max 5.3: the poison pulls honest replicas apart), under ``avg_random``
      50 % and 0 %, while ``avg_alie`` stays below (max 0.8) and costs +1.2 % with a mean,
      -0.1 % with CenteredClip. The honest flags are forgiven by pipeline traffic like any other.
    """

    beta_forward: float = 0.9
    beta_backward: float = 0.8
    window: int = 100
    fence_k: float = 3.0
    fence_iqr_floor: float = 0.01
    eligibility_ratio: float = 1.5
    min_history: int = 24
    min_workers: int = 3
    solo_history: int = 100
    recent_messages: int = 64
    sample_size: int = 1024
    num_quantiles: int = 32
    sign_rel_threshold: float = 0.1
    strike_limit: int = 3
    forgive_after: int = 100
    drift_fraction: float = 0.5
    confirm_share: float = 0.5
    spot_tolerance: float = 0.05
    recalibration_guard: float = 0.0
    averaging_outlier_ratio: float = 3.0
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
                     "recalibration_guard", "averaging_outlier_ratio", "averaging_outlier_floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if not (isinstance(self.confirm_share, (int, float)) and 0.0 < self.confirm_share <= 1.0):
            raise ValueError(f"confirm_share must be in (0, 1], got {self.confirm_share!r}")
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
