"""The pipeline driver's attribution rules: a fence flag becomes a strike only when the hop,
recomputed by another replica on the same input, was accepted and still disagrees with the
flagged tensor; provable faults strike at once; a hop nobody passes strikes nobody.

The transport here is in-process arithmetic (the driver is transport-agnostic by design; the
network path is covered by the swarm tests) and the screener's *verdicts* are scripted so each
rule is exercised deterministically; the confirmation itself is the real screening code.
"""

from __future__ import annotations

import asyncio

import torch

from sentinel.run.screening import ScreeningConfig
from sentinel.verifier.driver import DriverConfig, FlagEvent, HopError, HopResult, PipelineDriver
from sentinel.verifier.reference import DISTANCES, profile_of
from sentinel.verifier.routing import Router
from sentinel.verifier.screen import BoundaryScreen, Verdict
from sentinel.verifier.stats import compute_stats
from sentinel.verifier.strikes import StrikeLedger

HIDDEN = (2, 8, 16)
W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))


class Arithmetic:
    """Stage 0: ``x @ W`` (``-x @ W`` from the sign flipper, NaN from the broken one); stage 1: a
    loss. Honest replicas differ by a tiny per-worker perturbation, like averaged replicas do."""

    def __init__(self, stage0: list[str]):
        self.stage0 = stage0

    def replicas(self, stage: int) -> list[str]:
        return self.stage0 if stage == 0 else ["last"]

    async def forward(self, worker, stage, step, micro_batch, x, targets, mode, timeout):
        await asyncio.sleep(0.001)  # in flight for a moment, so concurrent micro-batches spread over replicas
        if stage == 1:
            return HopResult(x.pow(2).mean())
        y = x @ (W + 1e-4 * (hash(worker) % 7))
        if worker == "flipper":
            y = -y
        if worker == "broken":
            y = y.clone()
            y[0, 0, 0] = float("nan")
        return HopResult(y)

    async def backward(self, worker, stage, step, micro_batch, x, grad, targets, timeout, mode="train"):
        return HopResult(torch.ones(HIDDEN) if stage == 1 else None)


class Scripted:
    """Flags stage-0 forward messages of the workers in ``flag`` (with wide fences), accepts the
    rest; everything else is delegated to a real :class:`BoundaryScreen`."""

    def __init__(self, flag: set[str]):
        self.flag = flag
        self.real = BoundaryScreen(ScreeningConfig(), "forward")
        self.fences = dict.fromkeys(DISTANCES, 0.5)

    def screen(self, stage, direction, worker, x, source=None):
        if not torch.isfinite(x).all():
            return Verdict(True, ("non_finite",), {}, {})
        p = profile_of(compute_stats(x, self.real.config))
        flagged = stage == 0 and direction == "forward" and worker in self.flag
        # as if just over the fences on l2; the confirmation recomputes the real distances
        return Verdict(flagged, ("l2",) if flagged else (), dict.fromkeys(DISTANCES, 0.6), dict(self.fences),
                       profile=p)

    def confirm(self, stage, direction, flagged, accepted):
        return self.real.confirm(flagged, accepted)

    def witness(self, stage, direction, worker, x, source=None):
        return self.screen(stage, direction, worker, x, source) if torch.isfinite(x).all() else None

    def disagree(self, stage, direction, checked, check):
        return self.real.disagree(checked, check)

    def boundary(self, stage, direction):
        return self.real


def drive(stage0: list[str], flag: set[str], micro_batches: int = 12,
          second_witness: bool = False) -> tuple[StrikeLedger, list[FlagEvent], list]:
    ledger = StrikeLedger(strike_limit=3, forgive_after=100)
    events: list[FlagEvent] = []
    config = DriverConfig(poll_s=0.0, wait_for_replica_s=0.0, second_witness=second_witness)
    driver = PipelineDriver(2, Arithmetic(stage0), screener=Scripted(flag), ledger=ledger,
                            is_banned=ledger.is_banned, config=config,
                            on_flag=events.append, hidden_shape=HIDDEN)
    gen = torch.Generator().manual_seed(1)

    inputs = [torch.randn(HIDDEN, generator=gen) for _ in range(micro_batches)]

    async def run():
        return await asyncio.gather(*(driver.train_micro_batch(1, i, x, torch.zeros(2, 8))
                                      for i, x in enumerate(inputs)))

    return ledger, events, asyncio.run(run())


