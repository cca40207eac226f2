"""The verifier role: drive micro-batches through the pipeline, screen, strike, vote bans, report.

The verifier is a CPU peer. It joins the DHT, announces its candidacy, keeps a live view of
every stage's replicas, and runs the training loop: each step it sends ``micro_batches_per_step``
micro-batches concurrently through the pipeline (``PipelineDriver``), screening every boundary
in both directions. Between steps it syncs committee membership and ban votes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from sentinel import __version__
from sentinel.metrics import METRICS
from sentinel.model.corpus import TextCorpus
from sentinel.net.runtime import SwarmRuntime
from sentinel.net.view import fetch_params, read_stage_claims, version_of
from sentinel.protocol import rpc as wire
from sentinel.protocol.bans import BanBook
from sentinel.protocol.codec import Message
from sentinel.protocol.keys import ban_key, progress_key, verifiers_key
from sentinel.protocol.signing import sign_message
from sentinel.protocol.stamps import solve_stamp, stamped_candidates
from sentinel.run.manifest import RunManifest
from sentinel.verifier.agreement import replica_agreement
from sentinel.verifier.complaints import ComplaintDesk, Verdict
from sentinel.verifier.driver import DriverConfig, FlagEvent, MicroBatchResult, PipelineDriver
from sentinel.verifier.routing import Router, RouterConfig
from sentinel.verifier.screen import Screener
from sentinel.verifier.stats import TensorStats, compute_stats
from sentinel.verifier.strikes import StrikeLedger, majority_allows_ban
from sentinel.verifier.transport import P2PTransport

logger = logging.getLogger(__name__)


class VerifierNode:
    def __init__(
        self,
        runtime: SwarmRuntime,
        manifest: RunManifest,
        corpus: TextCorpus,
        steps: int,
        report_path: str | None = None,
        progress_path: str | None = None,
        data_shard: tuple[int, int] = (0, 1),
        screening: bool = True,
        frame_target: str | None = None,
        journal_path: str | None = None,
    ):
        self.runtime = runtime
        self.manifest = manifest
        self.run = manifest.run_id
        self.corpus = corpus
        self.steps = steps
        self.report_path = report_path
        self.progress_path = progress_path
        self.data_shard = data_shard
        self.frame_target = frame_target  # byzantine test mode: frame this honest worker, never vote on others
        #: where the verifier records every completed step, so a restarted process resumes (None = never)
        self.journal_path = Path(journal_path) if journal_path else None
        self.prior: dict[str, Any] = {}  # micro-batch accounting of the steps before a restart
        self.resumed: list[dict[str, int]] = []
        self.state = "JOINING"
        self.stamp = 0  # candidacy proof of work, found in ``start`` (open mode only)
        self._refused_candidates: set[str] = set()  # announced without a valid stamp (counted once)
        self.transport = P2PTransport(runtime, manifest)
        t = manifest.training
        self.router = Router(RouterConfig(timeout_floor_s=t.hop_timeout_min_s, timeout_factor=t.hop_timeout_factor,
                                          hedge_floor_s=t.hop_hedge_min_s, hedge_factor=t.hop_hedge_factor),
                             salt=runtime.peer_id)
        self.screen_config = manifest.screening
        self.screening = screening
        self.screener = Screener(self.screen_config, manifest.num_stages) if screening else None
        self.ledger = StrikeLedger(self.screen_config.strike_limit, self.screen_config.forgive_after)
        self.bans = BanBook(self.run, runtime.peer_id, manifest.committee_size, list(manifest.trusted_verifiers))
        self.driver = PipelineDriver(
            manifest.num_stages, self.transport, self.router, self.screener, self.ledger if screening else None,
            is_banned=lambda w: w in self.bans.effective,
            # exact spot checks where the replicas are identical (lockstep stages)
            config=DriverConfig(max_hop_attempts=t.max_hop_retries, hedge=True,
                                spot_check=manifest.screening.spot_check if t.sync == "lockstep" else 0.0),
            on_flag=self._on_flag,
            hidden_shape=manifest.model.hidden_shape(t.micro_batch_size),
        )
        self.evidence: dict[str, deque] = defaultdict(lambda: deque(maxlen=4))
        self.flag_counts: dict[str, int] = defaultdict(int)
        self.message_counts: dict[str, int] = defaultdict(int)
        self.first_attack_seen: dict[str, int] = {}
        self.step = 0
        self.agreement: list[dict[str, Any]] | None = None  # lockstep: replica_agreement after training
        self.results: list[MicroBatchResult] = []
        self.train_losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.started_at = time.time()
        self.train_seconds = 0.0
        self.step_seconds: list[float] = []  # wall time of each step this process drove
        self.tokens = 0
        self._sync_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.stage_members: dict[int, set[str]] = {}  # every worker seen ONLINE per stage
        self._held_bans: set[str] = set()
        # complaints about poisoned averaging contributions (``sentinel.verifier.complaints``)
        self.complaints = ComplaintDesk(self.run, self.screen_config.averaging_outlier_ratio,
                                        self.screen_config.averaging_outlier_floor, self._fetch_stage_params,
                                        now_step=lambda: int(self.step), rule=manifest.training.averaging,
                                        manifest=manifest, is_verifier=lambda peer: peer in self.verifier_peers)
        self.verifier_peers: set[str] = {runtime.peer_id}  # announced (and stamped) verifiers of the run
        self.averaging_upheld: dict[str, int] = defaultdict(int)
        self._complaint_tasks: set[asyncio.Task] = set()
        self.val_batches = corpus.val_batches(t.micro_batch_size, manifest.model.seq_len, t.eval_batches)
        self.start_step = self._resume_from_journal()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.manifest.trusted_verifiers:
            # open mode: the candidacy's proof of work (``sentinel.protocol.stamps``), found off the
            # event loop so the node keeps answering while it searches (~0.3 s at 20 bits)
            t0 = time.monotonic()
            self.stamp = await asyncio.to_thread(solve_stamp, self.run, self.runtime.peer_id,
                                                 self.manifest.verifier_stamp_bits)
            logger.info("candidacy stamp of %d bits found in %.2f s", self.manifest.verifier_stamp_bits,
                        time.monotonic() - t0)
        self.runtime.announce(verifiers_key(self.run), self._record)
        self.runtime.announce(progress_key(self.run), self._progress_record)
        await self.runtime.announce_now()
        for name, handler in self.handlers().items():
            await self.runtime.serve(name, handler)
        self._sync_task = asyncio.create_task(self._sync_loop())

    def _record(self) -> dict[str, Any]:
        return self.runtime.record_value(
            "verifier", verifiers_key(self.run), self.run, state=self.state, step=int(self.step),
            version=__version__, stamp=int(self.stamp), accusations=sorted(self.bans.my_votes)[:64],
            banned=sorted(self.bans.effective)[:256], strikes=self.ledger.struck(),
        )

    def _progress_record(self) -> dict[str, Any]:
        """What the monitor plots: this verifier's recent losses, throughput, flags and bans."""
        return self.runtime.record_value(
            "progress", progress_key(self.run), self.run, step=int(self.step), micro_batches=len(self.results),
            state=self.state, tokens=int(self.tokens),
            tokens_per_s=round(self.tokens / self.train_seconds, 1) if self.train_seconds else 0.0,
            train_loss=[[s, round(v, 4)] for s, v in self.train_losses[-200:]],
            val_loss=[[s, round(v, 4)] for s, v in self.val_losses[-50:]],
            flags=dict(self.flag_counts),
            flag_rates={k: round(v, 5) for k, v in (self.screener.flag_rates() if self.screener else {}).items()},
            banned=[{"peer": b.peer, "stage": b.stage, "step": b.step, "votes": b.votes, "reasons": b.reasons}
                    for b in self.bans.effective.values()][:64],
            committee=list(self.bans.committee),
        )

    async def shutdown(self) -> None:
        self.state = "OFFLINE"
        if self._sync_task is not None:
            self._sync_task.cancel()
        for task in list(self._complaint_tasks):
            task.cancel()
        await self.runtime.shutdown(final_records={verifiers_key(self.run): self._record(),
                                                   progress_key(self.run): self._progress_record()})

    def handlers(self) -> dict[str, wire.Handler]:
        """This verifier's RPCs, each behind the dispatcher's message checks."""
        return wire.checked_handlers({wire.STATUS: self._on_status, wire.COMPLAINT: self._on_complaint},
                                     checker=self.complaints.checker, manifest=self.manifest, stage=lambda: -1)

    async def _on_status(self, msg: Message, remote: str) -> Message:
        return sign_message(wire.reply(msg, "status_result", {}, **self.status()), self.runtime.identity)

    # -- complaints about averaging contributions ------------------------------------------------
    async def _on_complaint(self, msg: Message, remote: str) -> Message:
        """Acknowledge at once, judge in the background: judging fetches the stage's replicas."""
        # a faked reduction is judged whatever the contribution screen's ratio: it is a proof
        judged = self.screening and (self.complaints.ratio > 0 or msg.header.get("kind") in ("reduction", "gradient"))
        if judged:
            task = asyncio.create_task(self.complaints.handle(msg, remote, self.transport.replicas, self._on_verdict))
            self._complaint_tasks.add(task)
            task.add_done_callback(self._complaint_tasks.discard)
        else:
            METRICS.inc("sentinel_averaging_complaints_received_total", outcome="not_screening")
        return sign_message(wire.reply(msg, "complaint_result", {}, judged=judged), self.runtime.identity)

    async def _fetch_stage_params(self, stage: int, exclude: set[str], part: tuple[int, int] | None = None,
                                  timeout: float = 20.0) -> list[tuple[str, Any, int]]:
        """The current flat parameters (or their slice ``part``) of the stage's live, non-banned
        replicas (but ``exclude``)."""
        peers = [p for p in self.transport.replicas(stage) if p not in exclude]
        got, _ = await fetch_params(self.runtime, self.complaints.checker, self.run, self.step, stage, peers,
                                    timeout=timeout, part=part)
        return [(p, msg.tensors["params"], version_of(msg)) for p, msg in got]

    def _on_verdict(self, v: Verdict) -> None:
        outcome = "upheld" if v.upheld else "dismissed"
        if v.reason == "reduction":
            found = (f"its reduction over {v.replicas} committed slices "
                     f"{'contradicts' if v.upheld else 'matches'} the recomputation")
        elif v.reason == "gradient":
            found = (f"its lockstep gradient over {v.replicas} passes "
                     f"{'contradicts' if v.upheld else 'matches'} the recomputation")
        else:
            found = f"{v.score:.1f} x the spread of {v.replicas} replicas (bound {v.bound:.1f})"
        logger.info("%s complaint against %s (stage %d averaging): %s, %s, evidence of step %s judged at step %d",
                    v.reason, v.accused[-8:], v.stage, outcome, found, v.evidence.get("evidence_step"), self.step)
        if not v.upheld:
            return
        self.averaging_upheld[v.accused] += 1
        self.flag_counts[f"stage{v.stage}/average"] += 1
        METRICS.inc("sentinel_flags_total", stage=str(v.stage), direction="average")
        self.ledger.record(v.accused, True, proven=v.reason == "gradient")  # recomputed here: a proof
        self.evidence[v.accused].append({
            "step": self.step, "micro_batch": 0, "stage": v.stage, "direction": "average", "reasons": [v.reason],
            **v.evidence, "distances": {v.reason: _finite(v.score)}, "fences": {v.reason: v.bound},
        })
        self._vote_if_banned(v.accused, v.stage, "average", self.step,
                             {"contribution": "averaging contributions", "reduction": "a faked reduction"}.get(
                                 v.reason, "a lockstep gradient its passes do not compute"))

    def status(self) -> dict[str, Any]:
        return {"role": "verifier", "state": self.state, "step": int(self.step), "tokens": int(self.tokens),
                "banned": len(self.bans.effective), "committee": len(self.bans.committee)}

    # -- swarm view --------------------------------------------------------------------------------
    async def refresh(self) -> None:
        claims = await read_stage_claims(self.runtime, self.run, self.manifest.num_stages)
        for s, recs in claims.items():
            self.stage_members.setdefault(s, set()).update(
                p for p, v in recs.items() if v.get("state") == "ONLINE")
            live = sorted(p for p, v in recs.items() if v.get("state") == "ONLINE" and p not in self.bans.effective)
            self.transport.set_replicas(s, live)
        verifiers = await self.runtime.get(verifiers_key(self.run))
        bits = 0 if self.manifest.trusted_verifiers else self.manifest.verifier_stamp_bits
        candidates, refused = stamped_candidates(self.run, verifiers, bits)
        for peer in set(refused) - self._refused_candidates:
            self._refused_candidates.add(peer)
            METRICS.inc("sentinel_rejected_records_total", reason="verifier_stamp")
            logger.warning("verifier candidacy of %s refused: no valid %d-bit stamp", peer[-8:], bits)
        candidates[self.runtime.peer_id] = int(self.stamp)
        self.verifier_peers = set(candidates)
        self.bans.elect(candidates)
        accused = set()
        for p, v in verifiers.items():
            if p in self.bans.committee:
                accused |= {a for a in v.get("accusations", []) if isinstance(a, str)}
        self.bans.accused = accused | set(self.bans.my_votes)
        await self._sync_bans()

    async def _sync_bans(self) -> None:
        for target in sorted(self.bans.accused):
            if target in self.bans.effective:
                continue
            votes = await self.runtime.get(ban_key(self.run, target))
            if target not in self.bans.my_votes and self.runtime.peer_id not in votes:
                self._maybe_endorse(target, votes)
            if target in self.bans.my_votes:
                votes[self.runtime.peer_id] = {"target": target, "run": self.run, **self.bans.my_votes[target]}
            if not self._ban_within_majority_bound(target, votes):
                continue
            rec = self.bans.tally(target, votes, self.step)
            if rec is not None:
                self.transport.set_replicas(rec.stage, [w for w in self.transport.replicas(rec.stage) if w != target])
        for target, fields in list(self.bans.my_votes.items()):
            key = ban_key(self.run, target)
            await self.runtime.store(key, self.runtime.record_value("ban_vote", key, self.run, **fields),
                                     ttl=max(60.0, self.runtime.config.record_ttl_s * 4))

    def _ban_within_majority_bound(self, target: str, votes: dict[str, dict[str, Any]]) -> bool:
        """Never ban a majority of a stage (``strikes.majority_allows_ban``, the rule the simulator
        applies too), counted over the committee's effective bans."""
        stage = next((s for s, members in self.stage_members.items() if target in members), None)
        if stage is None:
            return True
        members = self.stage_members[stage]
        banned_here = sum(1 for p in self.bans.effective if p in members)
        if not majority_allows_ban(len(members), banned_here):
            if target not in self._held_bans:
                self._held_bans.add(target)
                logger.warning("holding ban of %s: stage %d would lose its honest majority (%d of %d banned)",
                               target[-8:], stage, banned_here, len(members))
            return False
        return True

    def _maybe_endorse(self, target: str, votes: dict[str, dict[str, Any]]) -> None:
        """Vote for another member's ban only if its evidence is anomalous to MY reference too."""
        if self.frame_target is not None or self.screener is None:
            return  # a byzantine verifier never helps ban an attacker
        if self.ledger.state(target).flags == 0:
            return  # never seen this worker misbehave myself: no endorsement on hearsay
        for payload in votes.values():
            for ev in payload.get("evidence", []):
                if isinstance(ev, dict) and ev.get("direction") == "average":
                    if self.averaging_upheld.get(target, 0) == 0:
                        continue  # averaging evidence is endorsed only after judging a complaint myself
                    stage = ev.get("stage")
                    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
                        continue
                    self.bans.vote(target, stage, "average", self.step, list(self.evidence[target]))
                    logger.info("endorsing ban of %s (averaging contributions I judged poisoned too)", target[-8:])
                    self._wake.set()
                    return
                try:
                    stats = TensorStats.from_dict(ev["stats"])
                    verdict = self.screener.boundary(int(ev["stage"]), str(ev["direction"])).rescore(stats)
                except (KeyError, TypeError, ValueError) as e:
                    logger.debug("unusable evidence against %s: %s", target[-8:], e)
                    continue
                if verdict.flagged:
                    self.bans.vote(target, int(ev["stage"]), str(ev["direction"]), self.step, list(self.evidence[target]))
                    logger.info("endorsing ban of %s (evidence re-scored: %s)", target[-8:], verdict.reasons)
                    self._wake.set()
                    return

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - a DHT hiccup must not stop training
                logger.warning("swarm view refresh failed: %s", e)
            self._wake.clear()
            # a new vote of ours is published at once, not a heartbeat later
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.runtime.config.heartbeat_s)

    async def wait_for_pipeline(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            await self.refresh()
            missing = [s for s in range(self.manifest.num_stages) if not self.transport.replicas(s)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"stages {missing} have no ONLINE worker after {timeout:.0f}s")
            await asyncio.sleep(0.5)

    # -- flags, strikes, votes ---------------------------------------------------------------------
    def _on_flag(self, ev: FlagEvent) -> None:
        self.flag_counts[f"stage{ev.stage}/{ev.direction}"] += 1
        METRICS.inc("sentinel_flags_total", stage=str(ev.stage), direction=ev.direction)
        if "cleared_by" in ev.meta:
            METRICS.inc("sentinel_flags_cleared_total", stage=str(ev.stage), direction=ev.direction)
        if not ev.struck:
            return
        item: dict[str, Any] = {"step": ev.step, "micro_batch": ev.micro_batch, "stage": ev.stage,
                                "direction": ev.direction, "reasons": list(ev.reasons),
                                "digest": ev.meta.get("digest", b""), "signature": ev.meta.get("signature", b"")}
        if ev.verdict is not None:
            item["distances"] = {k: _finite(v) for k, v in ev.verdict.distances.items()}
            item["fences"] = {k: _finite(v) for k, v in ev.verdict.fences.items()}
        if ev.tensor is not None:
            try:
                item["stats"] = _jsonable(compute_stats(ev.tensor, self.screen_config, ev.source).to_dict())
            except Exception as e:  # noqa: BLE001 - evidence is best-effort; the strike stands
                logger.debug("cannot summarise flagged tensor: %s", e)
        if "confirm_distances" in ev.meta:
            item["confirmed_by"] = ev.meta.get("confirmed_by")
            item["confirm_distances"] = {k: _finite(v) for k, v in ev.meta["confirm_distances"].items()}
        self.evidence[ev.worker].append(item)
        logger.info("strike %s at stage %d %s, step %d mb %d: %s (distances %s, fences %s, vs recomputation %s)",
                    ev.worker[-8:], ev.stage, ev.direction, ev.step, ev.micro_batch, ",".join(ev.reasons),
                    _brief(item.get("distances")), _brief(item.get("fences")), _brief(item.get("confirm_distances")))
        self._vote_if_banned(ev.worker, ev.stage, ev.direction, ev.step, f"{ev.direction}, reasons {ev.reasons}")

    def _vote_if_banned(self, worker: str, stage: int, direction: str, step: int, why: str) -> None:
        """Once this verifier's ledger bans ``worker`` (either kind of evidence), vote once and
        publish the vote at once rather than a heartbeat later."""
        if self.ledger.is_banned(worker) and worker not in self.bans.my_votes and self.frame_target is None:
            self.bans.vote(worker, stage, direction, step, list(self.evidence[worker]))
            logger.info("voting to ban %s (stage %d %s)", worker[-8:], stage, why)
            self._wake.set()

    def _frame(self) -> None:
        """Byzantine test mode: accuse an honest worker with fabricated evidence."""
        if self.frame_target and self.frame_target not in self.bans.my_votes:
            fake = {"step": self.step, "micro_batch": 0, "stage": 1, "direction": "forward",
                    "reasons": ["l2"], "digest": b"\0" * 32, "signature": b"\0" * 64}
            self.bans.vote(self.frame_target, 1, "forward", self.step, [fake])

    # -- training --------------------------------------------------------------------------------
    async def evaluate(self) -> float:
        losses = []
        for i, (x, y) in enumerate(self.val_batches):
            losses.append(await self.driver.eval_micro_batch(self.step, 10_000 + i, x, y))
        val = sum(losses) / len(losses)
        self.val_losses.append((self.step, val))
        logger.info("step %d val loss %.4f", self.step, val)
        return val

    async def train(self) -> dict[str, Any]:
        t = self.manifest.training
        self.state = "ONLINE"
        await self.runtime.announce_now()
        if not self.val_losses:
            await self.evaluate()
        shard, num_shards = self.data_shard
        for step in range(self.start_step + 1, self.steps + 1):
            self.step = step
            if self.frame_target:
                self._frame()
            t0 = time.perf_counter()
            batches = [self.corpus.batch("train", t.micro_batch_size, self.manifest.model.seq_len,
                                         seed=self.manifest.seed, index=step * t.micro_batches_per_step + mb,
                                         shard=shard, num_shards=num_shards)
                       for mb in range(t.micro_batches_per_step)]
            results = await asyncio.gather(*(self.driver.train_micro_batch(step, mb, x, y)
                                             for mb, (x, y) in enumerate(batches)))
            self.step_seconds.append(round(time.perf_counter() - t0, 3))
            self.train_seconds += self.step_seconds[-1]
            self.results.extend(results)
            done = [r for r in results if r.completed and r.loss is not None]
            self.tokens += len(done) * t.micro_batch_size * self.manifest.model.seq_len
            if done:
                self.train_losses.append((step, sum(r.loss for r in done) / len(done)))
            if step % t.eval_every == 0 and step != self.steps:
                await self.evaluate()
            self._write_progress()
            self._write_journal()
        await self.evaluate()
        if self.manifest.training.sync == "lockstep":
            x, y = self.val_batches[0]
            live = [[w for w in self.transport.replicas(s) if w not in self.bans.effective]
                    for s in range(self.manifest.num_stages)]
            # one step past training: every replica closes its last version in one more round,
            # which also repairs a replica that the last training round left diverged
            self.agreement = await replica_agreement(self.transport, live, self.step + 1, x, y)
        report = self.report()
        self._write_progress(final=True)
        if self.report_path:
            write_json(self.report_path, report)
        return report

    # -- reporting ---------------------------------------------------------------------------------
    def _write_progress(self, final: bool = False) -> None:
        if not self.progress_path:
            return
        write_json(self.progress_path, {
            "peer": self.runtime.peer_id, "step": self.step, "steps": self.steps, "final": final,
            "train_loss": self.train_losses[-1][1] if self.train_losses else None,
            "val_loss": self.val_losses[-1][1] if self.val_losses else None,
            "tokens": self.tokens, "train_seconds": self.train_seconds,
            "banned": sorted(self.bans.effective), "flags": dict(self.flag_counts),
        })

    def _accounting(self) -> dict[str, Any]:
        """Every micro-batch this verifier sent, across restarts (the journal's steps included)."""
        prior = self.prior
        per_step: dict[str, dict[str, int]] = {k: dict(v) for k, v in prior.get("per_step", {}).items()}
        for r in self.results:
            d = per_step.setdefault(str(r.step), {"micro_batches": 0, "completed": 0, "failed": 0})
            d["micro_batches"] += 1
            d["completed" if r.completed else "failed"] += 1
        total = int(prior.get("total", 0)) + len(self.results)
        completed = int(prior.get("completed", 0)) + sum(r.completed for r in self.results)
        return {
            "total": total, "completed": completed, "failed": total - completed,
            "retried_hops": int(prior.get("retried_hops", 0)) + sum(r.retries for r in self.results),
            "substituted": int(prior.get("substituted", 0)) + sum(r.substituted for r in self.results),
            "tainted": int(prior.get("tainted", 0)) + sum(r.tainted for r in self.results),
            "hedged_hops": int(prior.get("hedged_hops", 0)) + sum(r.hedged for r in self.results),
            "per_step": dict(sorted(per_step.items(), key=lambda kv: int(kv[0]))),
            "errors": [*prior.get("errors", []), *(r.error for r in self.results if r.error)][:20],
        }

    # -- journal: resume after a crash -------------------------------------------------------------
    def _write_journal(self) -> None:
        """After every completed step: what a restarted process needs to go on from the next one."""
        if self.journal_path is None:
            return
        write_json(self.journal_path, {
            "run": self.run, "peer": self.runtime.peer_id, "step": self.step, "tokens": self.tokens,
            "train_seconds": self.train_seconds, "train_losses": self.train_losses, "val_losses": self.val_losses,
            "accounting": self._accounting(), "flags": dict(self.flag_counts), "ledger": self.ledger.snapshot(),
            "evidence": {w: list(ev) for w, ev in self.evidence.items()}, "my_votes": self.bans.my_votes,
            "averaging_upheld": dict(self.averaging_upheld), "resumed": self.resumed,
        })

    def _resume_from_journal(self) -> int:
        """Load the journal of this run and identity, if any; returns the last completed step.

        The step that was in flight when the process died is driven again from its first
        micro-batch (its micro-batches count once, as retried). The screening references start
        afresh, like a new verifier's; strikes, evidence and votes carry over.
        """
        path = self.journal_path
        if path is None or not path.exists():
            return 0
        try:
            j = json.loads(path.read_text())
            if j.get("run") != self.run or j.get("peer") != self.runtime.peer_id:
                logger.warning("not resuming from %s: it is another run's or another identity's journal", path)
                return 0
            step = int(j["step"])
            if not 0 <= step <= self.steps:
                raise ValueError(f"step {step} outside 0..{self.steps}")
            train = [(int(s), float(v)) for s, v in j.get("train_losses", [])]
            val = [(int(s), float(v)) for s, v in j.get("val_losses", [])]
            accounting = dict(j.get("accounting", {}))
        except (OSError, ValueError, TypeError, KeyError) as e:
            logger.warning("not resuming from the unreadable journal %s: %s", path, e)
            return 0
        self.step, self.train_losses, self.val_losses, self.prior = step, train, val, accounting
        self.tokens = int(j.get("tokens", 0))
        self.train_seconds = float(j.get("train_seconds", 0.0))
        self.flag_counts.update({str(k): int(v) for k, v in j.get("flags", {}).items()})
        self.ledger.restore(j.get("ledger", {}))
        for w, ev in j.get("evidence", {}).items():
            self.evidence[str(w)].extend(ev[-4:])
        self.bans.my_votes.update({str(k): v for k, v in j.get("my_votes", {}).items() if isinstance(v, dict)})
        self.averaging_upheld.update({str(k): int(v) for k, v in j.get("averaging_upheld", {}).items()})
        self.resumed = [*j.get("resumed", []), {"after_step": step, "retried_step": step + 1}]
        print(f"verifier resumed from {path} after step {step}; step {step + 1} is driven again", flush=True)
        return step

    def report(self) -> dict[str, Any]:
        acc = self._accounting()
        flag_rates = self.screener.flag_rates() if self.screener is not None else {}
        return {
            "role": "verifier",
            "peer": self.runtime.peer_id,
            "run": self.run,
            "steps": self.step,
            "tokens": self.tokens,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else 0.0,
            "train_loss": self.train_losses,
            "train_loss_first": self.train_losses[0][1] if self.train_losses else None,
            "train_loss_last": self.train_losses[-1][1] if self.train_losses else None,
            "val_loss": self.val_losses,
            "val_loss_first": self.val_losses[0][1] if self.val_losses else None,
            "val_loss_last": self.val_losses[-1][1] if self.val_losses else None,
            "micro_batches": acc,
            "resumed": self.resumed,
            "step_seconds": self.step_seconds,
            "hop_failures": dict(self.driver.hop_failures),
            "flags": dict(self.flag_counts),
            "flags_cleared": self.driver.flags_cleared,
            "flags_tied": self.driver.flags_tied, "witness_hops": self.driver.witness_hops,
            "flag_rates": flag_rates,
            "screen_events": self.screener.counters() if self.screener is not None else {},
            "strikes": {w: self.ledger.state(w).strikes for w in sorted(self.evidence)},
            "averaging_upheld": dict(self.averaging_upheld),
            "my_votes": sorted(self.bans.my_votes),
            "committee": self.bans.committee,
            "banned": [vars(b) for b in self.bans.effective.values()],
            "screening": self.screening,
            "screen_seconds": round(self.driver.screen_seconds, 4),
            "replica_agreement": self.agreement,
            "metrics": METRICS.snapshot(),
        }


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomic write: readers (the swarm launcher polls these files) never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1, default=str))
    os.replace(tmp, p)


def _brief(d: dict[str, float] | None) -> str:
    return "-" if not d else " ".join(f"{k}={v:.3g}" for k, v in d.items() if v is not None)


def _finite(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
