"""The in-process swarm: the paper's scale (16 stages x 8-11 replicas) on one CPU.

A :class:`Simulation` builds ``stages x replicas`` simulated workers (each a
:class:`~sentinel.worker.stage_runner.StageRunner`, the live worker's compute), makes
``floor(malicious_fraction x replicas)`` of every stage malicious (an honest majority per stage),
and trains with one verifier whose :class:`~sentinel.verifier.driver.PipelineDriver`,
:class:`~sentinel.verifier.screen.Screener`, :class:`~sentinel.verifier.strikes.StrikeLedger`
and :class:`~sentinel.verifier.routing.Router` are the live verifier's, talking to the workers
through :class:`~sentinel.sim.transport.InProcessTransport` instead of P2P streams.

What is simulated, and why it does not change the answer:

* one verifier, i.e. a committee of one: its ledger's ban is the swarm's ban. The committee's
  quorum only decides *whether* honest members agree; with a single honest verifier they do.
* hop latencies are simulated (seeded per worker and per call) so routing, and therefore the
  whole run, is a deterministic function of the seed; the compute itself is real.
* the validation loss is that of the *consensus model*: for every stage the aggregate of its
  non-banned replicas' parameters (what the next averaging round produces), evaluated without
  any attack. It measures what the attack did to the model, not what an attacker would answer
  to an evaluation query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import platform
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from sentinel.attacks.base import Attack
from sentinel.attacks.loader import PluginAttack, default_directions, load_attack
from sentinel.model.config import ModelConfig
from sentinel.model.corpus import load_corpus
from sentinel.protocol.aggregation import aggregate, contribution_outliers
from sentinel.report import detection_scores
from sentinel.run.manifest import OptimizerConfig, RunManifest, TrainingConfig
from sentinel.run.screening import ScreeningConfig
from sentinel.sim.transport import (
    ContributionChecks,
    DuplicateScreen,
    InProcessTransport,
    LatencyModel,
    SimRouter,
    SimWorker,
    stage_forward_flops_per_token,
)
from sentinel.verifier.driver import DriverConfig, FlagEvent, PipelineDriver
from sentinel.verifier.routing import RouterConfig
from sentinel.verifier.screen import Screener
from sentinel.verifier.strikes import StrikeLedger, majority_allows_ban
from sentinel.worker.stage_runner import StageRunner

__all__ = ["DEFENSES", "MODEL_SIZES", "SYNC_MODES", "SimConfig", "Simulation", "malicious_slots",
           "run_simulation"]

DEFENSES = ("sentinel", "none", "duplicate")
SYNC_MODES = ("lockstep", "async")

#: Model presets (``n_layers`` defaults to one layer per stage). ``tiny`` is what the detection
#: table runs (16 x 8, 8 micro-batches of 8 x 32 tokens per step): small enough for the paper's
#: scale on one core, where per-op overhead dominates (BENCHMARKS.md, "Frontier sweep run time").
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 32, "n_heads": 4, "d_ff": 88, "seq_len": 32},
    "small": {"d_model": 64, "n_heads": 4, "d_ff": 172, "seq_len": 64},
    "base": {"d_model": 128, "n_heads": 4, "d_ff": 344, "seq_len": 64},
    "medium": {"d_model": 512, "n_heads": 8, "d_ff": 1376, "seq_len": 64},
}



@dataclass
class SimConfig:
    """One simulated run. Defaults: the paper's 16 x 8 swarm, 37.5 % malicious, a tiny model."""

    #: Pipeline depth and workers per stage (16 x 8 = 128 workers, the paper's scale).
    stages: int = 16
    replicas: int = 8
    #: ``floor(fraction x replicas)`` attackers in every stage; must leave an honest majority
    #: (below one half), e.g. 3 of 8 = 37.5 %, 4 of 11 = 36.4 %.
    malicious_fraction: float = 0.375
    #: Keep stages 0 and S-1 honest (the paper's assumption); off because Sentinel screens the
    #: first and last stages like every other.
    spare_ends: bool = False
    #: An attack spec (``sign_flip``, ``scaling,factor=10``, ``file.py:Class``), ``none`` for a
    #: clean run; ``direction`` is ``forward``, ``backward``, ``both`` or None (forward for a
    #: built-in attack, the directions whose methods a plugin defines).
    attack: str = "sign_flip"
    direction: str | None = "forward"
    #: Attackers are honest before this step; detection latency counts from here.
    attack_start: int = 0
    #: ``sentinel`` (the screening core), ``none`` (accept everything) or ``duplicate`` (Lu et
    #: al.: every hop recomputed by another replica and compared, within ``duplicate_rtol`` for
    #: float noise); ``screening`` holds :class:`~sentinel.run.screening.ScreeningConfig` overrides.
    defense: str = "sentinel"
    screening: dict[str, Any] = field(default_factory=dict)
    duplicate_rtol: float = 1e-4
    #: ``steps`` x ``micro_batches_per_step`` micro-batches of ``micro_batch_size`` sequences; the
    #: micro-batches of a step are in flight together, so the router spreads them.
    steps: int = 200
    micro_batches_per_step: int = 8
    micro_batch_size: int = 8
    #: A :data:`MODEL_SIZES` preset; ``layers`` 0 means one layer per stage.
    model_size: str = "tiny"
    layers: int = 0
    #: The run manifest's defaults, so the simulator trains the way the live swarm does:
    #: ``warmup_steps`` counts each replica's own optimizer steps (``sentinel-swarm`` uses 40),
    #: ``average_every`` optimizer steps between averaging rounds by the ``averaging`` rule.
    lr: float = OptimizerConfig.lr
    warmup_steps: int = OptimizerConfig.warmup_steps
    average_every: int = TrainingConfig.average_every
    averaging: str = TrainingConfig.averaging
    #: ``lockstep`` (the manifest's default, as the live swarm): a stage's replicas accumulate
    #: gradients over the step, aggregate them with ``averaging`` and apply the same optimizer
    #: update, so honest replicas stay bit-identical (docs/design.md, "Lockstep stages");
    #: ``async``, the baseline: each replica steps its own optimizer per micro-batch and averages
    #: parameters every ``average_every`` steps.
    sync: str = TrainingConfig.sync
    #: Validation of the consensus model (see the module docstring).
    eval_every: int = 25
    eval_batches: int = 16
    #: Corpus path, or None for the generated default corpus.
    data: str | None = None
    #: Seeds everything: init, data order, attackers' placement and noise, routing.
    seed: int = 0
    #: Seeds only the simulated hop latencies (None: ``seed``). It keeps the init and the data
    #: order and changes which replica computes which micro-batch: the run-to-run noise of a
    #: live swarm, whose data order is fixed too (BENCHMARKS.md, "Live screening test").
    routing_seed: int | None = None
    #: Torch intra-op threads; tiny tensors run fastest on one.
    threads: int = 1
    second_witness: bool = False  # DriverConfig.second_witness: tie-break disputed confirmations
    #: DriverConfig.spot_check: share of accepted hops recomputed elsewhere. None: the screening
    #: default (``ScreeningConfig.spot_check``) in lockstep, none in async; 0 turns checks off.
    spot_check: float | None = None

    def __post_init__(self) -> None:
        if self.defense not in DEFENSES:
            raise ValueError(f"defense must be one of {', '.join(DEFENSES)}; got {self.defense!r}")
        if self.direction not in ("forward", "backward", "both", None):
            raise ValueError(f"direction must be forward, backward, both or None; got {self.direction!r}")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}; got {self.sync!r}")
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {', '.join(MODEL_SIZES)}; got {self.model_size!r}")
        for name in ("stages", "replicas", "steps", "micro_batches_per_step", "micro_batch_size", "eval_every",
                     "eval_batches", "average_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.malicious_fraction < 1.0:
            raise ValueError(f"malicious_fraction must be in [0, 1); got {self.malicious_fraction}")
        # the manifest's own checks (lr, warm-up): fail here, not when the simulation builds it
        RunManifest(optimizer=OptimizerConfig(lr=self.lr, warmup_steps=self.warmup_steps))
        if self.routing_seed is not None and (isinstance(self.routing_seed, bool) or self.routing_seed < 0):
            raise ValueError(f"routing_seed must be None or an integer >= 0; got {self.routing_seed!r}")
        if self.attack_start < 0:
            raise ValueError(f"attack_start must be >= 0; got {self.attack_start}")
        if self.spot_check is not None and not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"spot_check must be in [0, 1]; got {self.spot_check}")
        per_stage = self.malicious_per_stage
        if per_stage and 2 * per_stage >= self.replicas:
            raise ValueError(
                f"malicious_fraction {self.malicious_fraction} gives {per_stage} of {self.replicas} replicas per "
                "stage: that is no honest majority; use a fraction below one half")
        ScreeningConfig.from_dict(self.screening)  # fail early on a typo in the overrides

    @property
    def malicious_per_stage(self) -> int:
        if self.attack in ("", "none"):
            return 0
        return int(math.floor(self.malicious_fraction * self.replicas + 1e-9))

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=self.layers or self.stages, **MODEL_SIZES[self.model_size])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def malicious_slots(cfg: SimConfig) -> set[tuple[int, int]]:
    """(stage, replica) of every attacker: ``malicious_per_stage`` seeded picks in each stage."""
    k = cfg.malicious_per_stage
    slots: set[tuple[int, int]] = set()
    for s in range(cfg.stages):
        if k == 0 or (cfg.spare_ends and s in (0, cfg.stages - 1)):
            continue
        rng = random.Random(f"sentinel-sim|malicious|{cfg.seed}|{s}")
        slots.update((s, r) for r in rng.sample(range(cfg.replicas), k))
    return slots