def test_honest_flag_is_cleared_by_an_agreeing_recomputation():
    ledger, events, results = drive(["honest-a", "honest-b", "honest-c"], flag={"honest-a"})
    mine = [e for e in events if e.worker == "honest-a"]
    assert mine, "the scripted screener must have flagged honest-a at least once"
    assert all(not e.struck and e.meta.get("cleared_by") in ("honest-b", "honest-c") for e in mine)
    assert ledger.state("honest-a").strikes == 0 and not ledger.is_banned("honest-a")
    assert all(r.completed and not r.tainted for r in results)


def test_sign_flip_is_confirmed_and_banned():
    ledger, events, results = drive(["flipper", "honest-b", "honest-c"], flag={"flipper"})
    mine = [e for e in events if e.worker == "flipper"]
    assert len(mine) >= 3
    assert all(e.struck and e.meta.get("confirmed_by") in ("honest-b", "honest-c") for e in mine)
    assert all(e.meta["confirm_distances"]["sign"] > 0.5 for e in mine)
    assert ledger.is_banned("flipper")
    assert all(r.completed for r in results)


def test_provable_fault_strikes_without_confirmation():
    ledger, events, _ = drive(["broken", "honest-b"], flag=set())
    mine = [e for e in events if e.worker == "broken"]
    assert mine and all(e.struck and e.reasons == ("non_finite",) for e in mine)
    assert ledger.is_banned("broken")


def test_hop_that_no_replica_passes_strikes_nobody():
    ledger, events, results = drive(["honest-a", "honest-b"], flag={"honest-a", "honest-b"}, micro_batches=4)
    assert events and all(not e.struck and e.meta.get("unconfirmed") for e in events)
    assert ledger.banned() == []
    assert all(r.completed and r.tainted and r.substituted == 1 for r in results)


def test_confirmation_uses_the_boundary_fences_learned_from_honest_traffic():
    """Real screen, real fences: a same-input honest pair agrees; sign flip and noise do not."""
    screen = BoundaryScreen(ScreeningConfig(), "forward")
    gen = torch.Generator().manual_seed(2)
    for i in range(120):
        x = torch.randn(HIDDEN, generator=gen) + 0.5
        screen.screen(f"r{i % 3}", x @ W)
    assert screen.calibrated
    x = torch.randn(HIDDEN, generator=gen) + 0.5
    honest = x @ W
    other = x @ (W + 1e-3 * torch.randn(W.shape, generator=gen))
    accepted = screen.screen("r0", honest)
    assert not accepted.flagged

    def as_flagged(t: torch.Tensor) -> Verdict:  # as if every fence had fired on it
        stats = compute_stats(t, screen.config)
        v = screen.rescore(stats)
        return Verdict(True, tuple(DISTANCES), v.distances, v.fences, profile=profile_of(stats))

    assert not screen.confirm(as_flagged(other), accepted).flagged
    assert screen.confirm(as_flagged(-other), accepted).flagged
    noisy = other + other.pow(2).mean().sqrt() * torch.randn(other.shape, generator=gen)
    assert screen.confirm(as_flagged(noisy), accepted).flagged
    assert screen.confirm(as_flagged(torch.zeros_like(other)), accepted).flagged


class LazyWitness(Arithmetic):
    """Stage 0 has ``lazy``, which skips its layers: it returns its input, which the (scripted)
    fences pass."""

    async def forward(self, worker, stage, step, micro_batch, x, targets, mode, timeout):
        if stage == 0 and worker == "lazy":
            return HopResult(x.clone())
        return await super().forward(worker, stage, step, micro_batch, x, targets, mode, timeout)


class FixedOrder(Router):
    """Always prefers ``honest-a``, then ``lazy``, then ``honest-c``: the worst order for honest-a."""

    ORDER = ("honest-a", "lazy", "honest-c", "last")

    def pick(self, candidates, exclude=()):
        ready = [c for c in candidates if c not in set(exclude) and self.available(c)]
        return min(ready, key=self.ORDER.index) if ready else None


