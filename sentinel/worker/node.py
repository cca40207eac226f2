"""The worker role: claim a stage, serve forward/backward over P2P streams, average with replicas.

A worker trusts nothing it receives: every request is checked (signature, sender == the
authenticated libp2p peer, run id, replay window, dtype/shape from the manifest, finiteness)
before any compute, and only announced verifiers may drive it. A rejected request costs the
sender an error response and the worker one counter increment; nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sentinel import __version__
from sentinel.metrics import METRICS
from sentinel.net.runtime import REPLY_PACE, PeerCallError, SwarmRuntime
from sentinel.net.view import fetch_params, read_stage_claims, version_of
from sentinel.protocol import rpc as wire
from sentinel.protocol.aggregation import (
    AveragingLog,
    aggregate,
    canonical_part,
    contribution_scores,
    partition,
)
from sentinel.protocol.bans import committee_bans
from sentinel.protocol.checks import MessageChecker
from sentinel.protocol.codec import Message
from sentinel.protocol.committee import configured_seats
from sentinel.protocol.errors import MalformedMessageError, ProtocolError, WrongSenderError
from sentinel.protocol.keys import stage_key, verifiers_key
from sentinel.protocol.records import STATES
from sentinel.protocol.signing import sign_message
from sentinel.protocol.stamps import stamped_candidates
from sentinel.run.manifest import RunManifest
from sentinel.worker.butterfly import Butterfly
from sentinel.worker.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sentinel.worker.lockstep import Lockstep
from sentinel.worker.replica import Replica
from sentinel.worker.stage_runner import StageRunner
from sentinel.worker.stage_selection import choose_stage, should_move

logger = logging.getLogger(__name__)

# Parameter drift from the stage average, at one averaging round, worth a warning: well above
# what honest replicas drift between rounds (BENCHMARKS.md, "Clean long run"), and a replica that
# drifts further produces outputs that differ from its replicas', which the verifiers flag.
DRIFT_WARNING = 0.10
# A params request may be dated at most this many pipeline steps ahead of the highest step this
# worker has seen (verifiers and replicas run a step or two apart).
PARAMS_STEPS_AHEAD = 16
# The longest an availability attack holds one reply ("never" included): by then every caller
# has long timed out, and the handler task must end some time.
MAX_HOLD_S = 600.0


class UnknownVerifierError(WrongSenderError):
    reason = "unknown_verifier"


class UnstampedVerifierError(UnknownVerifierError):
    """An announced verifier of an open-mode run whose record lacks a valid candidacy stamp."""

    reason = "unstamped_verifier"


def _throughput_of(claim: dict) -> float:
    """A claim's announced tokens/s; anything but a positive finite number counts as 1 (unmeasured)."""
    t = claim.get("throughput", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        return 1.0
    return float(t)


class WorkerNode:
    """Serves one stage of the run; one thread does all compute so parameters need no locks."""

    def __init__(
        self,
        runtime: SwarmRuntime,
        manifest: RunManifest,
        stage: int | None = None,
        attack: Any | None = None,
        attack_seed: int = 0,
        device: Any = "cpu",
        throughput: float = 1.0,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 50,
    ):
        self.runtime = runtime
        self.device = device
        #: training tokens/s announced in the stage claim (``sentinel.worker.device``); 1.0 = unmeasured
        self.throughput = float(throughput)
        #: where the stage is saved every ``checkpoint_every`` optimizer steps and on shutdown (None = never)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every = int(checkpoint_every)
        self.resumed_from: dict[str, Any] | None = None
        self._saved_version = 0
        self.manifest = manifest
        self.run = manifest.run_id
        self.requested_stage = stage
        self.replica = Replica()  # stage, newest step and runner, shared with the averaging helpers
        self.state = "JOINING"
        self.attack = attack
        self._excluded: set[str] = set()  # banned replicas already reported as left out of averaging
        self.attack_seed = attack_seed
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.checker = MessageChecker(manifest.run_id)
        self.known_verifiers: set[str] = set(manifest.trusted_verifiers)
        self._unstamped_verifiers: set[str] = set()  # announced in open mode without a valid stamp
        self._verifiers_checked_at = 0.0
        self.tokens = 0
        self.started_at = time.time()
        self._averaging_task: asyncio.Task | None = None
        self._complaints: set[asyncio.Task] = set()
        self._last_averaged_version = 0
        self.averaging_log = AveragingLog()
        # the contribution screen (``ScreeningConfig.averaging_outlier_*``) this worker applies to
        # its replicas' contributions before complaining to the verifiers
        self.screen_config = manifest.screening
        self._anchor: torch.Tensor | None = None  # the aggregate this worker loaded at its last round
        # partitioned rounds (TrainingConfig.averaging_partition)
        self.butterfly = Butterfly(
            runtime=runtime, checker=self.checker, run=self.run, training=manifest.training,
            screen_config=self.screen_config, replica=self.replica, run_blocking=self._in_thread,
            contribution=self.poison_contribution, replicas=self.stage_replicas, banned=self.banned_peers,
            complain=self.complain_later, report_lie=self.report_reduction)
        # lockstep stages (TrainingConfig.sync): replicas apply one agreed gradient per version
        self.lockstep = Lockstep(
            runtime=runtime, checker=self.checker, manifest=manifest, replica=self.replica,
            run_blocking=self._in_thread, replicas=self._live_replicas, claimants=self.stage_replicas,
            contribution=self.poison_gradient, is_verifier=self._is_verifier,
            report=self._report_later) if manifest.training.sync == "lockstep" else None

    @property
    def stage(self) -> int:
        """The stage this worker serves (-1 before it has chosen one)."""
        return self.replica.stage

    @stage.setter
    def stage(self, value: int) -> None:
        self.replica.stage = value

    @property
    def max_step(self) -> int:
        """The highest pipeline step seen in a request: it dates this worker's signed replies."""
        return self.replica.step

    @max_step.setter
    def max_step(self, value: int) -> None:
        self.replica.step = value

    @property
    def runner(self) -> StageRunner | None:
        return self.replica.runner

    @runner.setter
    def runner(self, value: StageRunner | None) -> None:
        self.replica.runner = value

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        S = self.manifest.num_stages
        if self.requested_stage is not None:
            if not 0 <= self.requested_stage < S:
                raise ValueError(f"--stage {self.requested_stage} out of range: this run has {S} stages (0..{S - 1})")
            self.stage = self.requested_stage
        else:
            saved = {s: p for s, p in (find_checkpoints(self.checkpoint_dir, self.run) if self.checkpoint_dir
                                       else {}).items() if 0 <= s < S}
            if saved:  # a restarted volunteer goes back to the stage it saved
                self.stage = max(saved, key=lambda s: saved[s].stat().st_mtime)
            else:
                claims = await read_stage_claims(self.runtime, self.run, S)
                live = {s: {p: _throughput_of(v) for p, v in c.items() if v.get("state") != "OFFLINE"}
                        for s, c in claims.items()}
                self.stage = choose_stage(S, live, self.runtime.peer_id)
        self.runner = await self._in_thread(StageRunner, self.manifest, self.stage, 64, self.device)
        self.runtime.announce(stage_key(self.run, self.stage), self._claim)
        await self.runtime.announce_now()
        await self._resume_from_checkpoint()
        await self._join_from_replica()
        for name, handler in self.handlers().items():
            await self.runtime.serve(name, handler)
        self.state = "ONLINE"
        await self.runtime.announce_now()
        logger.info("worker %s serving stage %d", self.runtime.peer_id[-8:], self.stage)

    async def shutdown(self) -> None:
        self.state = "OFFLINE"
        if self._averaging_task is not None:
            self._averaging_task.cancel()
        for task in list(self._complaints):
            task.cancel()
        if self.checkpoint_dir is not None and self.runner is not None and self.runner.version > self._saved_version:
            with contextlib.suppress(Exception):  # best effort: the periodic checkpoint is the guarantee
                await asyncio.wait_for(self._in_thread(self._save_checkpoint), timeout=30)
        final = {stage_key(self.run, self.stage): self._claim()} if self.stage >= 0 else None
        await self.runtime.shutdown(final_records=final)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _claim(self) -> dict[str, Any]:
        runner = self.runner
        return self.runtime.record_value(
            "stage_claim", stage_key(self.run, self.stage), self.run,
            stage=self.stage, state=self.state, throughput=self.throughput, step=int(self.max_step),
            version=__version__, optimizer_steps=runner.version if runner else 0,
        )

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def rebalance_once(self) -> bool:
        """Move to a starved stage if this stage is over-served (Petals-style). True if moved."""
        S = self.manifest.num_stages
        claims = await read_stage_claims(self.runtime, self.run, S)
        live = {s: {p: 1.0 for p, v in c.items() if v.get("state") == "ONLINE"} for s, c in claims.items()}
        target = should_move(S, live, self.runtime.peer_id, self.stage)
        if target is None:
            return False
        logger.info("stage %d over-served, moving to starved stage %d", self.stage, target)
        old = self.stage
        self.runtime.stop_announcing(stage_key(self.run, old))
        self.state = "JOINING"
        await self.runtime.store(stage_key(self.run, old), self.runtime.record_value(
            "stage_claim", stage_key(self.run, old), self.run, stage=old, state="OFFLINE",
            throughput=0.0, step=int(self.max_step), version=__version__))
        self.stage = target
        if self.lockstep is not None:
            self.lockstep.reset()
        self.runner = await self._in_thread(StageRunner, self.manifest, target, 64, self.device)
        self.runtime.announce(stage_key(self.run, target), self._claim)
        await self._join_from_replica()
        self.state = "ONLINE"
        await self.runtime.announce_now()
        return True

    # -- request checking ------------------------------------------------------------------------
    async def _authorize(self, sender: str) -> None:
        if sender in self.known_verifiers:
            return
        now = time.monotonic()
        if now - self._verifiers_checked_at > 1.0:  # rate-limited refresh: a flood of strangers costs one lookup/s
            self._verifiers_checked_at = now
            recs = await self.runtime.get(verifiers_key(self.run))
            # open mode: only candidacies that paid their stamp may drive this worker, so a flood
            # of free announcements buys no one compute (sentinel.protocol.stamps)
            bits = 0 if self.manifest.trusted_verifiers else self.manifest.verifier_stamp_bits
            admitted, refused = stamped_candidates(self.run, recs, bits, states=tuple(STATES))
            self.known_verifiers |= set(admitted)
            self._unstamped_verifiers = set(refused) - self.known_verifiers
        if sender in self._unstamped_verifiers:
            raise UnstampedVerifierError(f"{sender[-8:]} announced itself as a verifier of run {self.run} without "
                                         f"a valid {self.manifest.verifier_stamp_bits}-bit candidacy stamp")
        if sender not in self.known_verifiers:
            raise UnknownVerifierError(f"{sender[-8:]} is not an announced verifier of run {self.run}")

    def handlers(self) -> dict[str, wire.Handler]:
        """This worker's RPCs, each behind the dispatcher's message checks and :meth:`_admit`."""
        handlers = {wire.FORWARD: self._on_forward, wire.BACKWARD: self._on_backward, wire.PARAMS: self._on_params,
                    wire.STATUS: self._on_status, wire.REDUCE: self.butterfly.on_reduce,
                    wire.REDUCE_AUDIT: self.butterfly.on_audit}
        if self.lockstep is not None:
            handlers |= {wire.GRADIENT: self.lockstep.on_gradient, wire.STATE: self.lockstep.on_state,
                         wire.PASSES: self.lockstep.on_passes}
        return wire.checked_handlers(handlers, checker=self.checker, manifest=self.manifest,
                                     stage=lambda: self.stage, admit=self._admit)

    async def _admit(self, name: str, msg: Message, remote: str) -> None:
        """Pipeline requests must be for my stage and come from an announced verifier."""
        if name not in (wire.FORWARD, wire.BACKWARD):
            return
        if msg.header.get("stage") != self.stage:
            raise ProtocolError(f"request for stage {msg.header.get('stage')} sent to a worker of stage {self.stage}")
        modes = wire.MODES if name == wire.FORWARD else wire.BACKWARD_MODES
        if msg.header.get("mode", "train") not in modes:
            raise MalformedMessageError(f"mode must be one of {', '.join(modes)}, got {msg.header.get('mode')!r:.40}")
        await self._authorize(remote)
        METRICS.inc("sentinel_messages_total", kind="request", direction=name.rsplit(".", 1)[-1])

    def _attack_ctx(self, msg: Message, direction: str, x: torch.Tensor, targets: torch.Tensor | None = None,
                    grad: torch.Tensor | None = None):
        from sentinel.attacks.base import AttackContext

        h = msg.header
        seed = int.from_bytes(hashlib.blake2b(
            f"{self.attack_seed}|{h['step']}|{h['micro_batch']}|{direction}".encode(), digest_size=8).digest(), "big")
        gen = torch.Generator().manual_seed(seed % (2**63))
        return AttackContext(step=int(h["step"]), stage=self.stage, worker=self.runtime.peer_id,
                             micro_batch=int(h["micro_batch"]), direction=direction, generator=gen,
                             stage_input=x, num_stages=self.manifest.num_stages, targets=targets,
                             grad_output=grad, grad_scale=1.0 / self.manifest.training.accumulate,
                             stage_module=self.runner.module)

    # -- handlers ----------------------------------------------------------------------------------
    async def _on_forward(self, msg: Message, remote: str) -> Message:
        h = msg.header
        x, targets = msg.tensors["x"], msg.tensors.get("targets")
        mode = h.get("mode", "train")
        key = (remote, h["step"], h["micro_batch"])
        if self.lockstep is not None:
            await self.lockstep.before(int(h["step"]))
        if mode == "eval":
            y, stamp = await self._in_thread(self._stamped, self.runner.evaluate, x, targets)
        else:
            y, stamp = await self._in_thread(self._stamped, self.runner.forward, key, x, targets)
            self.max_step = max(self.max_step, int(h["step"]))
            self.tokens += x.shape[0] * x.shape[1]
        if self.attack is not None:
            ctx = self._attack_ctx(msg, "forward", x, targets)
            y = self.attack.forward(y, ctx)
            await self._hold_reply(ctx)
        return sign_message(wire.reply(msg, "forward_result", {"y": y.contiguous()}, **stamp), self.runtime.identity)

    def _train_backward(self, msg: Message, key: tuple, hold: bool) -> torch.Tensor | None:
        """In the compute thread: a training backward; in lockstep, the signed request is kept
        with the version it accumulated into (a replica re-checking my contribution asks for it)."""
        t = msg.tensors
        version = self.runner.version
        out = self.runner.backward(key, t["x"], t.get("grad"), t.get("targets"), hold)
        if self.lockstep is not None:
            self.lockstep.record_pass(version, msg)
        return out

    async def _is_verifier(self, peer: str) -> bool:
        try:
            await self._authorize(peer)
        except ProtocolError:
            return False
        return True

    def _report_later(self, complaint: Message) -> None:
        """Sign a complaint and send it to the verifiers in the background, unless its evidence
        exceeds one message (then it is only logged)."""
        size = sum(t.numel() * t.element_size() for t in complaint.tensors.values())
        if size > self.runtime.limits.max_payload_bytes:
            logger.warning("cannot report %s: the evidence (%d MiB) exceeds one message",
                           str(complaint.header.get("accused"))[-8:], size >> 20)
            return
        task = asyncio.create_task(self._send_complaint(sign_message(complaint, self.runtime.identity)))
        self._complaints.add(task)
        task.add_done_callback(self._complaints.discard)

    def _stamped(self, fn, *args) -> tuple[Any, dict[str, Any]]:
        """In the compute thread: ``fn(*args)`` and, in lockstep, the version and parameter
        digest it ran at (signed into the reply: what an exact re-check compares against)."""
        out = fn(*args)
        return out, (self.lockstep.stamp() if self.lockstep is not None else {})

    async def _hold_reply(self, ctx: Any) -> None:
        """An availability attack (``sentinel.attacks.availability``) holds its honest reply, or
        trickles it; "never" is bounded by ``MAX_HOLD_S`` so the handler task does not outlive
        its caller forever."""
        delay = getattr(self.attack, "reply_delay", None)
        seconds = delay(ctx) if delay is not None else 0.0
        if seconds > 0:
            await asyncio.sleep(min(seconds, MAX_HOLD_S))
        pace = getattr(self.attack, "reply_pace", None)
        bytes_per_s = pace(ctx) if pace is not None else None
        if bytes_per_s is not None:
            REPLY_PACE.set(bytes_per_s)

    async def _on_backward(self, msg: Message, remote: str) -> Message:
        h = msg.header
        x, grad, targets = msg.tensors["x"], msg.tensors.get("grad"), msg.tensors.get("targets")
        key = (remote, h["step"], h["micro_batch"])
        hold = False
        if self.lockstep is not None:
            await self.lockstep.before(int(h["step"]))  # nothing may await between this and the pass
        else:
            hold = self._round_overdue()
            if hold:
                METRICS.inc("sentinel_optimizer_steps_held_total")
        if h.get("mode", "train") == "probe":
            grad_x, stamp = await self._in_thread(self._stamped, self.runner.probe_backward, x, grad, targets)
        else:
            grad_x, stamp = await self._in_thread(self._stamped, self._train_backward, msg, key, hold)
        if self.lockstep is None:
            self._maybe_average()
        if self.checkpoint_dir is not None and self.checkpoint_every > 0 and \
                self.runner.version - self._saved_version >= self.checkpoint_every:
            self._saved_version = self.runner.version
            await self._in_thread(self._save_checkpoint)
        tensors = {}
        if grad_x is not None:
            if self.attack is not None:
                ctx = self._attack_ctx(msg, "backward", x, targets, grad)
                grad_x = self.attack.backward(grad_x, ctx)
                await self._hold_reply(ctx)
            tensors["grad_x"] = grad_x.contiguous()
        return sign_message(wire.reply(msg, "backward_result", tensors, **stamp), self.runtime.identity)

    async def _on_params(self, msg: Message, remote: str) -> Message:
        if msg.header.get("stage") != self.stage:
            raise ProtocolError(f"params requested for stage {msg.header.get('stage')}, I serve {self.stage}")
        part = msg.header.get("part")
        numel = self.runner.num_parameters()
        extra: dict[str, Any] = {}
        if msg.header["step"] > self.max_step + PARAMS_STEPS_AHEAD:
            # a reply is evidence dated by this step: none signed for a step that has not come yet
            raise ProtocolError(f"params requested for step {msg.header['step']}, I am at step {self.max_step}")
        if part is not None:
            if not (isinstance(part, list) and len(part) == 2 and all(type(v) is int for v in part)
                    and canonical_part(numel, self.manifest.training.averaging_part_numel, *part)):
                raise MalformedMessageError(f"part must be one of the parts an averaging round cuts {numel} "
                                            f"parameters into, got {part!r:.80}")
            extra["part"] = part
            # one flat copy per parameter state serves every part a round pulls
            flat = (await self.butterfly._own_flat())[part[0]:part[1]]
        else:
            flat = await self._in_thread(self.runner.flat_parameters)
            flat = self.poison_contribution(flat, f"{msg.header['step']}|{remote}")
        return sign_message(wire.reply(msg, "params_result", {"params": flat.contiguous()}, version=self.runner.version,
                                       **extra), self.runtime.identity)

    def poison_gradient(self, grad: torch.Tensor, tag: str) -> torch.Tensor:
        """What this worker contributes to a lockstep round: its gradient, or an averaging
        attack's poison of it."""
        return self.poison_contribution(grad, f"gradient|{tag}", anchor=torch.zeros_like(grad))

    def poison_contribution(self, flat: torch.Tensor, tag: str, part: tuple[int, int] | None = None,
                            anchor: torch.Tensor | None = None) -> torch.Tensor:
        """What this worker contributes to averaging: ``flat`` itself, or an averaging attack's
        poison of it (the whole parameters, or the reduced slice ``part`` it serves). ``anchor``:
        what the contribution is an update from (default: the aggregate of my last parameter
        round; a lockstep gradient is an update from zero)."""
        if self.attack is None:
            return flat
        from sentinel.attacks.base import AttackContext

        seed = int.from_bytes(hashlib.blake2b(f"{self.attack_seed}|{tag}|{part}|average".encode(),
                                              digest_size=8).digest(), "big")
        if anchor is None:
            anchor = self._anchor
            if anchor is not None and part is not None:
                anchor = anchor[part[0]:part[1]]
        ctx = AttackContext(step=int(self.max_step), stage=self.stage, worker=self.runtime.peer_id, micro_batch=-1,
                            direction="reduce" if part is not None else "average", generator=torch.Generator().manual_seed(seed % (2**63)),
                            num_stages=self.manifest.num_stages, anchor=anchor)
        return self.attack.average(flat, ctx)

    async def _on_status(self, msg: Message, remote: str) -> Message:
        if self.lockstep is not None and self.runner is not None:
            await self.lockstep.digest()  # the status carries the current version's digest
        return sign_message(wire.reply(msg, "status_result", {}, **self.status()), self.runtime.identity)

    def status(self) -> dict[str, Any]:
        r = self.runner
        return {
            "role": "worker", "stage": self.stage, "state": self.state, "step": int(self.max_step),
            "device": str(self.device), "throughput": self.throughput,
            "tokens": int(self.tokens), "optimizer_steps": r.version if r else 0,
            "averaging_rounds": r.stats.averaging_rounds if r else 0,
            "held_steps": r.stats.held_steps if r else 0,
            "uptime_s": round(time.time() - self.started_at, 1),
            **self._lockstep_status(),
        }

    def _lockstep_status(self) -> dict[str, Any]:
        ls = self.lockstep
        if ls is None or self.runner is None:
            return {}
        digest = self.runner.digest_if_known()
        if digest is None and self.state == "OFFLINE":  # the final report: the compute thread is idle
            digest = self.runner.digest()
        return {"lockstep_version": self.runner.version, "params_digest": digest, "lockstep_rounds": ls.stats.rounds,
                "lockstep_empty_rounds": ls.stats.empty_rounds, "resyncs": ls.stats.resyncs,
                "lockstep_left_out": ls.stats.left_out, "lockstep_seconds": round(ls.stats.round_seconds, 3),
                "lockstep_checked": ls.stats.contributions_checked, "lockstep_proven": ls.stats.contributions_proven,
                "lockstep_unverified": ls.stats.contributions_unverified}

    def params_summary(self) -> dict[str, Any]:
        """Norm and finiteness of this replica's parameters, for the node's report."""
        if self.runner is None:
            return {}
        flat = self.runner.flat_parameters()
        return {"norm": float(flat.norm()), "finite": bool(torch.isfinite(flat).all()), "numel": flat.numel()}

    # -- parameters from replicas ------------------------------------------------------------------
    async def _fetch_replica_states(self, timeout: float = 20.0) -> list[tuple[torch.Tensor, int]]:
        """(flat parameters, optimizer-step count) of every live, non-banned replica that answers,
        fetched part by part (``averaging_part_numel``) so a stage larger than one message can join."""
        peers = await self._live_replicas()
        if not peers:
            return []
        chunks: dict[str, list[torch.Tensor]] = {p: [] for p in peers}
        versions: dict[str, int] = {}
        for lo, hi in partition(self.runner.num_parameters(), 1, self.manifest.training.averaging_part_numel):
            got, failed = await fetch_params(self.runtime, self.checker, self.run, self.max_step, self.stage,
                                             list(chunks), timeout=timeout, part=(lo, hi))
            for _, e in failed:
                METRICS.inc("sentinel_averaging_failures_total", reason=getattr(e, "reason", "error"))
            answered = dict(got)
            chunks = {p: [*c, answered[p].tensors["params"]] for p, c in chunks.items() if p in answered}
            for p, msg in got:
                versions.setdefault(p, version_of(msg))
        return [(torch.cat(c), versions[p]) for p, c in chunks.items()]

    async def stage_replicas(self) -> list[str]:
        """Every replica that claims my stage in the DHT (any state)."""
        return list((await read_stage_claims(self.runtime, self.run, self.manifest.num_stages)).get(self.stage, {}))

    async def _live_replicas(self) -> list[str]:
        """The other ONLINE, non-banned replicas of my stage."""
        claims = (await read_stage_claims(self.runtime, self.run, self.manifest.num_stages)).get(self.stage, {})
        banned = await self.banned_peers() & set(claims)
        for peer in banned - self._excluded:
            logger.info("leaving banned replica %s out of averaging", peer[-8:])
        self._excluded |= banned
        return [p for p, v in claims.items()
                if p != self.runtime.peer_id and v.get("state") == "ONLINE" and p not in banned]

    async def _fetch_replica_replies(self, timeout: float = 20.0) -> list[tuple[str, Message]]:
        """(peer, its signed ``params_result``) of every live, non-banned replica that answers.
        The signed reply is kept: it is the evidence if the contribution turns out poisoned."""
        peers = await self._live_replicas()
        got, failed = await fetch_params(self.runtime, self.checker, self.run, self.max_step, self.stage, peers,
                                         self.runner.num_parameters(), timeout)
        for _, e in failed:
            METRICS.inc("sentinel_averaging_failures_total", reason=getattr(e, "reason", "error"))
        return got

    def _screen_contributions(self, own: torch.Tensor, replies: list[tuple[str, Message]]) -> None:
        """Complain to the verifiers about each replica whose contribution to this round is an
        outlier (:func:`~sentinel.protocol.aggregation.contribution_scores`). The complaint carries the
        replica's own signed reply, so it cannot be forged against an honest replica; the
        verifiers re-check it against the stage's other replicas before striking anyone."""
        cfg = self.screen_config
        if cfg.averaging_outlier_ratio <= 0:
            return
        scores = contribution_scores([own, *(m.tensors["params"] for _, m in replies)], cfg.averaging_outlier_floor)
        for (peer, reply), score in zip(replies, scores[1:], strict=True):
            if score > cfg.averaging_outlier_ratio:
                logger.info("contribution of %s is %.1f x the spread of stage %d: reporting it to the verifiers",
                            peer[-8:], score, self.stage)
                self.complain_later(peer, reply, score)

    def complain_later(self, peer: str, evidence: Message, score: float) -> None:
        """Report ``peer``'s signed contribution (whole, or a slice) to the verifiers in the background."""
        task = asyncio.create_task(self._complain(peer, evidence, score))
        self._complaints.add(task)
        task.add_done_callback(self._complaints.discard)

    def report_reduction(self, reducer: str, result: Message, inputs: list[Message]) -> None:
        """Report a butterfly reducer whose signed answer its own committed inputs contradict
        (``sentinel.worker.butterfly``): the verifiers recompute it from this evidence alone."""
        req = wire.request(self.run, self.max_step, 0, self.stage, "complaint",
                           {"part": result.tensors["part"],
                            "params": torch.stack([m.tensors["params"] for m in inputs])},
                           kind="reduction", accused=reducer, evidence=dict(result.header),
                           contributions=[dict(m.header) for m in inputs])
        self._report_later(req)  # too large to send: the reducer stays distrusted here all the same

    async def _complain(self, peer: str, reply: Message, score: float, timeout: float = 30.0) -> None:
        header = dict(reply.header)
        req = wire.request(self.run, self.max_step, 0, self.stage, "complaint", {"params": reply.tensors["params"]},
                           accused=peer, evidence=header, score=round(float(score), 3))
        await self._send_complaint(sign_message(req, self.runtime.identity), timeout)

    async def _send_complaint(self, req: Message, timeout: float = 30.0) -> None:
        """Send a signed complaint to every live verifier of the run."""
        try:
            recs = await self.runtime.get(verifiers_key(self.run))
            verifiers = sorted(p for p, v in recs.items() if v.get("run") == self.run and v.get("state") != "OFFLINE")
        except Exception as e:  # noqa: BLE001 - a DHT hiccup: tell the verifiers this worker already knows
            logger.debug("cannot read verifier records: %s", e)
            verifiers = sorted(self.known_verifiers)

        async def send(v: str) -> None:
            try:
                await self.runtime.call(v, wire.COMPLAINT, req, timeout)
                METRICS.inc("sentinel_averaging_complaints_total", outcome="delivered")
            except (PeerCallError, ProtocolError) as e:
                METRICS.inc("sentinel_averaging_complaints_total", outcome="failed")
                logger.debug("complaint to %s failed: %s", v[-8:], e)

        await asyncio.gather(*(send(v) for v in verifiers))

    async def banned_peers(self) -> set[str]:
        """Replicas the verifier committee banned: never averaged with. A banned worker keeps
        its stage claim but gets no more traffic, so its parameters go stale (or were poisoned
        all along), and one average with it pulls every honest replica of the stage towards them."""
        try:
            records = await self.runtime.get(verifiers_key(self.run))
        except Exception as e:  # noqa: BLE001 - a DHT hiccup: average as before rather than not at all
            logger.debug("cannot read verifier records: %s", e)
            return set()
        trusted = list(self.manifest.trusted_verifiers)
        return committee_bans(records, configured_seats(self.manifest.committee_size, trusted), trusted)

    async def _join_from_replica(self) -> None:
        """A (re)joining worker adopts its live replicas' parameters instead of the initial ones,
        unless it resumed from a checkpoint at least as far along as every one of them. In
        lockstep it adopts the version (parameters and optimizer state) most of them hold."""
        if self.lockstep is not None:
            statuses = await self._replica_statuses()
            if statuses and await self.lockstep.join(statuses):
                logger.info("joined stage %d at version %d from its replicas", self.stage, self.runner.version)
            return
        states = await self._fetch_replica_states()
        if not states:
            return
        ahead = max(v for _, v in states)
        if self.resumed_from is not None and ahead <= self.runner.version:
            logger.info("stage %d: keeping the checkpoint (optimizer step %d; live replicas at <= %d)",
                        self.stage, self.runner.version, ahead)
            return
        agg = aggregate([t for t, _ in states], self.manifest.training.averaging)
        await self._in_thread(self.runner.load_flat_parameters, agg)
        logger.info("joined stage %d from %d live replica(s)%s", self.stage, len(states),
                    " (they are ahead of the checkpoint)" if self.resumed_from is not None else "")

    async def _replica_statuses(self, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        """The signed status of every live replica that answers."""
        async def one(peer: str) -> tuple[str, dict[str, Any] | None]:
            req = sign_message(wire.request(self.run, self.max_step, 0, self.stage, "status", {}),
                               self.runtime.identity)
            try:
                resp = await self.runtime.call(peer, wire.STATUS, req, timeout)
                self.checker.check(resp, expected_sender=peer, expected={}, check_replay=False)
            except (PeerCallError, ProtocolError) as e:
                logger.debug("status of %s failed: %s", peer[-8:], e)
                return peer, None
            return peer, dict(resp.header) if resp.header.get("stage") == self.stage else None

        got = await asyncio.gather(*(one(p) for p in await self._live_replicas()))
        return {p: h for p, h in got if h is not None}

    async def _resume_from_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        path = checkpoint_path(self.checkpoint_dir, self.run, self.stage)
        if not path.exists():
            return
        try:
            self.resumed_from = await self._in_thread(load_checkpoint, self.runner, path, self.run)
        except CheckpointError as e:
            logger.warning("not resuming: %s", e)
            METRICS.inc("sentinel_checkpoint_rejected_total")
            return
        self.max_step = max(self.max_step, self.resumed_from["max_step"])
        self._saved_version = self.runner.version
        print(f"worker resumed stage {self.stage} from {path} (optimizer step {self.runner.version}, "
              f"step {self.resumed_from['max_step']})", flush=True)

    def _save_checkpoint(self) -> None:
        """In the compute thread (parameters are consistent there): write the stage atomically."""
        if self.checkpoint_dir is None or self.runner is None:
            return
        try:
            save_checkpoint(self.runner, checkpoint_path(self.checkpoint_dir, self.run, self.stage), self.run,
                            self.max_step)
            METRICS.inc("sentinel_checkpoints_saved_total")
        except OSError as e:
            logger.warning("cannot save the checkpoint in %s: %s", self.checkpoint_dir, e)

    def _round_overdue(self) -> bool:
        """True while the averaging round in flight began ``max_local_steps`` or more steps ago."""
        bound = self.manifest.training.max_local_steps
        task = self._averaging_task
        return (bound > 0 and task is not None and not task.done()
                and self.runner.version - self._last_averaged_version >= bound)

    def _maybe_average(self) -> None:
        r = self.runner
        every = self.manifest.training.average_every
        if r.version - self._last_averaged_version < every:
            return
        if self._averaging_task is not None and not self._averaging_task.done():
            return
        self._last_averaged_version = r.version
        self._averaging_task = asyncio.create_task(self._average())

    async def _average(self) -> None:
        try:
            if self.manifest.butterfly_averaging(self.runner.num_parameters()):
                peers = await self._live_replicas()
                if not peers:
                    return
                t0 = time.perf_counter()
                agg = await self.butterfly.round(peers)
                own = await self._in_thread(self.runner.flat_parameters)
                METRICS.inc("sentinel_averaging_seconds_total", time.perf_counter() - t0)
                replies = []
            else:
                t0 = time.perf_counter()
                replies = await self._fetch_replica_replies()
                if not replies:
                    return
                peers = [msg.tensors["params"] for _, msg in replies]
                own = await self._in_thread(self.runner.flat_parameters)
                agg = aggregate([own, *peers], self.manifest.training.averaging)
                METRICS.inc("sentinel_averaging_seconds_total", time.perf_counter() - t0)
            await self._in_thread(self.runner.load_flat_parameters, agg)
            self._anchor = agg.to(own.dtype)
            self._screen_contributions(own, replies)
            METRICS.inc("sentinel_averaging_rounds_total")
            gap = self.averaging_log.record(self.max_step, self.runner.version, own, agg, len(peers))
            METRICS.set("sentinel_averaging_divergence", gap.divergence)
            if gap.divergence > DRIFT_WARNING and self.averaging_log.rounds > 10:
                logger.warning("drifted %.1f%% from stage %d's average over %d optimizer steps (%.1f s) "
                               "since the previous round: the verifiers may flag this replica",
                               100 * gap.divergence, self.stage, gap.optimizer_steps, gap.seconds)
        except Exception as e:  # noqa: BLE001 - averaging is best-effort; training goes on
            logger.warning("averaging round failed: %s", e)
        finally:
            if self.runner.pending and self.state != "OFFLINE":  # gradients held while this round was overdue
                await self._in_thread(self.runner.step_if_due)