def worker_name(stage: int, replica: int) -> str:
    return f"s{stage:02d}r{replica:02d}"


class Simulation:
    """Builds the swarm of a :class:`SimConfig`, trains it, and reports (see module docstring)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.corpus = load_corpus(cfg.data)
        model = cfg.model_config()
        self.manifest = RunManifest(
            run_id="sim",
            num_stages=cfg.stages,
            model=model,
            optimizer=OptimizerConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps),
            training=TrainingConfig(micro_batch_size=cfg.micro_batch_size,
                                    micro_batches_per_step=cfg.micro_batches_per_step, accumulate=1,
                                    average_every=cfg.average_every, averaging=cfg.averaging,
                                    eval_batches=cfg.eval_batches, eval_every=cfg.eval_every),
            screening=ScreeningConfig.from_dict(cfg.screening),
            committee_size=1,
            seed=cfg.seed,
        )
        self.screen_config = self.manifest.screening
        bad = malicious_slots(cfg)
        self.workers: dict[str, SimWorker] = {}
        self.attack: Any | None = None
        if bad:
            self.attack = load_attack(cfg.attack, directions=cfg.direction if cfg.direction is not None
                                      else default_directions(cfg.attack))
            if cfg.direction is None:  # the report names what was attacked
                self.cfg = cfg = dataclasses.replace(cfg, direction=self.attack.directions)
            target = getattr(self.attack, "inner", self.attack)  # PluginAttack around a plain plugin
            for a in {id(self.attack): self.attack, id(target): target}.values():
                if isinstance(a, (Attack, PluginAttack)) and a.start_step == 0:
                    a.start_step = cfg.attack_start  # ramps and the like count from the attack start
        for s in range(cfg.stages):
            for r in range(cfg.replicas):
                runner = StageRunner(self.manifest, s)
                name = worker_name(s, r)
                self.workers[name] = SimWorker(name, s, runner, self.attack if (s, r) in bad else None,
                                               stage_forward_flops_per_token(runner))
        self.malicious = {n for n, w in self.workers.items() if w.malicious}
        # A backward-only attacker on stage 0 sends nothing it could corrupt (token ids have no
        # gradient): it is inert and is not scored as an attacker to be found.
        self.active_malicious = {n for n in self.malicious
                                 if not (cfg.direction == "backward" and self.workers[n].stage == 0)}

        self.ledger = StrikeLedger(self.screen_config.strike_limit, self.screen_config.forgive_after,
                                   may_ban=self._may_ban)
        defended = cfg.defense != "none"
        self.transport = InProcessTransport(self.workers, self.manifest, is_banned=self._is_banned,
                                            attack_start=cfg.attack_start, seed=cfg.seed,
                                            duplicate=cfg.defense == "duplicate", lockstep=cfg.sync == "lockstep")
        if cfg.defense == "sentinel":
            self.screener: Any = Screener(self.screen_config, cfg.stages)
        elif cfg.defense == "duplicate":
            self.screener = DuplicateScreen(self.transport, lambda w: w in self.malicious, self._is_banned,
                                            seed=cfg.seed, rtol=cfg.duplicate_rtol)
        else:
            self.screener = None
        # what a white-box attacker reads: the verifier's own decision; undefended nothing is
        # ever flagged; against duplication any change is caught, so it has no fence to ride
        if cfg.defense == "sentinel":
            self.transport.oracle = self.screener.would_flag
        elif cfg.defense == "none":
            self.transport.oracle = lambda *args: False
        else:
            self.transport.oracle = lambda *args: None
        self._now = 0.0
        self.router = SimRouter(RouterConfig(), clock=lambda: self._now, salt=f"sim-{cfg.seed}",
                                latency_of=LatencyModel(cfg.seed if cfg.routing_seed is None else cfg.routing_seed))
        self.driver = PipelineDriver(
            cfg.stages, self.transport, self.router, self.screener, self.ledger if defended else None,
            is_banned=self._is_banned,
            config=DriverConfig(max_hop_attempts=4 * cfg.replicas + 4, wait_for_replica_s=0.0, poll_s=0.0,
                                second_witness=cfg.second_witness,
                                spot_check=self._spot_share() if cfg.defense == "sentinel" else 0.0,
                                spot_seed=cfg.seed),
            on_flag=self._on_flag,
            hidden_shape=model.hidden_shape(cfg.micro_batch_size),
        )
        self.banned_at: dict[str, int] = {}
        self.step = 0
        self.flags_by_boundary: dict[str, int] = defaultdict(int)
        self.flags_by_worker: dict[str, int] = defaultdict(int)
        self._struck_version: dict[str, int] = {}  # optimizer step of each worker's last averaging strike
        self.averaging_flags = {"honest": 0, "attacked": 0}
        if cfg.defense == "sentinel" and cfg.sync == "lockstep":
            sc = self.screen_config
            self.transport.contribution_checks = ContributionChecks(
                ratio=sc.averaging_outlier_ratio, floor=sc.averaging_outlier_floor, on_proven=self._contribution_proven)
        elif cfg.defense == "sentinel" and self.screen_config.averaging_outlier_ratio > 0:
            self.transport.contribution_screen = self._screen_contributions
        self.flagged_attacked = 0
        self.flagged_honest = 0
        self.retroactive_flags = 0
        self.struck_honest = 0  # flags on honest messages that became strikes (confirmed)
        self.train_loss: list[tuple[int, float]] = []
        self.val_loss: list[tuple[int, float]] = []
        self.micro_batches = {"total": 0, "completed": 0, "failed": 0, "retried_hops": 0, "substituted": 0,
                              "tainted": 0}
        self.errors: list[str] = []
        self.train_seconds = 0.0
        self.tokens = 0
        self._val = self.corpus.val_batches(cfg.micro_batch_size, model.seq_len, cfg.eval_batches)
        self._eval_runners = [StageRunner(self.manifest, s) for s in range(cfg.stages)]

    # -- verifier-side bookkeeping ---------------------------------------------------------------
    def _is_banned(self, worker: str) -> bool:
        return self.cfg.defense != "none" and self.ledger.is_banned(worker)

    def _may_ban(self, worker: str) -> bool:
        """The live verifier's honest-majority bound (``strikes.majority_allows_ban``)."""
        stage = self.workers[worker].stage
        banned = sum(1 for r in range(self.cfg.replicas) if self.ledger.is_banned(worker_name(stage, r)))
        return majority_allows_ban(self.cfg.replicas, banned)

    def _spot_share(self) -> float:
        """The spot-check share: the run's, else the screening default for identical (lockstep)
        replicas and none for asynchronous ones, whose honest answers differ."""
        if self.cfg.spot_check is not None:
            return self.cfg.spot_check
        return self.screen_config.spot_check if self.cfg.sync == "lockstep" else 0.0

    def _on_flag(self, ev: FlagEvent) -> None:
        self.flags_by_boundary[f"stage{ev.stage}/{ev.direction}"] += 1
        self.flags_by_worker[ev.worker] += 1
        if ev.meta.get("retroactive"):
            self.retroactive_flags += 1
            return
        sent = self.transport.latest.get((ev.stage, ev.direction, ev.worker))
        if sent is not None and sent.attacked:
            self.flagged_attacked += 1
        else:
            self.flagged_honest += 1
            self.struck_honest += ev.struck

    def _contribution_proven(self, worker: str, step: int) -> None:
        """A lockstep contribution that a strict majority of its stage recomputed differently:
        proof, so one strike bans (the honest-majority hold still applies)."""
        w = self.workers[worker]
        self.averaging_flags["attacked" if w.malicious and step >= self.cfg.attack_start else "honest"] += 1
        self.flags_by_worker[worker] += 1
        self.ledger.record(worker, True, proven=True)

    def _screen_contributions(self, stage: int, step: int, names: list[str], vectors: list[torch.Tensor]) -> None:
        """The verifier's view of one averaging round: a replica whose contribution is an
        outlier gets a strike through the same ledger as pipeline flags (one ban path, two kinds
        of evidence). The averaging worker's own vector is not sent to anyone: only peers are judged.
        Clean contributions forgive nothing (forgiveness counts pipeline messages). One parameter
        state is one piece of evidence however many peers' rounds saw it: a worker is struck at
        most once per optimizer step (the live verifiers key complaints the same way)."""
        cfg = self.screen_config
        flags = contribution_outliers(vectors, cfg.averaging_outlier_ratio, cfg.averaging_outlier_floor)
        for name, flagged in zip(names[1:], flags[1:], strict=True):
            if not flagged:
                continue
            w = self.workers[name]
            self.averaging_flags["attacked" if w.malicious and step >= self.cfg.attack_start else "honest"] += 1
            self.flags_by_worker[name] += 1
            if self._struck_version.get(name) != w.runner.version:
                self._struck_version[name] = w.runner.version
                self.ledger.record(name, True)

    def _strike_retroactive(self) -> None:
        """Count what a boundary found when its calibration ended (those tensors were already used)."""
        take = getattr(self.screener, "take_retroactive", None)
        if take is None or self.cfg.defense == "none":
            return
        for stage, direction, worker, verdict in take():
            # unconfirmable, so never a strike (see PipelineDriver._strike_retroactive)
            self._on_flag(FlagEvent(self.step, -1, stage, direction, worker, tuple(verdict.reasons), False, verdict,
                                    {"retroactive": True}))

    def _note_bans(self) -> None:
        for w in self.ledger.banned():
            self.banned_at.setdefault(w, self.step)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss of the consensus model (see module docstring)."""
        for s, runner in enumerate(self._eval_runners):
            replicas = [w for w in self.workers.values() if w.stage == s]
            live = [w.runner.flat_parameters() for w in replicas if not self._is_banned(w.name)] or \
                [w.runner.flat_parameters() for w in replicas]  # a stage banned out entirely: keep its last state
            runner.load_flat_parameters(aggregate(live, self.manifest.training.averaging))
        losses = []
        for x, y in self._val:
            h = x
            for runner in self._eval_runners:
                h = runner.evaluate(h, y)
            losses.append(float(h))
        val = sum(losses) / len(losses)
        self.val_loss.append((self.step, val))
        return val

    # -- training ------------------------------------------------------------------------------
    async def _train(self, progress: Any | None) -> None:
        cfg = self.cfg
        T = self.manifest.model.seq_len
        self.evaluate()
        for step in range(1, cfg.steps + 1):
            self.step = step
            self._now = float(step)
            batches = [self.corpus.batch("train", cfg.micro_batch_size, T, seed=cfg.seed,
                                         index=step * cfg.micro_batches_per_step + mb)
                       for mb in range(cfg.micro_batches_per_step)]
            t0 = time.perf_counter()
            results = await asyncio.gather(*(self.driver.train_micro_batch(step, mb, x, y)
                                             for mb, (x, y) in enumerate(batches)))
            if self.transport.lockstep:
                self.transport.step_boundary(step)
            self.train_seconds += time.perf_counter() - t0
            self._strike_retroactive()
            self._note_bans()
            losses = []
            for r in results:
                mb = self.micro_batches
                mb["total"] += 1
                mb["completed" if r.completed else "failed"] += 1
                mb["retried_hops"] += r.retries
                mb["substituted"] += r.substituted
                mb["tainted"] += r.tainted
                if r.error and len(self.errors) < 20:
                    self.errors.append(f"step {step} mb {r.micro_batch}: {r.error}")
                if r.completed:
                    self.tokens += cfg.micro_batch_size * T
                    loss = self.transport.honest_loss.pop((step, r.micro_batch), None)
                    if loss is not None:
                        losses.append(loss)
            self.transport.honest_loss.clear()
            if losses:
                self.train_loss.append((step, sum(losses) / len(losses)))
            if step % cfg.eval_every == 0 and step != cfg.steps:
                self.evaluate()
            if progress is not None:
                progress(self)
        self.evaluate()

    def run(self, progress: Any | None = None) -> dict[str, Any]:
        """Train for ``cfg.steps`` steps; return the report (see :meth:`report`)."""
        t0 = time.perf_counter()
        asyncio.run(self._train(progress))
        self.wall_seconds = time.perf_counter() - t0
        return self.report()

    # -- report --------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        scores = detection_scores(self.active_malicious, self.banned_at, cfg.attack_start)
        honest = [w for n, w in self.workers.items() if n not in self.malicious]
        attackers = [w for n, w in self.workers.items() if n in self.malicious]
        attacked_msgs = sum(w.attacked_messages for w in attackers)
        all_msgs = sum(w.messages for w in self.workers.values())
        honest_msgs = all_msgs - attacked_msgs
        comp = self.transport.compute
        tokens = max(self.tokens, 1)
        latencies = sorted(max(0, self.banned_at[n] - cfg.attack_start)
                           for n in self.active_malicious if n in self.banned_at)
        flag_rates = self.screener.flag_rates() if self.screener is not None else {}
        screen_seconds = self.driver.screen_seconds
        return {
            "config": cfg.to_dict(),
            "model": self.manifest.model.to_dict(),
            "parameters": sum(r.num_parameters() for r in self._eval_runners),
            "screening_config": self.screen_config.to_dict(),
            "workers": len(self.workers),
            "malicious": sorted(self.malicious),
            "malicious_scored": sorted(self.active_malicious),
            "banned": [{"worker": w, "step": s, "malicious": w in self.malicious}
                       for w, s in sorted(self.banned_at.items(), key=lambda kv: (kv[1], kv[0]))],
            **scores,
            "detection_latency_max_steps": latencies[-1] if latencies else None,
            "detected": len(latencies),
            "steps": self.step,
            "tokens": self.tokens,
            "train_seconds": round(self.train_seconds, 3),
            "wall_seconds": round(getattr(self, "wall_seconds", 0.0), 3),
            "screen_seconds": round(screen_seconds, 3),
            "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else 0.0,
            "flops_per_token": comp.total_flops / tokens,
            "stage_passes_per_token": comp.total_passes / tokens,
            "compute": {"stage_passes": comp.stage_passes, "check_passes": comp.check_passes,
                        "flops": comp.flops, "check_flops": comp.check_flops},
            "train_loss": [[s, _num(v)] for s, v in self.train_loss],
            "val_loss": [[s, _num(v)] for s, v in self.val_loss],
            "val_loss_first": _num(self.val_loss[0][1]) if self.val_loss else None,
            "val_loss_final": _num(self.val_loss[-1][1]) if self.val_loss else None,
            "train_loss_final": _num(self.train_loss[-1][1]) if self.train_loss else None,
            "messages": {"total": all_msgs, "attacked": attacked_msgs, "honest": honest_msgs},
            "flag_rate_honest": self.flagged_honest / honest_msgs if honest_msgs else 0.0,
            "flag_rate_attacked": self.flagged_attacked / attacked_msgs if attacked_msgs else None,
            "flags": {"total": sum(self.flags_by_boundary.values()), "attacked": self.flagged_attacked,
                      "honest": self.flagged_honest, "honest_struck": self.struck_honest,
                      "cleared": self.driver.flags_cleared, "tied": self.driver.flags_tied,
                      "witness_hops": self.driver.witness_hops, "retroactive": self.retroactive_flags,
                      "spot_checks": self.driver.spot_checks, "spot_hops": self.driver.spot_hops,
                      "spot_struck": self.driver.spot_struck, "spot_inconclusive": self.driver.spot_inconclusive,
                      "spot_unmatched": self.driver.spot_unmatched,
                      "by_boundary": dict(sorted(self.flags_by_boundary.items()))},
            "flag_rates": flag_rates,
            "honest_workers_flagged": sorted(n for n in self.flags_by_worker if n not in self.malicious),
            "micro_batches": dict(self.micro_batches),
            "errors": self.errors,
            "averaging_rounds": self.transport.averaging_rounds,
            "resyncs": self.transport.resyncs,
            "averaging": {"rule": self.manifest.training.averaging, "rounds": self.transport.averaging_rounds,
                          "contributions": sum(w.contributions for w in self.workers.values()),
                          "attacked": sum(w.attacked_contributions for w in attackers),
                          "flagged_honest": self.averaging_flags["honest"],
                          "flagged_attacked": self.averaging_flags["attacked"],
                          "checks": dict(self.transport.contribution_stats)},
            "honest_optimizer_steps": sum(w.runner.stats.optimizer_steps for w in honest),
            "code": CODE_VERSION,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
        }


def _code_version() -> str:
    """Commit of the checkout this process imported, with a note if ``sentinel/`` had local edits.

    Taken once, at import: a long table run must be stamped with the code it actually ran, even
    if the checkout moves on while it runs.
    """
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sentinel"], cwd=repo, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+local-edits' if dirty else ''}"


CODE_VERSION = _code_version()


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def run_simulation(cfg: SimConfig, progress: Any | None = None) -> dict[str, Any]:
    """Build and run one simulation; returns its report dict (JSON-able)."""
    return Simulation(cfg).run(progress)