def _drive_lazy_witness(second_witness: bool) -> tuple[StrikeLedger, list[FlagEvent], PipelineDriver]:
    ledger = StrikeLedger(strike_limit=3, forgive_after=100)
    events: list[FlagEvent] = []
    driver = PipelineDriver(2, LazyWitness(["honest-a", "lazy", "honest-c"]), router=FixedOrder(),
                            screener=Scripted({"honest-a"}), ledger=ledger, is_banned=ledger.is_banned,
                            config=DriverConfig(poll_s=0.0, wait_for_replica_s=0.0, second_witness=second_witness),
                            on_flag=events.append, hidden_shape=HIDDEN)
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(HIDDEN, generator=gen) for _ in range(12)]

    async def run():
        for i, x in enumerate(inputs):
            assert (await driver.train_micro_batch(1, i, x, torch.zeros(2, 8))).completed

    asyncio.run(run())
    return ledger, events, driver


def test_the_tie_break_keeps_a_lazy_witness_from_getting_an_honest_worker_struck() -> None:
    """An honest replica with a false-positive flag, recomputed by a lazy replica whose output
    the fences pass: the two disagree. With one witness (the default) that disagreement
    "confirms" the flag and the honest replica is banned; with the tie-break
    (``second_witness``) a third replica recomputes the hop, agrees with the flagged one, and the
    flag is cleared (the lazy answer is still what is passed on). Why it is still off by
    default: ``DriverConfig.second_witness``."""
    ledger, events, driver = _drive_lazy_witness(second_witness=False)
    assert ledger.is_banned("honest-a"), "without the tie-break the lazy witness must get honest-a banned"
    assert any(e.struck and e.meta.get("confirmed_by") == "lazy" for e in events)

    ledger, events, driver = _drive_lazy_witness(second_witness=True)
    mine = [e for e in events if e.worker == "honest-a"]
    assert mine and not any(e.struck for e in mine)
    assert ledger.state("honest-a").strikes == 0 and not ledger.is_banned("honest-a")
    tied = [e for e in mine if e.meta.get("disputed_by") == "lazy"]
    assert tied and all(e.meta["cleared_by"] == "honest-c" for e in tied)
    assert driver.flags_tied == len(tied) and driver.witness_hops >= len(tied)


def test_a_second_witness_still_confirms_a_real_attack() -> None:
    """The tie-break only clears a flag the third replica agrees with: a sign flipper disagrees
    with both honest recomputations and is struck and banned exactly as before."""
    ledger, events, _ = drive(["flipper", "honest-b", "honest-c"], flag={"flipper"}, second_witness=True)
    assert ledger.is_banned("flipper")
    assert not any(e.meta.get("disputed_by") for e in events)


class Retroactive(Scripted):
    """Accepts everything live, and reports a burst of retroactive flags once, as a boundary
    does when its calibration ends: ``suspect`` with most of its messages flagged, ``honest-b``
    with one stray flag."""

    def __init__(self):
        super().__init__(set())
        self.pending = [("suspect", True)] * 3 + [("honest-b", False)]

    def take_retroactive(self):
        out, self.pending = self.pending, []
        return [(0, "forward", w, Verdict(True, ("skip",), {}, {}, mostly_flagged=m)) for w, m in out]


def test_mostly_flagged_calibration_is_probation_not_a_ban():
    ledger = StrikeLedger(strike_limit=3, forgive_after=100)
    events: list[FlagEvent] = []
    driver = PipelineDriver(2, Arithmetic(["suspect", "honest-b"]), screener=Retroactive(), ledger=ledger,
                            is_banned=ledger.is_banned, config=DriverConfig(poll_s=0.0, wait_for_replica_s=0.0),
                            on_flag=events.append, hidden_shape=HIDDEN)
    x = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2))
    asyncio.run(driver.train_micro_batch(1, 0, x, torch.zeros(2, 8)))
    retro = [e for e in events if e.meta.get("retroactive")]
    assert len(retro) == 4 and not any(e.struck for e in retro)
    suspect = ledger.state("suspect")
    assert not suspect.banned and suspect.flags == 3
    assert 1.9 < suspect.strikes <= 2  # one strike short (minus what its accepted live hops forgave)
    assert ledger.state("honest-b").strikes == 0  # a stray retroactive flag is no strike


