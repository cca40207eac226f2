"""Choosing a replica per stage, SWARM-style: lowest expected finish time, skip the failing.

Pure bookkeeping with an injectable clock, so the simulator and tests drive it with fake time.
Expected finish time = (requests in flight + 1) x latency EMA; a worker never measured borrows
its stage's median so newcomers get traffic, and so does one whose estimate has aged
(``reprobe_after_s``): the estimate changes only when the worker is used, so without ageing one
slow sample starves an honest replica for as long as its peers stay faster: it takes no
optimizer step, and its frozen parameters are then flagged as an averaging outlier. A
straggler's estimate (learnt from a hedge it lost) does not age: it is a lower bound, and
re-probing a silent worker would cost a hedge delay each time. A failed worker is skipped for an
exponentially growing back-off; timeouts adapt to the measured latency of the stage instead of a
constant, and a hop unanswered for a few typical latencies is hedged on a second replica
(``hedge_after``).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class RouterConfig:
    default_latency_s: float = 0.05  # prior for a stage with no measurements
    latency_ema: float = 0.3  # weight of the newest latency sample
    backoff_base_s: float = 1.0  # first back-off after a failure; doubles per consecutive failure
    backoff_max_s: float = 30.0
    timeout_floor_s: float = 20.0  # adaptive timeouts never go below this (loaded 2-core hosts stall)
    timeout_factor: float = 8.0  # timeout = max(floor, factor x slowest latency EMA of the stage)
    hedge_floor_s: float = 2.0  # a hop is hedged after max(floor, factor x the stage's lower-median latency)
    hedge_factor: float = 4.0  # 0 = never hedge
    reprobe_after_s: float = 5.0  # an answered worker unmeasured this long borrows the stage median (0 = never)


@dataclass
class _WorkerState:
    latency: float | None = None
    inflight: int = 0
    failures: int = 0
    backoff_until: float = 0.0
    served: int = 0
    measured_at: float = 0.0  # clock of the latest latency sample
    straggler: bool = False  # the latest sample is a lower bound from a lost hedge


@dataclass
class Router:
    config: RouterConfig = field(default_factory=RouterConfig)
    clock: Callable[[], float] = time.monotonic
    salt: str = ""  # per-verifier tie-break so verifiers spread load instead of herding
    _workers: dict[str, _WorkerState] = field(default_factory=dict)

    def _state(self, worker: str) -> _WorkerState:
        return self._workers.setdefault(worker, _WorkerState())

    def expected_finish(self, worker: str, peers: Iterable[str]) -> float:
        st = self._state(worker)
        lat = st.latency
        if lat is None or self._aged(st):
            known = [self._workers[p].latency for p in peers if p in self._workers and self._workers[p].latency]
            lat = statistics.median(known) if known else self.config.default_latency_s
        return (st.inflight + 1) * lat

    def _aged(self, st: _WorkerState) -> bool:
        after = self.config.reprobe_after_s
        return after > 0 and not st.straggler and self.clock() - st.measured_at > after

    def available(self, worker: str) -> bool:
        return self._state(worker).backoff_until <= self.clock()

    def pick(self, candidates: Iterable[str], exclude: Iterable[str] = ()) -> str | None:
        """The candidate with the lowest expected finish time, or None if none is usable now."""
        ex = set(exclude)
        cands = [c for c in candidates if c not in ex]
        ready = [c for c in cands if self.available(c)]
        if not ready:
            return None

        def key(w: str) -> tuple[float, int]:
            tie = int.from_bytes(hashlib.blake2b(f"{self.salt}|{w}".encode(), digest_size=4).digest(), "big")
            return (self.expected_finish(w, cands), tie)

        return min(ready, key=key)

    def started(self, worker: str) -> None:
        self._state(worker).inflight += 1

    def finished(self, worker: str, latency_s: float) -> None:
        st = self._state(worker)
        st.inflight = max(0, st.inflight - 1)
        a = self.config.latency_ema
        fresh = st.latency is None or self._aged(st)  # a forgotten estimate restarts from this sample
        st.latency = latency_s if fresh else (1 - a) * st.latency + a * latency_s
        st.failures = 0
        st.served += 1
        st.measured_at = self.clock()
        st.straggler = False

    def failed(self, worker: str) -> None:
        st = self._state(worker)
        st.inflight = max(0, st.inflight - 1)
        st.failures += 1
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (st.failures - 1))
        st.backoff_until = self.clock() + delay

    def timeout_for(self, candidates: Iterable[str]) -> float:
        lats = [self._workers[c].latency for c in candidates if c in self._workers and self._workers[c].latency]
        slowest = max(lats) if lats else self.config.default_latency_s
        return max(self.config.timeout_floor_s, self.config.timeout_factor * slowest)

    def hedge_after(self, candidates: Iterable[str]) -> float | None:
        """Seconds after which an unanswered hop goes to a second replica too (None = never).
        The lower median, not the slowest, sets it: one straggler must not raise its own bar. Of
        two replicas that is the faster one; a plain median would average in the straggler,
        whose learnt latency (the waits it caused) then raises the bar it is hedged at, step
        after step (measured: hedges after 26 s in a 2-replica stage, BENCHMARKS.md "Faults")."""
        if self.config.hedge_factor <= 0:
            return None
        lats = [self._workers[c].latency for c in candidates if c in self._workers and self._workers[c].latency]
        typical = statistics.median_low(lats) if lats else self.config.default_latency_s
        return max(self.config.hedge_floor_s, self.config.hedge_factor * typical)

    def abandoned(self, worker: str, waited_s: float) -> None:
        """A hedged hop was answered by another replica first: ``worker`` took at least
        ``waited_s``, which is what its latency estimate learns (it is not a failure: no back-off)."""
        st = self._state(worker)
        st.inflight = max(0, st.inflight - 1)
        a = self.config.latency_ema
        st.latency = waited_s if st.latency is None else max(st.latency, (1 - a) * st.latency + a * waited_s)
        st.measured_at = self.clock()
        st.straggler = True

    def latency(self, worker: str) -> float | None:
        return self._state(worker).latency
