"""Tukey fences fitted on what the honest majority of a stage sends.

A pooled "accept everything during warm-up" window absorbs an attacker that is active from
step 0 (measured: recall 9-18 %). Instead every worker keeps its own window of accepted
distances, and for each distance separately the fence is fitted only on the pooled windows of
the workers whose *per-worker median* is at or below the (upper) median of those per-worker
medians. With W replicas that keeps the ``W//2 + 1`` (W even) or ``(W+1)//2`` (W odd) quietest
workers: an attacker whose distances are large is never in the pool, so it can never widen the
fence it is judged by, while honest replicas (statistically alike) are almost all in it. A
worker that sends small distances is harmless to include — it can only tighten the fence.

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


def tukey_fence(q1: float, q3: float, k: float, iqr_floor: float) -> float:
    """``Q3 + k * max(Q3 - Q1, iqr_floor)``."""
    return q3 + k * max(q3 - q1, iqr_floor)


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
        medians = np.stack([np.median(v, axis=0) for v in windows])  # (W, ncol)
        cut = self.eligibility_ratio * np.median(medians, axis=0)  # (ncol,)
        eligible = medians <= cut  # (W, ncol)
        q1 = np.empty(ncol)
        q3 = np.empty(ncol)
        count = np.empty(ncol)
        for j in range(ncol):
            pool = np.concatenate([v[:, j] for v, ok in zip(windows, eligible[:, j], strict=True) if ok])
            q1[j], q3[j] = np.percentile(pool, (25.0, 75.0))
            count[j] = pool.size
        self._quartiles = (q1, q3, count)
        return self._quartiles

    def fences(self, k: float, iqr_floor: float) -> dict[str, float]:
        q1, q3, _ = self.quartiles()
        return {n: tukey_fence(float(q1[j]), float(q3[j]), k, iqr_floor) for j, n in enumerate(self.names)}

    def pooled_count(self) -> int:
        """Smallest pooled sample size over the distances (what ``min_history`` is checked against)."""
        return int(self.quartiles()[2].min())