class Stragglers(Arithmetic):
    """Like :class:`Arithmetic`, but ``slow`` answers stage-0 forwards after ``delay`` seconds
    and ``silent`` only after the caller's timeout (it never answers in time)."""

    def __init__(self, stage0: list[str], delay: float = 0.3):
        super().__init__(stage0)
        self.delay = delay
        self.calls: list[str] = []

    async def forward(self, worker, stage, step, micro_batch, x, targets, mode, timeout):
        if stage == 0:
            self.calls.append(worker)
            if worker == "silent":
                await asyncio.sleep(timeout + 1)
            if worker == "slow":
                await asyncio.sleep(self.delay)
        return await super().forward(worker, stage, step, micro_batch, x, targets, mode, timeout)


def _hedging_driver(transport, hedge: bool, floor: float = 0.05) -> PipelineDriver:
    from sentinel.verifier.routing import Router, RouterConfig

    router = Router(RouterConfig(timeout_floor_s=5.0, hedge_floor_s=floor, hedge_factor=4.0), salt="t")
    return PipelineDriver(2, transport, router, config=DriverConfig(poll_s=0.0, wait_for_replica_s=0.0, hedge=hedge),
                          hidden_shape=HIDDEN)


def test_a_silent_replica_is_hedged_instead_of_waited_out() -> None:
    transport = Stragglers(["silent", "honest-a", "honest-b"])
    driver = _hedging_driver(transport, hedge=True)
    gen = torch.Generator().manual_seed(0)

    async def go():
        t0 = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(driver.train_micro_batch(0, mb, torch.randn(HIDDEN, generator=gen),
                                                                  None) for mb in range(9)))
        return results, asyncio.get_running_loop().time() - t0

    results, elapsed = asyncio.run(go())
    assert all(r.completed for r in results)
    assert "silent" in transport.calls, "the silent replica was never tried: the drill tested nothing"
    hedged = sum(r.hedged for r in results)
    assert hedged >= 1
    assert elapsed < 5.0, f"a hop waited out the {5.0}s timeout ({elapsed:.1f}s)"
    assert all("silent" not in r.route for r in results)  # every hop it got was answered by another
    assert driver.router.latency("silent") >= 0.05  # it learned how slow the straggler is


class CutOnce(Stragglers):
    """``silent`` never answers in time; ``flaky``'s first stage-0 forward fails the way a stream
    cut on a loaded host does (an unsigned, truncated frame: availability, not integrity)."""

    def __init__(self):
        super().__init__(["silent", "flaky"])
        self.cut = False

    async def forward(self, worker, stage, step, micro_batch, x, targets, mode, timeout):
        if stage == 0 and worker == "flaky" and not self.cut:
            self.cut = True
            self.calls.append(worker)
            raise HopError("stream cut", "truncated", integrity=False)
        return await super().forward(worker, stage, step, micro_batch, x, targets, mode, timeout)


def test_a_backup_that_fails_once_is_retried_instead_of_waiting_out_the_silent_replica() -> None:
    """Two replicas, one silent: when the only backup fails once (whether it failed first as the
    chosen replica or later as the hedge), the hop goes back to it after its back-off instead of
    waiting the whole timeout on the silent one (BENCHMARKS.md, "Faults")."""
    for mb_count in (1, 3):  # alone, and with concurrent micro-batches racing for the same replicas
        transport = CutOnce()
        driver = _hedging_driver(transport, hedge=True)
        gen = torch.Generator().manual_seed(mb_count)

        async def go(transport=transport, driver=driver, gen=gen, n=mb_count):
            t0 = asyncio.get_running_loop().time()
            results = await asyncio.gather(*(driver.train_micro_batch(0, mb, torch.randn(HIDDEN, generator=gen),
                                                                      None) for mb in range(n)))
            return results, asyncio.get_running_loop().time() - t0

        results, elapsed = asyncio.run(go())
        assert transport.cut, "the flaky replica was never cut: the drill tested nothing"
        assert all(r.completed for r in results)
        assert all(r.route[0] == "flaky" for r in results)
        assert driver.hop_failures.get("truncated") == 1 and "timeout" not in driver.hop_failures, driver.hop_failures
        assert elapsed < 4.0, f"a hop waited out the 5 s timeout ({elapsed:.1f}s)"


