"""Tukey fences fitted on what the honest majority of a stage sends.

A pooled "accept everything during warm-up" window absorbs an attacker that is active from
step 0. Instead every worker keeps its own window of accepted distances, and for each distance
separately the fence is fitted only on the pooled windows of the workers whose *per-worker
median* is at or below the (upper) median of those per-worker medians. With W replicas that
keeps the ``W//2 + 1`` (W even) or ``(W+1)//2`` (W odd) quietest workers: an attacker whose
distances are large is never in the pool, so it can never widen the fence it is judged by, while
honest replicas (statistically alike) are almost all in it. A worker that sends small distances
is harmless to include — it can only tighten the fence.

Fence = ``Q3 + k * max(IQR, floor)``; a message is flagged when any distance is strictly above
its fence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sentinel.verifier.reference import DISTANCES

#: Fewest recent distances each worker contributes to the fence fit (a per-worker median of
#: fewer values is too noisy to judge eligibility by).
MIN_PER_WORKER = 8


def tukey_fence(q1: float, q3: float, k: float, iqr_floor: float, iqr_scale: float = 1.0) -> float:
    """``Q3 + k * max(iqr_scale * (Q3 - Q1), iqr_floor)``.

    ``iqr_scale`` widens an IQR fitted on few values; the floor is a resolution of the distances
    themselves, so it is never scaled: a doubled floor on distances bounded by 1 (l1, l2, sign)
    would put their fence above a sign flip's distance."""
    return q3 + k * max(iqr_scale * (q3 - q1), iqr_floor)


def exceeded(dists: Mapping[str, float], fences: Mapping[str, float]) -> tuple[str, ...]:
    """Names of the distances strictly above their fence (a NaN distance counts as above)."""
    return tuple(n for n in DISTANCES if n in fences and not dists[n] <= fences[n])


class DistanceHistory:
    """Per-worker ring buffers of accepted distance vectors, and the honest-majority quartiles.

    Each buffer holds up to ``window`` vectors; the fit uses each worker's latest
    ``max(MIN_PER_WORKER, window // W)`` of them (W = workers with history).
    """

    def __init__(self, window: int, eligibility_ratio: float = 1.5, names: Sequence[str] = DISTANCES) -> None:
        self.window = window
        self.eligibility_ratio = eligibility_ratio
        self.names = tuple(names)
        self._buf: dict[str, np.ndarray] = {}
        self._count: dict[str, int] = {}
        self._pos: dict[str, int] = {}
        self._quartiles: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, worker: str, dists: Mapping[str, float]) -> None:
        buf = self._buf.get(worker)
        if buf is None:
            buf = self._buf[worker] = np.empty((self.window, len(self.names)), dtype=np.float64)
            self._count[worker] = 0
            self._pos[worker] = 0
        buf[self._pos[worker]] = [dists[n] for n in self.names]
        self._pos[worker] = (self._pos[worker] + 1) % self.window
        self._count[worker] = min(self._count[worker] + 1, self.window)
        self._quartiles = None

    def _latest(self, worker: str, m: int) -> np.ndarray:
        count = self._count[worker]
        buf = self._buf[worker]
        if count < self.window:
            return buf[max(0, count - m): count]
        m = min(m, self.window)
        return buf[(self._pos[worker] - m + np.arange(m)) % self.window]

    def drop(self, worker: str) -> None:
        """Forget a worker's history (it was found to have been attacking during calibration)."""
        for d in (self._buf, self._count, self._pos):
            d.pop(worker, None)
        self._quartiles = None

    def workers(self) -> list[str]:
        return [w for w in self._buf if self._count[w]]

    def quartiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q1, Q3, pooled count) per distance over the eligible workers (see module docstring).

        Cached until the next ``add``/``drop``.
        """
        if self._quartiles is not None:
            return self._quartiles
        workers = self.workers()
        ncol = len(self.names)
        if not workers:
            zeros = np.zeros(ncol)
            return zeros, zeros, zeros
        # ``window`` is the budget per boundary: each worker contributes its latest
        # window // W distances (at least MIN_PER_WORKER), so the pool turns over about every
        # ``window`` messages whatever the number of replicas, and follows a changing regime.
        per_worker = max(MIN_PER_WORKER, self.window // len(workers))
        windows = [self._latest(w, per_worker) for w in workers]
        # Vectorised over workers and distances (NaN padding sorts last): this runs on every
        # accepted message, so a handful of numpy calls instead of one per worker per column.
        m = max(len(v) for v in windows)
        vals = np.full((len(workers), m, ncol), np.nan)
        for i, v in enumerate(windows):
            vals[i, : len(v)] = v
        counts = np.array([len(v) for v in windows])
        srt = np.sort(vals, axis=1)
        rows = np.arange(len(workers))
        medians = 0.5 * (srt[rows, (counts - 1) // 2] + srt[rows, counts // 2])  # (W, ncol)
        cut = self.eligibility_ratio * np.median(medians, axis=0)  # (ncol,)
        eligible = medians <= cut  # (W, ncol)
        pooled = np.where(eligible[:, None, :], vals, np.nan).reshape(-1, ncol)
        pooled.sort(axis=0)
        count = (~np.isnan(pooled)).sum(axis=0)
        q1 = _interp(pooled, count, 0.25)
        q3 = _interp(pooled, count, 0.75)
        self._quartiles = (q1, q3, count)
        return self._quartiles

    def fences(self, k: float, iqr_floor: float, iqr_scale: float = 1.0) -> dict[str, float]:
        q1, q3, _ = self.quartiles()
        return {n: tukey_fence(float(q1[j]), float(q3[j]), k, iqr_floor, iqr_scale)
                for j, n in enumerate(self.names)}

    def total(self) -> int:
        """Distance vectors held over all workers (each buffer capped at ``window``)."""
        return sum(self._count.values())

    def pooled_count(self) -> int:
        """Smallest pooled sample size over the distances (what ``min_history`` is checked against)."""
        return int(self.quartiles()[2].min())


def _interp(sorted_cols: np.ndarray, count: np.ndarray, q: float) -> np.ndarray:
    """Linear-interpolation quantile ``q`` of each column's first ``count`` (sorted) values."""
    pos = q * (count - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, count - 1)
    cols = np.arange(sorted_cols.shape[1])
    frac = pos - lo
    return sorted_cols[lo, cols] * (1 - frac) + sorted_cols[hi, cols] * frac
