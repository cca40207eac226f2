"""SENTINEL screening of one pipeline boundary, hardened against lock-up and contaminated warm-ups.

Every tensor a worker returns at a boundary is reduced to :class:`~sentinel.verifier.stats.TensorStats`,
then to a scale-free :class:`~sentinel.verifier.reference.Profile`; its distances to a reference
profile are judged by Tukey fences (``fences.py``). Malformed and non-finite tensors are flagged at
once, with no history. Where this departs from the paper's temporal EMA (docs/design.md, "Screening"):

1. The reference is the coordinate-wise median of the *other* replicas' EMA profiles: honest
   under an honest majority per stage, and it follows legitimate drift instead of locking up.
2. Fences are fitted on the workers whose distances are typical, so an attacker never widens
   the fence it is judged by, even when it is active from step 0.
3. No trusted warm-up: verdicts are ``calibrating`` until enough pooled distances exist; then
   every calibration message is re-scored (:meth:`BoundaryScreen.take_retroactive`).
4. A stage-wide shift (enough flagged replicas that agree with one another) re-seeds the EMAs
   and refits the fences; a replica flagged through it is still judged by the old fences.
5. Flagged messages never move the reference (EMA or fence windows).

Where a hop has a source, ``norm_ratio`` judges its gain, not its RMS (a gradient's RMS follows
the incoming gradient's swings), and ``skip`` carries the signal for small-batch gradients, whose
batch-mean direction is mostly noise. Deterministic pure tensor math: no I/O, clocks or randomness.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sentinel.run.screening import ScreeningConfig
from sentinel.verifier.fences import DistanceHistory, exceeded, tukey_fence
from sentinel.verifier.reference import (
    DISTANCES,
    TINY,
    Profile,
    distances,
    ema_update,
    median_profile,
    profile_of,
)
from sentinel.verifier.stats import TensorStats, compute_stats, same_input_distance

DIRECTIONS = ("forward", "backward")
SUMMARY_VERSION = 3  # 2: the ``skip`` distance and ``log_skip`` profile field; 3: ``log_gain``


@dataclass
class Verdict:
    """Outcome of screening one message.

    ``flagged`` means: strike the worker and do not use the tensor. ``calibrating`` means the
    boundary could not judge distances yet (the tensor is used; retroactive flags may follow
    via :meth:`BoundaryScreen.take_retroactive`). ``drift`` means the message was part of a
    stage-wide shift and triggered a recalibration: use it, strike nobody.
    """

    flagged: bool
    reasons: tuple[str, ...]
    distances: dict[str, float]
    fences: dict[str, float]
    drift: bool = False
    calibrating: bool = False
    # retroactive verdicts only: most of this worker's calibration messages were flagged
    # (``BoundaryScreen._rescore_calibration``); the driver puts it on probation
    mostly_flagged: bool = False
    # scale-free summary of the screened tensor (None for malformed / non-finite ones); the
    # driver uses it to confirm a flag against another replica's output for the same input
    profile: Profile | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flagged": self.flagged,
            "reasons": list(self.reasons),
            "distances": dict(self.distances),
            "fences": dict(self.fences),
            "drift": self.drift,
            "calibrating": self.calibrating,
        }


@dataclass
class _Worker:
    last_seen: int
    ema: Profile | None = None
    latest: Profile | None = None
    latest_flagged: bool = False
    accepted_log_rms: float = 0.0
    accepted_log_skip: float | None = None
    accepted_log_gain: float | None = None
    flag_streak: int = 0
    calibration_messages: int = 0


@dataclass
class _Counters:
    messages: int = 0
    flagged: int = 0
    drift_events: int = 0
    recalibrations: int = 0
    calibrating: int = 0
    retroactive: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class BoundaryScreen:
    """Screening state for one boundary (stage output) in one direction (see module docstring)."""

    def __init__(
        self,
        config: ScreeningConfig,
        direction: str,
        expected_shape: tuple[int | None, ...] | None = None,
    ) -> None:
        self.config = config
        self.direction = direction
        self.beta = config.beta(direction)
        self.expected_shape = tuple(expected_shape) if expected_shape is not None else None
        self.counters = _Counters()
        self._t = 0
        self._workers: dict[str, _Worker] = {}
        self._history = DistanceHistory(config.window, config.eligibility_ratio)
        self._trusted = False
        self._calibration: list[tuple[str, dict[str, float]]] = []
        self._retro: list[tuple[str, Verdict]] = []
        self._features: int | None = None
        self._warm_ref: Profile | None = None
        self._warm_fences: dict[str, float] | None = None
        self._fence_floor: dict[str, float] | None = None
        # replicas being banned when a recalibration began: still judged by the fences from
        # before it, so a recalibration is no amnesty (see ``_recalibrate``)
        self._suspects: set[str] = set()

    # ------------------------------------------------------------------ public API

    def screen(self, worker: str, x: torch.Tensor, source: torch.Tensor | None = None) -> Verdict:
        """Screen one tensor sent by ``worker``; the shape is checked before any pass over it.

        ``source`` is what the verifier sent into the hop (the stage's input activation, or the
        gradient of its output): it enables the ``skip`` distance (``stats.py``).
        """
        if self._shape_problem(tuple(x.shape), x.numel()):
            return self._count(self._malformed())
        return self.screen_stats(worker, compute_stats(x, self.config, source))

    def screen_stats(self, worker: str, stats: TensorStats) -> Verdict:
        """Screen precomputed stats (also used to re-score another verifier's ban evidence)."""
        return self._count(self._judge(worker, stats))

    def rescore(self, stats: TensorStats) -> Verdict:
        """Judge ban evidence against this verifier's own reference and fences, changing nothing.

        The evidence is compared with the median of all recent replicas' EMA profiles (the
        accused worker cannot be singled out by name in someone else's record). Returns a
        ``calibrating`` verdict when this verifier has no trusted fences yet.
        """
        problem = self._static_problem(stats)
        if problem is not None:
            return problem
        ref = self._consensus()
        fences = self.fences()
        if ref is None or fences is None:
            return Verdict(False, (), {}, {}, calibrating=True)
        d = distances(profile_of(stats), ref, self.config.sign_rel_threshold)
        reasons = exceeded(d, fences)
        return Verdict(bool(reasons), reasons, d, fences)

    def would_flag(self, worker: str, x: torch.Tensor, source: torch.Tensor | None = None) -> bool | None:
        """Whether :meth:`screen` would flag ``x`` from ``worker`` now, changing nothing; None while
        this boundary has no fences (calibrating: everything is accepted).

        The white-box attacker's oracle in the simulator (``sentinel.attacks.adaptive.WhiteBox``):
        the strongest adversary knows the exact reference and fences it is judged by. It is not
        the full verdict (no drift consensus, no confirmation by recomputation), both of which can
        only clear a flag, so a tensor it passes is passed by :meth:`screen` too.
        """
        v = self._peek(worker, x, source)
        return None if v.calibrating else v.flagged

    def witness(self, worker: str, x: torch.Tensor, source: torch.Tensor | None = None) -> Verdict | None:
        """The verdict :meth:`screen` would give ``x`` (with its profile), changing nothing; None
        when ``x`` cannot serve as a witness (malformed, non-finite, or no fences yet).

        For a second recomputation that only arbitrates a disputed confirmation (the driver's
        tie-break): it must not count as a message, move the reference or fit the fences.
        """
        v = self._peek(worker, x, source)
        return None if v.calibrating or v.profile is None else v

    def _peek(self, worker: str, x: torch.Tensor, source: torch.Tensor | None) -> Verdict:
        """The fence verdict on ``x`` against ``worker``'s reference, with ``x``'s profile, and no
        side effect: a flagged verdict without profile for a malformed or non-finite tensor, a
        ``calibrating`` one while this boundary has no fences."""
        if self._shape_problem(tuple(x.shape), x.numel()):
            return self._malformed()
        stats = compute_stats(x, self.config, source)
        problem = self._static_problem(stats)
        if problem is not None:
            return problem
        ref = self._reference_for(worker)
        fences = self.fences()
        if ref is None or fences is None:
            return Verdict(False, (), {}, {}, calibrating=True)
        prof = profile_of(stats)
        d = distances(prof, ref, self.config.sign_rel_threshold)
        reasons = exceeded(d, fences)
        return Verdict(bool(reasons), reasons, d, fences, profile=prof)

    def confirm(self, flagged: Verdict, accepted: Verdict) -> Verdict:
        """Does a flag stand once the same hop, recomputed by another replica, was accepted?

        Both tensors answer the *same* input, so an honest pair differs only by the replicas'
        small parameter divergence, far less than the batch-to-batch spread the fences were
        fitted on. A flagged distance stands when the flagged tensor is at least
        ``confirm_share`` of that distance away from the accepted recomputation too: the
        worker, not the input, accounts for (at least that share of) the anomaly. A flag that
        the input explains (an unusual batch, a stage-wide shift the EMA has not followed yet)
        is cleared. Flags without a profile (malformed, non-finite) always stand.
        """
        if flagged.profile is None or accepted.profile is None or not flagged.distances:
            return flagged
        if flagged.profile.features != accepted.profile.features:
            return flagged
        d = distances(flagged.profile, accepted.profile, self.config.sign_rel_threshold)
        share = self.config.confirm_share
        reasons = tuple(r for r in flagged.reasons if r in d and d[r] >= share * flagged.distances.get(r, 0.0) > 0)
        return Verdict(bool(reasons), reasons, d, dict(flagged.fences), profile=flagged.profile)

    def disagree(self, checked: torch.Tensor, check: torch.Tensor) -> Verdict:
        """Do two replicas' answers to the *same* input differ by more than ``spot_tolerance``?

        For spot checks of accepted hops (``DriverConfig.spot_check``): ``checked`` is the
        tensor that was passed on, ``check`` another replica's recomputation. The fences judge
        a tensor against other batches; here both answer the same batch, so the raw tensors are
        compared (:func:`~sentinel.verifier.stats.same_input_distance`) and honest pairs differ
        only by the replicas' parameter divergence. The verdict's single distance is ``spot``;
        tensors of different shapes, or non-finite ones, disagree.
        """
        tol = self.config.spot_tolerance
        if checked.shape != check.shape:
            return Verdict(True, ("shape",), {}, {"spot": tol})
        d = same_input_distance(checked, check)
        flagged = not d < tol  # NaN disagrees
        return Verdict(flagged, ("spot",) if flagged else (), {"spot": d}, {"spot": tol})

    def substitute(self, like: torch.Tensor) -> torch.Tensor:
        """The paper's fallback: the consensus EMA batch-mean broadcast to ``like``'s shape.

        Zeros when there is no reference yet or its feature size does not match ``like``.
        """
        ref = self._consensus()
        features = like.shape[-1] if like.dim() else 1
        if ref is None or ref.features != features:
            return torch.zeros_like(like)
        mean_vec = ref.mean_vec.to(like.dtype)
        if like.dim() == 0:
            return mean_vec.reshape(()).clone()
        return mean_vec.expand(like.shape).clone()

    def fences(self) -> dict[str, float] | None:
        """Current fences (own when trusted, else gossiped warm-start fences, else None).

        After a recalibration the fences fitted before it stay a lower bound until ``window`` new
        distances have arrived: a Tukey fit on a couple of dozen values is noisy, and a
        too-tight one would strike honest replicas right after a legitimate shift.
        """
        if self._trusted:
            fences = self._fit()
            if self._fence_floor is not None:
                # judged on everything received since the refit, not on the eligible pool: with
                # W replicas the pool holds only ~window * (eligible share), which may never reach
                # ``window``, and a floor that never lifts freezes the fences wide open
                if self._history.total() >= max(self.config.min_history, self.config.window // 4):
                    self._fence_floor = None
                else:
                    fences = {n: max(v, self._fence_floor[n]) for n, v in fences.items()}
            return fences
        return dict(self._warm_fences) if self._warm_fences is not None else None

    def _fit(self) -> dict[str, float]:
        """Tukey fences of the accepted distances. A recalibration trusts a fit of half of
        ``min_history`` pooled distances (``_maybe_trust``); until the pool has grown to
        ``min_history`` its IQR counts double, so a young fit is never tighter than a grown one
        is likely to be: with the normal width a half-history refit strikes honest replicas
        several times as often (docs/design.md). The floor is not doubled (``tukey_fence``)."""
        young = self._history.pooled_count() < self.config.min_history
        return self._history.fences(self.config.fence_k, self.config.fence_iqr_floor, 2.0 if young else 1.0)

    @property
    def calibrated(self) -> bool:
        """True once this boundary's own fences are trusted."""
        return self._trusted

    def take_retroactive(self) -> list[tuple[str, Verdict]]:
        """Flags found by re-scoring calibration messages; returned once, then cleared."""
        out, self._retro = self._retro, []
        return out

    def flag_rate(self) -> float:
        c = self.counters
        return c.flagged / c.messages if c.messages else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-able reference + fence state, gossiped so a new verifier can warm-start."""
        ref = self._consensus()
        quartiles = None
        if self._trusted:
            q1, q3, _ = self._history.quartiles()
            quartiles = {n: [float(q1[j]), float(q3[j])] for j, n in enumerate(DISTANCES)}
        return {
            "version": SUMMARY_VERSION,
            "direction": self.direction,
            "messages": self._t,
            "reference": ref.to_dict() if ref is not None else None,
            "quartiles": quartiles,
        }

    def load_summaries(self, summaries: Sequence[Any]) -> None:
        """Warm-start from the coordinate-wise MEDIAN of committee members' summaries.

        Invalid summaries (wrong schema, other direction, non-finite values) are skipped; only
        profiles of the most common feature size are combined. With an honest majority among the
        members, every median coordinate lies within the honest members' values. The warm state
        is used only until this boundary has its own reference/trusted fences.
        """
        profiles: list[Profile] = []
        quartiles: list[dict[str, list[float]]] = []
        for s in summaries:
            try:
                ref, q = _parse_summary(s, self.direction)
            except ValueError:
                continue
            if ref is not None:
                profiles.append(ref)
            if q is not None:
                quartiles.append(q)
        if profiles:
            sizes = [(p.features, p.shape_q.numel()) for p in profiles]
            common = max(set(sizes), key=lambda sz: (sizes.count(sz), sz))
            same = [p for p in profiles if (p.features, p.shape_q.numel()) == common]
            if same[0].shape_q.numel() == self.config.num_quantiles:
                self._warm_ref = median_profile(same)
        if quartiles:
            fences = {}
            for n in DISTANCES:
                q1 = _median([q[n][0] for q in quartiles])
                q3 = _median([q[n][1] for q in quartiles])
                fences[n] = tukey_fence(q1, q3, self.config.fence_k, self.config.fence_iqr_floor)
            self._warm_fences = fences

    # ------------------------------------------------------------------ internals

    def _count(self, v: Verdict) -> Verdict:
        c = self.counters
        c.messages += 1
        c.flagged += v.flagged
        c.calibrating += v.calibrating
        c.drift_events += v.drift
        for r in v.reasons:
            c.reasons[r] = c.reasons.get(r, 0) + 1
        return v

    @staticmethod
    def _malformed() -> Verdict:
        return Verdict(True, ("malformed",), {}, {})

    def _shape_problem(self, shape: tuple[int, ...], numel: int) -> bool:
        if numel == 0:
            return True
        exp = self.expected_shape
        if exp is not None:
            if len(shape) != len(exp) or any(e is not None and e != s for e, s in zip(exp, shape, strict=True)):
                return True
        features = shape[-1] if shape else 1
        return self._features is not None and features != self._features

    def _static_problem(self, stats: TensorStats) -> Verdict | None:
        """Malformed / non-finite checks that need no history."""
        features = stats.shape[-1] if stats.shape else 1
        if (
            self._shape_problem(stats.shape, stats.numel)
            or stats.mean_vec.numel() != features
            or stats.quantiles.numel() != self.config.num_quantiles
        ):
            return self._malformed()
        if not (
            stats.finite
            and math.isfinite(stats.rms)
            and math.isfinite(stats.mean)
            and math.isfinite(stats.std)
            and math.isfinite(stats.absmax)
            and bool(torch.isfinite(stats.mean_vec).all())
            and bool(torch.isfinite(stats.quantiles).all())
        ):
            return Verdict(True, ("non_finite",), {}, {})
        return None

    def _recent(self) -> list[tuple[str, _Worker]]:
        horizon = self._t - self.config.recent_messages
        return [(n, w) for n, w in self._workers.items() if w.last_seen > horizon]

    def _prune(self) -> None:
        """Forget replicas not seen for ``recent_messages``: their stale state must not steer."""
        horizon = self._t - self.config.recent_messages
        for name in [n for n, w in self._workers.items() if w.last_seen <= horizon]:
            del self._workers[name]
            self._history.drop(name)

    def _reference_for(self, worker: str) -> Profile | None:
        pool = [w for n, w in self._recent() if n != worker and w.ema is not None]
        if len(pool) % 2 == 0 or len(pool) < 2:
            # An even pool's median is the mean of its middle two: with 3 replicas that is "the
            # other honest one averaged with the attacker", which drags an honest worker's
            # reference halfway to the attack. The worker's own EMA (fed only by its accepted
            # messages) makes the count odd, so the median is a real order statistic again.
            own = self._workers.get(worker)
            if own is not None and own.ema is not None:
                pool.append(own)
        if not pool:
            return self._warm_ref
        ref = median_profile([w.ema for w in pool if w.ema is not None])
        if len(pool) >= 2:
            # Scale is the one statistic that drifts legitimately (gradients shrink ~50x): an EMA
            # of it lags by beta/(1-beta) messages per replica, so across replicas the reference
            # scale is the median of their latest *accepted* scales (noise averaged over
            # replicas instead of over time, no lag). The same goes for ``log_skip``, which
            # climbs steeply while a fresh model learns to use its blocks: an EMA's lag spreads
            # the honest skip distances so wide that the fence lets a Gaussian-gradient attacker
            # through. And for ``log_gain``, the scale the hop adds, which drifts like the scale.
            skips = [w.accepted_log_skip for w in pool if w.accepted_log_skip is not None]
            gains = [w.accepted_log_gain for w in pool if w.accepted_log_gain is not None]
            ref = dataclasses.replace(ref, log_rms=_median([w.accepted_log_rms for w in pool]),
                                      log_skip=_median(skips) if len(skips) == len(pool) else ref.log_skip,
                                      log_gain=_median(gains) if len(gains) == len(pool) else ref.log_gain)
        return ref

    def _consensus(self) -> Profile | None:
        emas = [w.ema for _, w in self._recent() if w.ema is not None]
        if emas:
            return median_profile(emas)
        return self._warm_ref

    def _accept(self, name: str, w: _Worker, p: Profile, d: dict[str, float] | None) -> None:
        w.ema = p if w.ema is None else ema_update(w.ema, p, self.beta)
        w.accepted_log_rms = p.log_rms
        w.accepted_log_skip = p.log_skip
        if p.log_gain is not None:
            w.accepted_log_gain = p.log_gain
        w.latest = p
        w.latest_flagged = False
        w.flag_streak = 0
        if d is not None:
            self._history.add(name, d)

    def _judge(self, name: str, stats: TensorStats) -> Verdict:
        problem = self._static_problem(stats)
        if problem is not None:
            return problem
        cfg = self.config
        if stats.source_rms is not None and not stats.source_rms > TINY:
            # The hop was fed an all-zero tensor (an upstream zero that was passed on): the reply
            # says nothing about the worker (an honest backward of a zero gradient is zero), so it
            # is neither judged nor learnt from. Learnt from, it pulled every replica's reference
            # scale to zero and locked the honest ones out.
            return Verdict(False, (), {}, {}, profile=profile_of(stats))
        self._t += 1
        if self._t % cfg.recent_messages == 0:
            self._prune()
        features = stats.shape[-1] if stats.shape else 1
        if self._features is None:
            self._features = features
        w = self._workers.get(name)
        if w is None:
            w = self._workers[name] = _Worker(last_seen=self._t)
        w.last_seen = self._t
        p = profile_of(stats)
        ref = self._reference_for(name)
        d = distances(p, ref, cfg.sign_rel_threshold) if ref is not None else None
        fences = self.fences()
        if fences is None and name in self._suspects:
            fences = self._fence_floor
        if d is None or fences is None:
            self._accept(name, w, p, d)
            if not self._trusted:
                w.calibration_messages += 1
                if d is not None and self._robust_reference(name):
                    self._calibration.append((name, d))
                self._maybe_trust()
            return Verdict(False, (), d or {}, {}, calibrating=True, profile=p)

        reasons = exceeded(d, fences)
        if not reasons:
            self._suspects.discard(name)
            self._accept(name, w, p, d)
            if not self._trusted:
                self._maybe_trust()
            return Verdict(False, (), d, fences, profile=p)

        w.latest = p
        w.latest_flagged = True
        w.flag_streak += 1
        drift = self._drift_consensus(fences)
        if drift is not None:
            fresh, agreeing = drift
            d2 = distances(p, fresh, cfg.sign_rel_threshold)
            if not exceeded(d2, fences):
                # The stage moved: every flagged replica whose latest message agrees with the
                # fresh consensus restarts its EMA there (its message is accepted after all);
                # a replica that disagrees even with the fresh consensus stays flagged.
                for o in agreeing:
                    o.ema = o.latest
                    o.accepted_log_rms = o.latest.log_rms
                    o.accepted_log_skip = o.latest.log_skip
                    if o.latest.log_gain is not None:
                        o.accepted_log_gain = o.latest.log_gain
                    o.latest_flagged = False
                    o.flag_streak = 0
                self._recalibrate()
                return Verdict(False, (), d2, fences, drift=True, profile=p)
        return Verdict(True, reasons, d, fences, profile=p)

    def _recalibrate(self) -> None:
        """After a stage-wide shift the *distances* may follow a new regime too: refit the
        fences from scratch (calibration again, with retroactive re-scoring when they are
        trusted), instead of letting a stale window ratchet up only through values below it.

        Calibration judges no distances, which must not become an amnesty: a replica whose
        latest message was flagged and did not join the shift (it still has ``latest_flagged``
        after the drift re-seeded the others: an attacker, or a replica being banned) keeps
        being judged by the fences from before the shift until one of its messages passes
        them; otherwise two honest false positives in a row next to a persistent attacker can
        make a "drift" whose calibration accepts the attacker's messages for ``min_history``
        messages.
        """
        previous = self.fences()
        if previous is not None:
            floor = self._fence_floor or previous
            self._fence_floor = {n: max(v, floor[n]) for n, v in previous.items()}
        self._suspects = {n for n, w in self._recent() if w.latest_flagged}
        self._history = DistanceHistory(self.config.window, self.config.eligibility_ratio)
        self._trusted = False
        self._warm_fences = None
        self._calibration = []
        for w in self._workers.values():
            w.calibration_messages = 0
        self.counters.recalibrations += 1

    def _voters(self) -> list[tuple[str, _Worker]]:
        """Recent replicas that take part in the drift vote.

        A replica flagged ``strike_limit`` times in a row is being banned; letting it vote would
        turn every honest false positive next to a persistent attacker into a "drift". Unless
        such replicas are themselves at least ``drift_fraction`` of the stage: that is the
        signature of a lock-up, and everyone votes.
        """
        limit = self.config.strike_limit
        recent = self._recent()
        persistent = sum(1 for _, w in recent if w.flag_streak >= limit)
        if persistent >= self.config.drift_fraction * len(recent):
            return recent  # most replicas flagged again and again: that is lock-up, let them vote
        return [(n, w) for n, w in recent if w.flag_streak < limit]

    def _drift_consensus(self, fences: dict[str, float]) -> tuple[Profile, list[_Worker]] | None:
        """The fresh consensus of a stage-wide shift and the flagged voters that agree with it,
        or None when the flags are no such thing.

        A shift moves the honest replicas *together*: at least two, and at least
        ``drift_fraction`` of the voters, must be flagged **and** agree with the coordinate-wise
        median of the voters' latest profiles. Counting flagged replicas alone would let an
        attacker's flagged message plus one honest replica's unlucky batch pass for a shift;
        the recalibration that follows is a window in which distances are not judged, and an
        attacker goes unstruck there. An attacker's message does not agree with a median of
        mostly honest profiles, so it cannot supply the second vote.
        """
        voters = self._voters()
        flagged = [w for _, w in voters if w.latest_flagged and w.latest is not None]
        need = max(2.0, self.config.drift_fraction * len(voters))
        if len(flagged) < need:
            return None
        fresh = median_profile([w.latest for _, w in voters if w.latest is not None])
        thr = self.config.sign_rel_threshold
        agreeing = [w for w in flagged if not exceeded(distances(w.latest, fresh, thr), fences)]
        return (fresh, agreeing) if len(agreeing) >= need else None

    def _maybe_trust(self) -> None:
        cfg = self.config
        workers = len(self._history.workers())
        # A recalibration refits from half the history (with a doubled IQR, ``_fit``, and
        # the previous fences as a lower bound, ``fences``): its calibration judges no distances,
        # and an attacker that starts while it lasts must not go unjudged for ``min_history``
        # messages; half the history shortens the ban latency (docs/design.md).
        need = cfg.min_history if self._fence_floor is None else max(1, cfg.min_history // 2)
        if self._history.pooled_count() < need:
            return
        if workers < cfg.min_workers and self._t < cfg.solo_history:
            return
        self._trusted = True
        self._suspects.clear()
        self._rescore_calibration()

    def _robust_reference(self, worker: str) -> bool:
        """Was ``worker`` just compared with a median of at least two other replicas?"""
        return sum(1 for n, w in self._recent() if n != worker and w.ema is not None) >= 2

    def _rescore_calibration(self) -> None:
        """Judge the calibration-phase messages now that the fences exist.

        Each message is judged by the distances it had *when it arrived* (to the median of the
        other replicas then; messages compared with fewer than two others are not judged), so a
        stage that drifted during calibration does not turn into retroactive flags. A worker
        with at least half of its calibration messages flagged loses its EMA and its distance
        window — unless that would be most of the workers (honest majority: then the fault is
        the calibration, not the workers).
        """
        fences = self._fit()
        hits = [(name, d, reasons) for name, d in self._calibration if (reasons := exceeded(d, fences))]
        flags: dict[str, int] = {}
        for name, _, _ in hits:
            flags[name] = flags.get(name, 0) + 1
        self.counters.retroactive += len(hits)
        marked: set[str] = set()
        guilty = [
            n for n, k in flags.items() if n in self._workers and 2 * k >= self._workers[n].calibration_messages
        ]
        if 2 * len(guilty) < len(self._history.workers()):
            for name in guilty:
                w = self._workers[name]
                w.ema = None
                w.latest = None
                self._history.drop(name)
            # At least two flagged messages and at least half of them: the driver puts the worker
            # on probation (one strike short of a ban), so its next confirmed live flag bans it.
            # Without this, an attacker that begins during a (re)calibration collects no strike
            # for any of the messages it sends then, and needs ``strike_limit`` more live flags.
            marked = {n for n in guilty if flags[n] >= 2}
        self._retro.extend((n, Verdict(True, r, d, fences, mostly_flagged=n in marked)) for n, d, r in hits)
        self._calibration = []


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _parse_summary(s: Any, direction: str) -> tuple[Profile | None, dict[str, list[float]] | None]:
    if not isinstance(s, dict) or s.get("version") != SUMMARY_VERSION or s.get("direction") != direction:
        raise ValueError("not a summary for this direction")
    ref = Profile.from_dict(s["reference"]) if s.get("reference") is not None else None
    q = s.get("quartiles")
    if q is not None:
        if not isinstance(q, dict) or set(q) != set(DISTANCES):
            raise ValueError("bad quartiles")
        for n in DISTANCES:
            v = q[n]
            if (
                not isinstance(v, list)
                or len(v) != 2
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in v)
                or not 0 <= v[0] <= v[1]
            ):
                raise ValueError("bad quartiles")
    return ref, q


class Screener:
    """All boundaries of a pipeline for one verifier: ``num_stages`` stages x 2 directions."""

    def __init__(
        self,
        config: ScreeningConfig,
        num_stages: int,
        expected_shapes: dict[tuple[int, str], tuple[int | None, ...]] | None = None,
    ) -> None:
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.config = config
        self.num_stages = num_stages
        shapes = expected_shapes or {}
        self._boundaries = {
            (s, d): BoundaryScreen(config, d, shapes.get((s, d))) for s in range(num_stages) for d in DIRECTIONS
        }

    def boundary(self, stage: int, direction: str) -> BoundaryScreen:
        try:
            return self._boundaries[(stage, direction)]
        except KeyError:
            raise ValueError(
                f"no boundary stage={stage!r} direction={direction!r}: stages are 0..{self.num_stages - 1}, "
                f"directions {DIRECTIONS}"
            ) from None

    def screen(self, stage: int, direction: str, worker: str, x: torch.Tensor,
               source: torch.Tensor | None = None) -> Verdict:
        return self.boundary(stage, direction).screen(worker, x, source)

    def would_flag(self, stage: int, direction: str, worker: str, x: torch.Tensor,
                   source: torch.Tensor | None = None) -> bool | None:
        """See :meth:`BoundaryScreen.would_flag`."""
        return self.boundary(stage, direction).would_flag(worker, x, source)

    def witness(self, stage: int, direction: str, worker: str, x: torch.Tensor,
                source: torch.Tensor | None = None) -> Verdict | None:
        """See :meth:`BoundaryScreen.witness`."""
        return self.boundary(stage, direction).witness(worker, x, source)

    def confirm(self, stage: int, direction: str, flagged: Verdict, accepted: Verdict) -> Verdict:
        """See :meth:`BoundaryScreen.confirm`."""
        return self.boundary(stage, direction).confirm(flagged, accepted)

    def disagree(self, stage: int, direction: str, checked: torch.Tensor, check: torch.Tensor) -> Verdict:
        """See :meth:`BoundaryScreen.disagree`."""
        return self.boundary(stage, direction).disagree(checked, check)

    def take_retroactive(self) -> list[tuple[int, str, str, Verdict]]:
        """(stage, direction, worker, verdict) for every retroactive flag since the last call."""
        out = []
        for (s, d), b in self._boundaries.items():
            out.extend((s, d, w, v) for w, v in b.take_retroactive())
        return out

    def flag_rates(self) -> dict[str, float]:
        return {f"stage{s}/{d}": b.flag_rate() for (s, d), b in self._boundaries.items()}

    def counters(self) -> dict[str, dict[str, Any]]:
        """Per-boundary screening events (messages, flags, drifts, recalibrations, ...) for reports."""
        return {f"stage{s}/{d}": dataclasses.asdict(b.counters) for (s, d), b in self._boundaries.items()}

    def summaries(self) -> dict[str, Any]:
        return {f"stage{s}/{d}": b.summary() for (s, d), b in self._boundaries.items()}

    def load_summaries(self, per_member: list[dict]) -> None:
        """Warm-start every boundary from the median of the members' :meth:`summaries`."""
        for (s, d), b in self._boundaries.items():
            key = f"stage{s}/{d}"
            b.load_summaries([m[key] for m in per_member if isinstance(m, dict) and key in m])