class LateReplica(Stragglers):
    """Stage 0 is known as ``silent`` alone until ``late`` is discovered ``after`` seconds in (the
    verifier's view of the swarm refreshes on a heartbeat)."""

    def __init__(self, after: float = 0.3):
        super().__init__(["silent"])
        self.after = after
        self.t0: float | None = None

    def replicas(self, stage: int) -> list[str]:
        if stage != 0:
            return super().replicas(stage)
        now = asyncio.get_running_loop().time()
        self.t0 = now if self.t0 is None else self.t0
        return ["silent", "late"] if now - self.t0 >= self.after else ["silent"]


def test_a_replica_discovered_while_a_hop_waits_can_take_it_over() -> None:
    transport = LateReplica()
    driver = _hedging_driver(transport, hedge=True)

    async def go():
        t0 = asyncio.get_running_loop().time()
        r = await driver.train_micro_batch(0, 0, torch.randn(HIDDEN), None)
        return r, asyncio.get_running_loop().time() - t0

    result, elapsed = asyncio.run(go())
    assert result.completed and result.route[0] == "late" and result.hedged == 1, result
    assert elapsed < 4.0, f"the hop waited out the 5 s timeout on the silent replica ({elapsed:.1f}s)"


def test_without_hedging_the_slow_replica_is_awaited() -> None:
    transport = Stragglers(["slow"], delay=0.2)
    results = []
    for hedge in (False, True):  # one replica: nothing to hedge on either way
        driver = _hedging_driver(transport, hedge=hedge)
        results.append(asyncio.run(driver.train_micro_batch(0, 0, torch.randn(HIDDEN), None)))
    assert all(r.completed and r.hedged == 0 and r.route[0] == "slow" for r in results)


PUSH = torch.randn(16, generator=torch.Generator().manual_seed(4))


class Pushers(Arithmetic):
    """Stage 0's ``pusher*`` workers add ``0.2 * rms`` along one fixed direction to every
    output: the white-box attacker's move, which the (scripted) fences pass."""

    async def forward(self, worker, stage, step, micro_batch, x, targets, mode, timeout):
        hop = await super().forward(worker, stage, step, micro_batch, x, targets, mode, timeout)
        if stage == 0 and worker.startswith("pusher"):
            y = hop.tensor
            return HopResult(y + 0.2 * y.pow(2).mean().sqrt() * PUSH)
        return hop


