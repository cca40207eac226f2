"""The pipeline driver: one micro-batch forward through every stage and back, screening each hop.

One driver loop, two transports: the live verifier plugs in P2P stubs (``transport.py``), the
simulator in-process stages. The rules it owns (docs/design.md, "What a flag does"):
- pick a replica per stage by expected finish time, never a banned one;
- screen every tensor a worker returns (forward activations, the loss, backward gradients);
- never pass a flagged tensor on: recompute the hop on another replica; only when none is left,
  substitute the screen's reference and mark the micro-batch tainted, so downstream workers are
  not struck for anomalies they did not cause;
- strike a fence flag only when *confirmed* by the accepted recomputation of the same input
  (``BoundaryScreen.confirm``): a flag the input explains is cleared, which keeps an honest
  worker's strikes near zero through unusual batches and stage-wide shifts. Provable faults
  (forged, malformed, non-finite) are struck at once;
- optionally tie-break a disputed confirmation on a third replica (``second_witness``) and
  spot-check accepted hops (``spot_check``); both are off, see ``DriverConfig``;
- route around a worker that fails or times out and retry the hop, so a micro-batch is either
  completed or reported failed, never silently lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sentinel.verifier.routing import Router

logger = logging.getLogger(__name__)


class HopError(Exception):
    """A hop that produced nothing usable.

    ``integrity`` is True when the worker answered with something provably bad (forged or
    malformed message, wrong shape, NaN): that earns a strike. Timeouts and unreachable peers
    are availability faults: routed around, never struck.
    """

    def __init__(self, message: str, reason: str, integrity: bool):
        super().__init__(message)
        self.reason = reason
        self.integrity = integrity


@dataclass
class HopResult:
    tensor: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)  # signed header fields, kept as ban evidence


class StageTransport(Protocol):
    def replicas(self, stage: int) -> list[str]: ...

    async def forward(
        self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
        targets: torch.Tensor | None, mode: str, timeout: float,
    ) -> HopResult: ...

    async def backward(
        self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
        grad: torch.Tensor | None, targets: torch.Tensor | None, timeout: float, mode: str = "train",
    ) -> HopResult: ...


@dataclass
class FlagEvent:
    step: int
    micro_batch: int
    stage: int
    direction: str
    worker: str
    reasons: tuple[str, ...]
    struck: bool  # False when the micro-batch was tainted upstream or the flag was not confirmed
    verdict: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    tensor: torch.Tensor | None = None  # the flagged tensor, for evidence statistics
    source: torch.Tensor | None = None  # what went into the hop (evidence for the skip distance)


@dataclass
class MicroBatchResult:
    step: int
    micro_batch: int
    loss: float | None = None
    completed: bool = False
    attempts: int = 0  # hops tried, including retries
    retries: int = 0  # hops retried after a failure or a flag
    hedged: int = 0  # hops also sent to a second replica because the first was slow
    substituted: int = 0
    tainted: bool = False
    route: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class DriverConfig:
    max_hop_attempts: int = 50  # per hop, before the micro-batch is declared failed
    wait_for_replica_s: float = 300.0  # how long a hop waits for a stage with no usable replica
    poll_s: float = 0.25
    # Share of a stage's first attempts steered to a replica with outstanding strikes. Off: extra
    # traffic means extra optimizer steps, the suspect's parameters drift from its replicas', and
    # drift draws more flags, a feedback loop that bans honest workers (docs/design.md).
    probation_share: float = 0.0
    # Hedged hops (``Router.hedge_after``): the live verifier turns this on; the simulator has no
    # clock worth hedging on (its hops are in-process), and hedging there would only make runs
    # depend on wall time.
    hedge: bool = False
    # Tie-break a disputed confirmation on a third replica: when the accepted recomputation
    # disagrees with a flagged tensor, one more replica recomputes the hop, and a flagged worker
    # that agrees with it is cleared, not struck. Off: it removes the honest bans ``lazy_partial``
    # causes, but lazy workers running the same stale copy answer alike and witness for each
    # other, so it adds honest bans under ``lazy_stale``; any majority-of-three tie-break has that
    # hole (BENCHMARKS.md, "Lazy workers and the tie-break").
    second_witness: bool = False
    # Spot checks: the share of accepted hops (training, forward and backward) also recomputed
    # on another replica of the stage. The checked worker is struck (at most once per pipeline
    # step), and its tensor replaced, only when that checker disagrees with it
    # (``BoundaryScreen.disagree``) and a second
    # checker agrees with the first and disagrees with it too; a checker is never struck by a
    # spot check, so attackers acting as checkers can at worst make a check inconclusive, and
    # frame an honest worker only when both checkers are attackers answering alike. Each check
    # costs one hop's compute (two on a disagreement). Off: replicas an optimizer step or two
    # apart answer the same input as differently as the attacker's push, and it banned honest
    # replicas (BENCHMARKS.md, "Spot checks").
    spot_check: float = 0.0
    # After a checker disagrees with a worker, that worker's next this-many accepted hops are
    # all spot-checked: the compute goes where the doubt is, so an attacker collects its strikes
    # (and its ban) at the follow-up rate, not at ``spot_check``'s, and an honest replica that
    # diverged for a moment clears itself by agreeing again.
    spot_follow_up: int = 10
    # Replicas whose answers sign the same parameter version and digest (lockstep stages) are
    # compared exactly, not with the screen's statistical ``spot_tolerance``: on the same build
    # and device their answers must be bit-identical, and any difference is a disagreement.
    # Answers computed on different devices or builds (the signed ``device`` differs) may differ
    # by this relative L2 distance: float32 kernels differ in summation order, about 1e-6
    # relative per reduction; 1e-3 leaves room for deep stages while a push the fences pass
    # (0.1-0.2 rms and up) is far beyond it. Answers at different versions or digests are not
    # compared (inconclusive): the stage re-syncs such a replica.
    spot_mixed_rtol: float = 1e-3
    # Seed of the spot-check draw (None: unpredictable). The simulator seeds it for
    # reproducible runs; a live verifier must not, or workers could predict which hops are checked.
    spot_seed: int | None = None


@dataclass
class SpotComparison:
    """Two answers to one hop, compared (``PipelineDriver._compare``)."""

    flagged: bool  # they disagree
    distance: float  # relative L2 when exact, else the screen's spot distance
    tolerance: float
    exact: bool  # compared as identical replicas (same version and digest), not statistically

    @property
    def distances(self) -> dict[str, float]:
        return {"spot": self.distance}

    @property
    def fences(self) -> dict[str, float]:
        return {"spot": self.tolerance}


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class PipelineDriver:
    """Drives micro-batches through the stages; the screening and strike logic plug in here."""

    def __init__(
        self,
        num_stages: int,
        transport: StageTransport,
        router: Router | None = None,
        screener: Any | None = None,
        ledger: Any | None = None,
        is_banned: Callable[[str], bool] = lambda w: False,
        config: DriverConfig | None = None,
        on_flag: Callable[[FlagEvent], None] | None = None,
        on_clean: Callable[[int, str, str], None] | None = None,
        hidden_shape: tuple[int, ...] | None = None,
    ):
        self.num_stages = num_stages
        self.hidden_shape = hidden_shape  # shape of inter-stage activations, for substitutes
        self.transport = transport
        self.router = router or Router()
        self.screener = screener
        self.ledger = ledger
        self.is_banned = is_banned
        self.config = config or DriverConfig()
        self.on_flag = on_flag
        self.on_clean = on_clean
        self.screen_seconds = 0.0
        self.flags_cleared = 0  # fence flags that the recomputation on another replica did not confirm
        self.flags_tied = 0  # of those, flags a second witness cleared after the first disputed them
        self.witness_hops = 0  # extra recomputations made to break such ties
        self.spot_checks = 0  # accepted hops drawn for a spot check
        self.spot_hops = 0  # recomputations those checks made
        self.spot_struck = 0  # checked workers struck (two checkers agreed against them)
        self.spot_inconclusive = 0  # first checker disagreed, second did not settle it
        self.spot_unmatched = 0  # checker answers at another version or digest (not compared)
        self._spot_rng = random.Random(self.config.spot_seed)
        self._spot_follow: dict[str, int] = {}  # worker -> accepted hops still to spot-check
        self._spot_struck_at: dict[str, int] = {}  # worker -> pipeline step of its last spot strike
        self.hop_failures: dict[str, int] = {}

    # -- one hop ------------------------------------------------------------------------------
    async def _hop(
        self, stage: int, direction: str, call: Callable[[str, float], Any], result: MicroBatchResult,
        prefer: str | None = None, screen_like: torch.Tensor | None = None, screen: bool = True,
        source: torch.Tensor | None = None, recheck: Callable[[str, float], Any] | None = None,
    ) -> tuple[HopResult, str | None]:
        """Run one hop until a replica returns an unflagged tensor; returns (result, worker).

        ``worker`` is None when the tensor is the screen's substitute (no clean replica left).
        ``source`` is what went into the hop (input activation / output gradient), screened
        against the reply by the ``skip`` distance. ``recheck`` computes the same hop without
        side effects on the replica (a backward that accumulates nothing), for spot checks and
        witnesses; default ``call``.
        """
        recheck = recheck or call
        flagged: set[str] = set()
        pending: list[tuple[str, Any, dict[str, Any], torch.Tensor]] = []  # fence flags awaiting confirmation
        failed_here: set[str] = set()
        deadline = time.monotonic() + self.config.wait_for_replica_s
        attempts = 0

        def failure(worker: str, e: HopError) -> None:
            """One replica's attempt failed: back it off; strike a signed bad answer."""
            self.router.failed(worker)
            failed_here.add(worker)
            result.retries += 1
            self.hop_failures[e.reason] = self.hop_failures.get(e.reason, 0) + 1
            if e.integrity:
                logger.warning("integrity fault from %s at stage %d %s: %s", worker[-8:], stage, direction, e)
                self._flag(stage, direction, worker, (e.reason,), result, None, {"error": str(e)})
                flagged.add(worker)
                if worker in usable:  # no more hedges on it in this attempt either
                    usable.remove(worker)
            logger.debug("hop %s/%d on %s failed: %s", direction, stage, worker[-8:], e)

        def live() -> list[str]:
            """The stage's replicas as the verifier knows them now, less banned and flagged ones."""
            return [w for w in self.transport.replicas(stage) if not self.is_banned(w) and w not in flagged]

        while attempts < self.config.max_hop_attempts:  # waiting for a usable replica is not an attempt
            candidates = [w for w in self.transport.replicas(stage) if not self.is_banned(w)]
            usable = [w for w in candidates if w not in flagged]
            first_try = not flagged and not failed_here
            suspect = self._probation(usable, failed_here, result, stage, direction) if first_try else None
            if prefer in usable and self.router.available(prefer) and prefer not in failed_here:
                worker = prefer
            elif suspect is not None:
                worker = suspect
            else:
                worker = self.router.pick(usable, exclude=failed_here)
                if worker is None and failed_here:  # every replica failed once: allow retrying them
                    failed_here.clear()
                    worker = self.router.pick(usable)
            if worker is None:
                if candidates and not usable:  # every live replica sent a flagged tensor
                    self._settle(stage, direction, pending, result, None, None, source)
                    return self._substitute(stage, direction, result, screen_like), None
                if time.monotonic() > deadline:
                    self._settle(stage, direction, pending, result, None, None, source)
                    raise HopError(f"no usable replica of stage {stage} for {self.config.wait_for_replica_s:.0f}s",
                                   "no_replica", integrity=False)
                await asyncio.sleep(self.config.poll_s)
                continue
            result.attempts += 1
            attempts += 1
            timeout = self.router.timeout_for(candidates)
            self.router.started(worker)
            answered = await self._call(call, worker, timeout, usable, result, failure, live)
            if answered is None:  # every replica tried in this attempt failed (each recorded)
                continue
            hop, worker, latency = answered
            self.router.finished(worker, latency)
            if hop.tensor is None or self.screener is None or not screen:
                return hop, worker
            t1 = time.perf_counter()
            verdict = self.screener.screen(stage, direction, worker, hop.tensor, source)
            self.screen_seconds += time.perf_counter() - t1
            self._strike_retroactive(result)
            if verdict.flagged:
                flagged.add(worker)
                result.retries += 1
                if self._confirmable(verdict):
                    pending.append((worker, verdict, hop.meta, hop.tensor))
                else:
                    self._flag(stage, direction, worker, tuple(verdict.reasons), result, verdict, hop.meta,
                               hop.tensor, source=source)
                continue
            if pending:
                replaced = await self._confirm_exact(stage, direction, recheck, pending, result, hop, worker, source)
                if replaced is not None:  # the stage's majority proved the accepted answer wrong
                    hop, worker = replaced
            if pending and self.config.second_witness:
                await self._tie_break(stage, direction, recheck, pending, result, verdict, worker, live(), source)
            self._settle(stage, direction, pending, result, verdict, worker, source)
            if self.config.spot_check and self._spot_due(worker):
                replaced = await self._spot_check(stage, direction, recheck, result, hop, verdict, worker, live(),
                                                  source)
                if replaced is not None:  # the agreeing checker's answer goes on, and counts as its clean message
                    hop, worker = replaced
            if self.ledger is not None and not result.tainted:
                self.ledger.record(worker, False)
            if self.on_clean is not None:
                self.on_clean(stage, direction, worker)
            return hop, worker
        self._settle(stage, direction, pending, result, None, None, source)
        raise HopError(f"stage {stage} {direction}: gave up after {self.config.max_hop_attempts} attempts",
                       "exhausted", integrity=False)

    async def _call(self, call: Callable[[str, float], Any], worker: str, timeout: float, usable: list[str],
                    result: MicroBatchResult, failure: Callable[[str, HopError], None],
                    usable_now: Callable[[], list[str]] | None = None,
                    ) -> tuple[HopResult, str, float] | None:
        """One attempt of a hop on ``worker``; returns (reply, who answered, their latency), or
        None when every replica tried failed (each failure already went to ``failure``).

        With hedging on, whenever every request still out has gone unanswered for
        ``Router.hedge_after``, the same request also goes to another replica that the router
        finds usable now, and the first valid answer wins; the router learns the losers' latency.
        A backup that fails does not leave the hop waiting on the straggler: once its back-off
        ends it (or another replica) is tried again, until the attempt's own timeout. A replica
        that failed earlier in this hop is eligible too, so a stream cut once under load does not
        leave a two-replica stage with only its silent member. Backups are chosen from
        ``usable_now()``, the stage's replicas as the verifier knows them at that moment: a replica
        discovered while the hop waits (the swarm view refreshes every heartbeat) can take it
        over, instead of the hop waiting out its timeout on a silent replica (BENCHMARKS.md,
        "Faults"). The caller marked ``worker`` started.
        """
        after = self.router.hedge_after(usable) if self.config.hedge else None
        if after is not None and after >= timeout:
            after = None
        t0 = time.perf_counter()
        starts = {worker: t0}
        tasks = {asyncio.ensure_future(call(worker, timeout)): worker}
        try:
            while tasks:
                now = time.perf_counter()
                wake = None
                if after is not None and now - t0 < timeout:
                    last_slow = max(starts[w] for w in tasks.values()) + after
                    if now >= last_slow:
                        pool = usable_now() if usable_now is not None else usable
                        backup = self.router.pick(pool, exclude=set(tasks.values()))
                        if backup is not None:
                            result.hedged += 1
                            logger.debug("hop on %s unanswered after %.1fs: hedging on %s",
                                         worker[-8:], now - t0, backup[-8:])
                            self.router.started(backup)
                            starts[backup] = now
                            tasks[asyncio.ensure_future(call(backup, timeout))] = backup
                            continue
                        wake = self.config.poll_s or 0.05  # no replica usable now: look again soon
                    else:
                        wake = last_slow - now
                done, _ = await asyncio.wait(tasks, timeout=wake, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.exception() is None):  # failures first
                    who = tasks.pop(task)
                    exc = task.exception()
                    if exc is None:
                        for loser in tasks.values():
                            self.router.abandoned(loser, time.perf_counter() - starts[loser])
                        return task.result(), who, time.perf_counter() - starts[who]
                    if not isinstance(exc, HopError):
                        raise exc
                    failure(who, exc)
            return None
        finally:
            for task in tasks:
                task.cancel()

    async def _tie_break(self, stage: int, direction: str, call: Callable[[str, float], Any],
                         pending: list[tuple[str, Any, dict[str, Any], torch.Tensor]], result: MicroBatchResult,
                         accepted: Any, accepted_by: str, live: list[str], source: torch.Tensor | None) -> None:
        """Before a disputed flag is struck, ask a third replica (see ``DriverConfig.second_witness``).

        A pending flag is *disputed* when the accepted recomputation would confirm it. Another
        replica of ``live`` (not banned, not flagged in this hop), not the accepted one, then recomputes the
        same hop; its answer is judged side-effect free (``Screener.witness``) and serves only if
        the fences pass it. A flagged worker whose tensor that witness does not confirm agrees
        with one of two independent recomputations: the flag is cleared, no strike. Otherwise,
        or when no witness can be had, the flag goes to ``_settle`` as before. The witness's
        tensor is never passed on; it costs one extra hop per disputed flag, i.e. per attacked
        message until the attacker's ban, and per honest false positive the first witness
        disputes.
        """
        judge = getattr(self.screener, "witness", None)
        if judge is None:
            return
        disputed = [p for p in pending if self.screener.confirm(stage, direction, p[1], accepted).flagged]
        if not disputed:
            return
        pool = [w for w in live if w != accepted_by]
        witness = self.router.pick(pool)
        if witness is None:
            return
        answered = await self._recompute(call, witness, pool, stage)
        if answered is None:
            return
        self.witness_hops += 1
        if answered.tensor is None:
            return
        second = judge(stage, direction, witness, answered.tensor, source)
        if second is None or second.flagged:
            return
        for item in disputed:
            worker, verdict, meta, tensor = item
            if self.screener.confirm(stage, direction, verdict, second).flagged:
                continue
            pending.remove(item)
            self.flags_cleared += 1
            self.flags_tied += 1
            self._flag(stage, direction, worker, tuple(verdict.reasons), result, verdict,
                       {**meta, "cleared_by": witness, "disputed_by": accepted_by}, tensor, strike=False,
                       source=source)

    async def _recompute(self, call: Callable[[str, float], Any], worker: str, pool: list[str],
                         stage: int) -> HopResult | None:
        """One extra recomputation of the hop on ``worker`` (a witness or a spot checker), with
        the router's bookkeeping; None when it failed (an availability fault, never struck:
        the hop itself was already answered)."""
        timeout = self.router.timeout_for(pool)
        # extra work on a hop already answered: a replica slower than the stage's hedge delay is
        # not waited for (the check goes without it; the step must not wait out a hop timeout).
        # The delay is the whole stage's: a pool of the straggler alone would set its own bar.
        hedge = self.router.hedge_after(self.transport.replicas(stage)) if self.config.hedge else None
        if hedge is not None:
            timeout = min(timeout, hedge)
        self.router.started(worker)
        t0 = time.perf_counter()
        try:
            hop = await call(worker, timeout)
        except HopError as e:
            if hedge is not None and e.reason == "timeout":
                self.router.abandoned(worker, time.perf_counter() - t0)  # slow, not failed: no back-off
            else:
                self.router.failed(worker)
            self.hop_failures[e.reason] = self.hop_failures.get(e.reason, 0) + 1
            return None
        self.router.finished(worker, time.perf_counter() - t0)
        return hop

    def _spot_due(self, worker: str) -> bool:
        """Is this accepted hop of ``worker`` spot-checked? Always while it is under follow-up
        after a disagreement, else with probability ``spot_check``."""
        left = self._spot_follow.get(worker, 0)
        if left > 0:
            self._spot_follow[worker] = left - 1
            return True
        return self._spot_rng.random() < self.config.spot_check

    async def _spot_check(self, stage: int, direction: str, call: Callable[[str, float], Any],
                          result: MicroBatchResult, hop: HopResult, verdict: Any, worker: str, live: list[str],
                          source: torch.Tensor | None) -> tuple[HopResult, str] | None:
        """Recompute an accepted hop elsewhere (see ``DriverConfig.spot_check``).

        Returns the replacement (an agreeing checker's answer, and that checker) when the
        checked worker was struck, else None (the accepted tensor stands). Checkers are drawn by
        the router from ``live`` less the checked worker; a checker whose own answer is over
        the fences, malformed, or which fails, is skipped (at most three tries). The first
        usable checker that agrees ends the check (:meth:`_compare`: exact between replicas
        that signed one parameter version and digest, else ``BoundaryScreen.disagree``); one that
        disagrees puts the worker under follow-up and calls a second, and the worker is struck
        only if the second agrees with the first and disagrees with the worker. Then its tensor
        is replaced by the first checker's, even when the strike itself is not counted (below).
        Anything else is inconclusive: no strike for anyone.

        At most one spot strike per worker and pipeline step: an honest replica an optimizer
        step or two away from the others (until the next averaging round) disagrees with them
        on every hop for a moment, and the follow-up checks would otherwise turn one such moment
        into several strikes at once; an attacker disagrees at every step and still collects one
        strike per step. It does not stop honest bans on its own: an embedding one AdamW step
        apart differs by as much as an attack (BENCHMARKS.md, "Spot checks").
        """
        judge = getattr(self.screener, "witness", None)
        disagree = getattr(self.screener, "disagree", None)
        if judge is None or disagree is None or hop.tensor is None or result.tainted:
            return None
        pool = [w for w in live if w != worker]
        if not pool:
            return None
        self.spot_checks += 1
        checks: list[tuple[str, HopResult, Any]] = []  # (checker, its answer, its verdict against the worker)
        tried: set[str] = set()
        while len(tried) < 3 and len(checks) < 2:
            checker = self.router.pick([w for w in pool if w not in tried])
            if checker is None:
                break
            tried.add(checker)
            answered = await self._recompute(call, checker, pool, stage)
            if answered is None:
                continue
            self.spot_hops += 1
            if answered.tensor is None:
                return None
            seen = judge(stage, direction, checker, answered.tensor, source)
            if seen is None or seen.flagged:
                continue
            against = self._compare(stage, direction, hop, answered)
            if against is None:  # another version or digest: nothing to compare exactly
                self.spot_unmatched += 1
                continue
            if not checks:
                if not against.flagged:
                    return None  # the usual outcome: an honest pair agrees
                self._spot_follow[worker] = max(self._spot_follow.get(worker, 0), self.config.spot_follow_up)
                if against.exact:  # identical replicas disagree: the stage's majority settles it
                    return await self._settle_exact(stage, direction, call, result, {worker: verdict},
                                                    [(worker, hop), (checker, answered)], tried, source)
                checks.append((checker, answered, against))
                continue
            first_by, first_hop, pair = checks[0]
            between = self._compare(stage, direction, first_hop, answered)
            if against.flagged and between is not None and not between.flagged:
                once = self._spot_struck_at.get(worker) != result.step
                self._spot_struck_at[worker] = result.step
                self.spot_struck += once
                self._flag(stage, direction, worker, ("spot",), result, verdict,
                           {**hop.meta, "spot_check": True, "checked_by": [first_by, checker],
                            "spot_distance": pair.distances.get("spot"), "spot_tolerance": pair.fences["spot"],
                            "spot_exact": pair.exact},
                           hop.tensor, strike=once, source=source)
                logger.info("spot check at stage %d %s: %s disagrees with %s and %s (distance %s)", stage,
                            direction, worker[-8:], first_by[-8:], checker[-8:], pair.distances.get("spot"))
                return first_hop, first_by
            break
        if checks:
            self.spot_inconclusive += 1
        return None

    async def _confirm_exact(self, stage: int, direction: str, call: Callable[[str, float], Any],
                             pending: list[tuple[str, Any, dict[str, Any], torch.Tensor]], result: MicroBatchResult,
                             accepted: HopResult, accepted_by: str, source: torch.Tensor | None) -> tuple[HopResult, str] | None:
        """Settle fence flags exactly where the flagged answer and the accepted recomputation
        sign one version and digest: the same bits clear the flag (a false positive of the
        fences, provably), different bits go to the stage's majority (:meth:`_settle_exact`),
        which strikes whoever it outvotes. Flags it cannot compare stay for the statistical
        confirmation. Returns the majority's answer when it outvoted the accepted one."""
        replacement = None
        for item in list(pending):
            worker, verdict, meta, tensor = item
            flagged = HopResult(tensor, meta)
            same = self._compare(stage, direction, flagged, accepted)
            if same is None or not same.exact:
                continue
            pending.remove(item)
            if not same.flagged:
                self.flags_cleared += 1
                self._flag(stage, direction, worker, tuple(verdict.reasons), result, verdict,
                           {**meta, "cleared_by": accepted_by, "cleared_exactly": True}, tensor, strike=False,
                           source=source)
                continue
            self.spot_checks += 1
            settled = await self._settle_exact(stage, direction, call, result, {worker: verdict},
                                               [(worker, flagged), (accepted_by, accepted)], {worker, accepted_by},
                                               source, checked=accepted_by)
            if settled is not None:
                replacement = settled
        return replacement

    async def _settle_exact(self, stage: int, direction: str, call: Callable[[str, float], Any],
                            result: MicroBatchResult, verdicts: dict[str, Any],
                            answers: list[tuple[str, HopResult]], tried: set[str],
                            source: torch.Tensor | None, checked: str | None = None,
                            ) -> tuple[HopResult, str] | None:
        """Two identical replicas (one version, one digest) answered one hop differently: ask
        more replicas at that version until a strict majority of the stage's live replicas
        agree exactly. Every signer outside that majority is proven wrong (it signed an answer
        its own signed state does not compute) and banned at once; the worker's tensor is
        replaced if it was one of them. Without a majority nobody is struck.

        The first two answers are the checked worker's and its checker's; a lying checker
        cannot frame an honest worker, since a strict majority of the stage must agree against
        it, and pays for the attempt like any other proven lie. ``checked`` is the signer whose
        answer goes on unless outvoted (default: the first); its replacement is returned."""
        worker = checked or answers[0][0]
        # the majority is of every replica of the stage that is not banned, flagged in this hop
        # or not: counted among fewer, identical attackers (a deterministic attack answers alike)
        # could outvote the honest replicas the fences happened to flag
        live = [w for w in self.transport.replicas(stage) if not self.is_banned(w)]
        need = len(live) // 2 + 1
        groups: list[list[tuple[str, HopResult]]] = []

        def place(who: str, hop: HopResult) -> None:
            for g in groups:
                same = self._compare(stage, direction, g[0][1], hop)
                if same is not None and not same.flagged:
                    g.append((who, hop))
                    return
            groups.append([(who, hop)])

        for who, hop in answers:
            place(who, hop)
        pool = [w for w in live if w not in tried and w not in {who for who, _ in answers}]
        while max(len(g) for g in groups) < need:
            # enough answers are still possible only if the replicas left can make up a majority
            if max(len(g) for g in groups) + len(pool) < need:
                break
            checker = self.router.pick(pool)
            if checker is None:
                break
            pool.remove(checker)
            tried.add(checker)
            answered = await self._recompute(call, checker, [*pool, checker], stage)
            if answered is None or answered.tensor is None:
                continue
            self.spot_hops += 1
            if self._compare(stage, direction, answers[0][1], answered) is None:  # another version
                self.spot_unmatched += 1
                continue
            place(checker, answered)
        majority = max(groups, key=len)
        if len(majority) < need:
            self.spot_inconclusive += 1
            return None
        agreeing = {who for who, _ in majority}
        for group in groups:
            if group is majority:
                continue
            for who, hop in group:
                pair = self._compare(stage, direction, hop, majority[0][1])
                self.spot_struck += 1
                self._flag(stage, direction, who, ("spot",), result, verdicts.get(who),
                           {**hop.meta, "spot_check": True, "spot_exact": True, "checked_by": sorted(agreeing),
                            "spot_distance": pair.distance if pair else None, "spot_tolerance": pair.tolerance if pair else None},
                           hop.tensor, source=source, proven=True)
                logger.info("spot check at stage %d %s: %s disagrees exactly with %d of %d replicas at its version",
                            stage, direction, who[-8:], len(majority), len(live))
        if worker in agreeing:
            return None
        return majority[0][1], majority[0][0]

    def _compare(self, stage: int, direction: str, a: HopResult, b: HopResult) -> SpotComparison | None:
        """Do two replicas' answers to one hop disagree? Exactly when both signed the same
        parameter version and digest (``spot_mixed_rtol`` across devices); None when they
        signed different ones; the screen's statistical ``disagree`` when neither signed any
        (asynchronous replicas)."""
        va, vb = a.meta.get("version"), b.meta.get("version")
        if va is None and vb is None:
            d = self.screener.disagree(stage, direction, a.tensor, b.tensor)
            return SpotComparison(bool(d.flagged), float(d.distances.get("spot", 0.0)), float(d.fences["spot"]),
                                  False)
        if va != vb or a.meta.get("params_digest") is None or a.meta.get("params_digest") != b.meta.get("params_digest"):
            return None
        rtol = 0.0 if a.meta.get("device") == b.meta.get("device") else self.config.spot_mixed_rtol
        if a.tensor.shape != b.tensor.shape:
            return SpotComparison(True, math.inf, rtol, True)
        if rtol == 0.0:
            same = a.tensor.dtype == b.tensor.dtype and torch.equal(a.tensor, b.tensor)
            dist = 0.0 if same else _relative_l2(a.tensor, b.tensor)
            return SpotComparison(not same, dist, 0.0, True)
        dist = _relative_l2(a.tensor, b.tensor)
        return SpotComparison(dist > rtol, dist, rtol, True)

    def _confirmable(self, verdict: Any) -> bool:
        """Fence flags wait for confirmation; provable faults (no profile) are struck at once."""
        return getattr(self.screener, "confirm", None) is not None and getattr(verdict, "profile", None) is not None

    def _settle(self, stage: int, direction: str, pending: list[tuple[str, Any, dict[str, Any], torch.Tensor]],
                result: MicroBatchResult, accepted: Any, accepted_by: str | None,
                source: torch.Tensor | None = None) -> None:
        """Turn the hop's pending fence flags into strikes or clearances (see module docstring).

        Without an accepted recomputation (every replica flagged, or the hop gave up) nothing
        confirms the flags: no strike, since a hop that no replica can pass is the input's or
        the stage's anomaly, not one worker's.
        """
        for worker, verdict, meta, tensor in pending:
            if accepted is None:
                self._flag(stage, direction, worker, tuple(verdict.reasons), result, verdict,
                           {**meta, "unconfirmed": True}, tensor, strike=False, source=source)
                continue
            check = self.screener.confirm(stage, direction, verdict, accepted)
            if check.flagged:
                evidence = {**meta, "confirmed_by": accepted_by, "confirm_distances": dict(check.distances)}
                self._flag(stage, direction, worker, tuple(verdict.reasons), result, verdict, evidence, tensor,
                           source=source)
            else:
                self.flags_cleared += 1
                self._flag(stage, direction, worker, tuple(verdict.reasons), result, verdict,
                           {**meta, "cleared_by": accepted_by}, tensor, strike=False, source=source)
        pending.clear()

    def _probation(self, usable: list[str], failed: set[str], result: MicroBatchResult, stage: int,
                   direction: str) -> str | None:
        """A replica with outstanding strikes gets ``probation_share`` of the stage's first attempts.

        Re-checking a suspect soon settles it either way: an attacker reaches the strike limit in
        a few hops instead of waiting for its random share of traffic, and an honest replica
        struck by a glitch earns its forgiveness faster. The cost is bounded: a flagged hop is
        recomputed elsewhere, and only first attempts are steered (never a retry).
        """
        if self.ledger is None or result.tainted or not self.config.probation_share:
            return None
        suspects = [w for w in usable if w not in failed and self.router.available(w)
                    and 0 < self.ledger.state(w).strikes and not self.ledger.is_banned(w)]
        if not suspects:
            return None
        h = hashlib.blake2b(f"{result.step}|{result.micro_batch}|{stage}|{direction}".encode(), digest_size=4)
        if int.from_bytes(h.digest(), "big") / 2**32 >= self.config.probation_share:
            return None
        return max(suspects, key=lambda w: self.ledger.state(w).strikes)

    def _strike_retroactive(self, result: MicroBatchResult) -> None:
        """Report what the screen found when it re-scored its calibration messages.

        Those flags cannot be confirmed (the tensors were passed on long ago, nobody recomputed
        them) and they come in bursts right after a calibration or a stage-wide recalibration,
        when the fences are youngest, so struck one by one they would be most of the strikes
        honest workers collect. A retroactive flag is therefore no strike. A worker with most of
        its calibration messages flagged (``Verdict.mostly_flagged``) is put on probation instead:
        one strike short of a ban, so that its next *confirmed* live flag bans it, and clean
        messages forgive it as usual; without this, an attacker that begins during a
        recalibration waits for ``strike_limit`` more confirmed flags.
        """
        take = getattr(self.screener, "take_retroactive", None)
        events = take() if take else []
        if self.ledger is not None:
            marked: dict[str, int] = {}
            for _, _, worker, verdict in events:
                if getattr(verdict, "mostly_flagged", False):
                    marked[worker] = marked.get(worker, 0) + 1
            for worker, count in marked.items():
                if not self.ledger.is_banned(worker):
                    self.ledger.probation(worker, count)
                    logger.info("probation for %s: %d of its calibration messages were over the fences",
                                worker[-8:], count)
        for stage, direction, worker, verdict in events:
            if self.on_flag is not None:
                self.on_flag(FlagEvent(result.step, -1, stage, direction, worker, tuple(verdict.reasons), False,
                                       verdict, {"retroactive": True}))

    def _flag(self, stage: int, direction: str, worker: str, reasons: tuple[str, ...], result: MicroBatchResult,
              verdict: Any, meta: dict[str, Any], tensor: torch.Tensor | None = None, strike: bool = True,
              source: torch.Tensor | None = None, proven: bool = False) -> None:
        """Report a flag; strike the worker unless the micro-batch is tainted or ``strike`` is
        off. A ``proven`` fault (an exact disagreement with its stage's majority) bans at once."""
        struck = strike and (proven or not result.tainted)
        if struck and self.ledger is not None:
            self.ledger.record(worker, True, proven=proven)
        if self.on_flag is not None:
            self.on_flag(FlagEvent(result.step, result.micro_batch, stage, direction, worker, reasons, struck,
                                   verdict, meta, tensor, source))

    def _substitute(self, stage: int, direction: str, result: MicroBatchResult,
                    like: torch.Tensor | None) -> HopResult:
        result.substituted += 1
        result.tainted = True
        if self.screener is None or like is None:
            raise HopError(f"stage {stage} {direction}: every replica flagged and nothing to substitute",
                           "all_flagged", integrity=False)
        return HopResult(self.screener.boundary(stage, direction).substitute(like), {"substituted": True})

    # -- one micro-batch ------------------------------------------------------------------------
    async def train_micro_batch(self, step: int, micro_batch: int, inputs: torch.Tensor,
                                targets: torch.Tensor) -> MicroBatchResult:
        """Forward through all stages, screen, then backward; returns what happened."""
        res = MicroBatchResult(step, micro_batch)
        S = self.num_stages
        acts: list[torch.Tensor] = [inputs]
        route: list[str | None] = []
        try:
            for s in range(S):
                x = acts[s]
                tg = targets if s == S - 1 else None

                def call(w: str, timeout: float, s=s, x=x, tg=tg) -> Any:
                    return self.transport.forward(w, s, step, micro_batch, x, tg, "train", timeout)

                like = torch.zeros(()) if s == S - 1 else (
                    torch.zeros(self.hidden_shape) if self.hidden_shape is not None else None)
                src = x if s > 0 and s < S - 1 else None  # hidden state in and out: a residual hop
                hop, worker = await self._hop(s, "forward", call, res, screen_like=like, source=src)
                route.append(worker)
                acts.append(hop.tensor)
            loss = acts[-1]
            res.loss = float(loss)
            grad: torch.Tensor | None = None
            for s in reversed(range(S)):
                x = acts[s]
                tg = targets if s == S - 1 else None

                def bcall(w: str, timeout: float, s=s, x=x, g=grad, tg=tg, mode: str = "train") -> Any:
                    return self.transport.backward(w, s, step, micro_batch, x, g, tg, timeout, mode=mode)

                def probe(w: str, timeout: float, call=bcall) -> Any:
                    return call(w, timeout, mode="probe")

                hop, _ = await self._hop(s, "backward", bcall, res, prefer=route[s],
                                         screen_like=acts[s] if s > 0 else None, source=grad, recheck=probe)
                grad = hop.tensor
            res.completed = True
        except HopError as e:
            res.error = f"{e.reason}: {e}"
        res.route = [w or "substitute" for w in route]
        return res

    async def eval_micro_batch(self, step: int, micro_batch: int, inputs: torch.Tensor,
                               targets: torch.Tensor) -> float:
        """Forward-only validation pass (not screened, not struck, no state on workers)."""
        h = inputs
        res = MicroBatchResult(step, micro_batch)
        for s in range(self.num_stages):
            tg = targets if s == self.num_stages - 1 else None

            def call(w: str, timeout: float, s=s, x=h, tg=tg) -> Any:
                return self.transport.forward(w, s, step, micro_batch, x, tg, "eval", timeout)

            hop, _ = await self._hop(s, "forward", call, res, screen=False)
            h = hop.tensor
        return float(h)