def _drive_spot(stage0: list[str], router: Router | None = None, spot_check: float = 1.0,
                micro_batches: int = 24, per_step: int = 4,
                ) -> tuple[StrikeLedger, list[FlagEvent], PipelineDriver, list]:
    ledger = StrikeLedger(strike_limit=3, forgive_after=100)
    events: list[FlagEvent] = []
    driver = PipelineDriver(2, Pushers(stage0), router=router, screener=Scripted(set()), ledger=ledger,
                            is_banned=ledger.is_banned,
                            config=DriverConfig(poll_s=0.0, wait_for_replica_s=0.0, spot_check=spot_check,
                                                spot_seed=0),
                            on_flag=events.append, hidden_shape=HIDDEN)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(HIDDEN, generator=gen) for _ in range(micro_batches)]

    async def run():  # in flight together, so the router spreads them over the replicas
        return await asyncio.gather(*(driver.train_micro_batch(i // per_step, i, x, torch.zeros(2, 8))
                                      for i, x in enumerate(inputs)))

    seen = list(zip(inputs, asyncio.run(run()), strict=True))
    assert all(r.completed for _, r in seen)
    return ledger, events, driver, seen


def test_a_spot_check_catches_a_push_the_fences_pass_and_replaces_its_tensor() -> None:
    """Every fence passes the pusher; spot checks (here on every hop) compare it with two other
    replicas' answers to the same input, strike it, and pass on the checker's answer."""
    ledger, events, driver, seen = _drive_spot(["pusher", "honest-b", "honest-c", "honest-d"])
    assert ledger.is_banned("pusher")
    struck = [e for e in events if e.struck]
    assert struck and all(e.worker == "pusher" and e.reasons == ("spot",) for e in struck)
    assert all(e.meta["spot_distance"] >= e.meta["spot_tolerance"] for e in struck)
    assert all(set(e.meta["checked_by"]) <= {"honest-b", "honest-c", "honest-d"} for e in struck)
    assert driver.spot_struck == len(struck) and driver.spot_checks >= len(seen)
    assert not any(ledger.state(w).strikes for w in ("honest-b", "honest-c", "honest-d"))
    # what went on to the loss stage was an honest answer, never the push: the route says who
    assert all(r.route[0] != "pusher" for _, r in seen)
    # at most one strike per pipeline step; the other caught hops of that step are replaced all the same
    assert len({e.step for e in struck}) == len(struck)


def test_one_spot_strike_per_worker_and_step() -> None:
    """Twenty-four caught hops in a single step: every one replaced, one strike (a replica one
    optimizer step away from its stage must not be banned for one moment of divergence)."""
    ledger, events, driver, seen = _drive_spot(["pusher", "honest-b", "honest-c", "honest-d"], per_step=24)
    mine = [e for e in events if e.worker == "pusher"]
    assert len(mine) > 1 and sum(e.struck for e in mine) == 1 and driver.spot_struck == 1
    assert ledger.state("pusher").strikes == 1 and not ledger.is_banned("pusher")
    assert all(r.route[0] != "pusher" for _, r in seen)


class CheckerFirst(Router):
    """Serves with ``honest-a`` and asks ``pusher`` first for every check: a lying checker."""

    ORDER = ("honest-a", "pusher", "honest-c", "last")

    def pick(self, candidates, exclude=()):
        ready = [c for c in candidates if c not in set(exclude) and self.available(c)]
        return min(ready, key=self.ORDER.index) if ready else None


def test_a_lying_checker_cannot_get_an_honest_worker_struck() -> None:
    """The first checker disagrees every time (it pushes); the second agrees with the worker, so
    each check is inconclusive: nobody is struck, the honest answer stands."""
    ledger, events, driver, seen = _drive_spot(["honest-a", "pusher", "honest-c"], router=CheckerFirst())
    assert driver.spot_inconclusive > 0 and driver.spot_struck == 0
    assert not any(e.struck for e in events)
    assert ledger.banned() == [] and ledger.state("honest-a").strikes == 0
    assert all(r.route[0] == "honest-a" for _, r in seen)


def test_spot_checks_are_off_by_default_and_cost_nothing_then() -> None:
    _, _, driver, _ = _drive_spot(["pusher", "honest-b", "honest-c"], spot_check=0.0, micro_batches=6)
    assert driver.spot_checks == driver.spot_hops == 0


def test_spot_check_rate_and_follow_up() -> None:
    """At a 25 % rate honest replicas are checked on about a quarter of their hops; a pusher,
    once a checker disagrees, on every one of its next ``spot_follow_up`` hops."""
    ledger, events, driver, _ = _drive_spot(["honest-a", "honest-b", "honest-c"], spot_check=0.25,
                                            micro_batches=80)
    hops = 80  # stage 0's forwards (the loss stage has no other replica to check it; stage 0 sends no gradient)
    assert 0.12 * hops < driver.spot_checks < 0.4 * hops
    assert driver.spot_struck == 0 and not events
    ledger, events, driver, _ = _drive_spot(["pusher", "honest-b", "honest-c"], spot_check=0.1,
                                            micro_batches=160)
    assert ledger.is_banned("pusher")
    struck = [e for e in events if e.struck]
    assert len(struck) >= 3 and all(e.worker == "pusher" for e in struck)
    assert driver.spot_checks < 0.1 * 160 + 3 * driver.config.spot_follow_up


class Lockstep(Arithmetic):
    """Identical replicas (lockstep): every answer signs version 3 and one parameter digest;
    ``nudger`` adds a 1e-6 relative push (far inside any statistical tolerance) and signs the
    stage's digest; ``stray`` signs another digest (it diverged and has not re-synced yet)."""

    async def forward(self, worker, stage, step, micro_batch, x, targets, mode, timeout):
        await asyncio.sleep(0.001)
        if stage == 1:
            return HopResult(x.pow(2).mean())
        y = x @ W
        if worker.startswith("nudger"):  # nudgers push alike, as a deterministic attack does
            y = y + 1e-6 * y.pow(2).mean().sqrt() * PUSH
        digest = "other" if worker == "stray" else "stage"
        return HopResult(y, {"sender": worker, "version": 3, "params_digest": digest, "device": "cpu"})


def _drive_exact(stage0: list[str], flag: frozenset[str] = frozenset(), spot_check: float = 1.0,
                 ) -> tuple[StrikeLedger, list[FlagEvent], PipelineDriver]:
    ledger = StrikeLedger(strike_limit=3, forgive_after=100)
    events: list[FlagEvent] = []
    driver = PipelineDriver(2, Lockstep(stage0), screener=Scripted(set(flag)), ledger=ledger,
                            is_banned=ledger.is_banned,
                            config=DriverConfig(poll_s=0.0, wait_for_replica_s=0.0, spot_check=spot_check,
                                                spot_seed=0),
                            on_flag=events.append, hidden_shape=HIDDEN)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(HIDDEN, generator=gen) for _ in range(24)]

    async def run():
        return await asyncio.gather(*(driver.train_micro_batch(i // 4, i, x, torch.zeros(2, 8))
                                      for i, x in enumerate(inputs)))

    assert all(r.completed for r in asyncio.run(run()))
    return ledger, events, driver


def test_replicas_at_one_version_and_digest_are_compared_exactly() -> None:
    """A 1e-6 push that no fence or statistical tolerance sees is a disagreement between
    identical replicas: struck and banned, the honest ones never; the evidence says exact."""
    ledger, events, driver = _drive_exact(["nudger", "honest-b", "honest-c", "honest-d"])
    assert ledger.is_banned("nudger")
    struck = [e for e in events if e.struck]
    assert struck and all(e.worker == "nudger" and e.meta["spot_exact"] for e in struck)
    assert all(e.meta["spot_tolerance"] == 0.0 and 0 < e.meta["spot_distance"] < 1e-5 for e in struck)
    assert all(set(e.meta["checked_by"]) >= {"honest-b", "honest-c", "honest-d"} for e in struck)  # a majority
    assert not any(ledger.state(w).strikes for w in ("honest-b", "honest-c", "honest-d"))


def test_an_exact_disagreement_without_a_stage_majority_strikes_nobody() -> None:
    """Two replicas, one answer each: nothing shows which of them computed wrong."""
    ledger, events, driver = _drive_exact(["nudger", "honest-b"])
    assert driver.spot_inconclusive > 0 and driver.spot_struck == 0 and ledger.banned() == []


def test_answers_under_another_digest_are_not_compared() -> None:
    """A replica that signs another digest at the same version has diverged: its answers and
    the others' are never compared (inconclusive), so nobody is struck for it; the stage re-syncs it."""
    ledger, events, driver = _drive_exact(["stray", "honest-b", "honest-c"])
    assert driver.spot_unmatched > 0 and driver.spot_struck == 0
    assert not any(e.struck for e in events) and ledger.banned() == []


def test_a_fence_flag_on_an_identical_replica_is_cleared_exactly() -> None:
    """The fences flag an honest replica on every message (a false positive); its recomputation
    on another replica at the same version gives the same bits, so the flag is cleared, provably."""
    ledger, events, _ = _drive_exact(["honest-a", "honest-b", "honest-c"], flag=frozenset({"honest-a"}),
                                     spot_check=0.0)
    mine = [e for e in events if e.worker == "honest-a"]
    assert mine and all(not e.struck and e.meta.get("cleared_exactly") for e in mine)
    assert ledger.state("honest-a").strikes == 0


def test_a_fence_flag_backed_by_an_exact_disagreement_bans_by_the_stage_majority() -> None:
    ledger, events, _ = _drive_exact(["nudger", "honest-b", "honest-c"], flag=frozenset({"nudger"}), spot_check=0.0)
    assert ledger.is_banned("nudger")
    assert all(e.worker == "nudger" for e in events if e.struck)
    assert not any(ledger.state(w).strikes for w in ("honest-b", "honest-c"))


def test_attackers_answering_alike_cannot_outvote_honest_replicas_the_fences_flagged() -> None:
    """Two of five replicas push alike; the fences (wrongly) flag two honest ones on every hop.
    The majority that settles an exact disagreement is of every unbanned replica of the stage,
    so the two alike answers never make one and no honest replica is struck."""
    stage0 = ["nudger-a", "nudger-b", "honest-c", "honest-d", "honest-e"]
    ledger, events, _ = _drive_exact(stage0, flag=frozenset({"honest-c", "honest-d"}))
    assert not any(e.struck for e in events if e.worker.startswith("honest")), \
        [(e.worker, e.reasons) for e in events if e.struck]
    assert {w for w in stage0 if ledger.is_banned(w)} <= {"nudger-a", "nudger-b"}
