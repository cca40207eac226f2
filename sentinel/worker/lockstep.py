"""Lockstep stages: a stage's replicas apply one agreed gradient per numbered version.

Honest replicas of a stage then hold bit-identical parameters and optimizer state at every
version, so any hop can be re-checked exactly on another replica. The rules, from one replica's
side (``TrainingConfig.sync = "lockstep"``):

1. Backward passes served at version ``v`` only accumulate gradients.
2. Version ``v`` closes when a pipeline request of a later step than any seen before arrives
   (its verifier finished the step), or when a replica asks for my version-``v`` gradient.
   Closing snapshots the accumulated gradient and the digest of the parameters at ``v``.
3. The round for ``v``: fetch every live replica's version-``v`` gradient (asking closes ``v``
   there too), combine the non-empty ones in peer-id order with the run's rule (so every replica
   computes the same bits), apply that one gradient: version ``v + 1``. A round no replica
   served a pass in advances the version without an update.
4. Requests wait while a round is in flight: no pass is computed at a half-applied version.
5. A replica whose digest at ``v`` differs from a strict majority of the round's, or that finds
   its replicas already past ``v``, re-syncs: it adopts a majority replica's parameters,
   optimizer moments and version (``sentinel.state``). Without a strict majority (a stage of
   two) the replica with the smallest peer id is the reference. Divergence is repaired, never
   struck.
6. A joining replica adopts the version most live replicas share.

7. Every contribution that is an outlier of the round (``contribution_scores`` above the
   screen's ``averaging_outlier_ratio``) is re-checked before it is applied: the replica fetches
   the passes the contributor accumulated (``sentinel.passes``: the verifiers' own signed
   backward requests, so nobody can invent an input) and recomputes them at its identical
   version. Equal bits confirm the contribution; other bits, or passes it cannot produce, leave
   it out of the round on every honest replica alike, and a proven difference goes to the
   verifiers with its evidence (``kind = "gradient"`` complaint). Outliers are never struck for
   being outliers: an honest replica downstream of a corrupted hop carries the corruption in its
   gradient (BENCHMARKS.md, "Lockstep stages in the simulator"), and it recomputes to itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from sentinel.metrics import METRICS
from sentinel.model.stages import arithmetic_signature
from sentinel.net.runtime import PeerCallError, SwarmRuntime
from sentinel.protocol import rpc as wire
from sentinel.protocol.aggregation import aggregate, contribution_outliers, partition
from sentinel.protocol.checks import MessageChecker, TensorSpec
from sentinel.protocol.codec import Message
from sentinel.protocol.errors import MalformedMessageError, ProtocolError, WrongSenderError
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import RunManifest
from sentinel.worker.replica import Replica

logger = logging.getLogger(__name__)

# Closed versions whose gradient a replica keeps for peers still running that round.
KEPT_VERSIONS = 4
# A replica's "I closed this version on step s" moves my own boundary at most this far ahead.
OPENED_AHEAD = 16
# A re-sync asks a replica still applying the round this many times for the newer state.
RESYNC_TRIES = 5
# A round waits this long for a replica's gradient before leaving it out (it re-syncs later).
ROUND_TIMEOUT_S = 20.0


@dataclass
class Snapshot:
    """One replica's contribution to the round of ``version``."""

    version: int
    grad: torch.Tensor  # mean parameter gradient of its passes, flat float32
    count: int  # backward passes it averages (0: an empty contribution)
    digest: str  # of the parameters at ``version``
    device: str = ""  # the arithmetic it was computed on (``arithmetic_signature``)
    replies: list[Message] = field(default_factory=list)  # its signed gradient replies, one per part


@dataclass
class LockstepStats:
    rounds: int = 0
    empty_rounds: int = 0
    resyncs: int = 0
    left_out: int = 0  # replicas a round went without (no answer, behind)
    round_seconds: float = 0.0
    contributions_checked: int = 0  # outlier contributions this replica re-checked
    contributions_proven: int = 0  # of which its passes compute other bits (left out, reported)
    contributions_unverified: int = 0  # of which left out unchecked: passes not produced, other arithmetic


class NotReplicaError(WrongSenderError):
    reason = "not_a_replica"


class Lockstep:
    """One worker's side of its stage's lockstep rounds; the worker routes requests through it."""

    def __init__(self, runtime: SwarmRuntime, checker: MessageChecker, manifest: RunManifest, replica: Replica,
                 run_blocking: Callable[..., Awaitable], replicas: Callable[[], Awaitable[list[str]]],
                 claimants: Callable[[], Awaitable[list[str]]],
                 contribution: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                 is_verifier: Callable[[str], Awaitable[bool]] | None = None,
                 report: Callable[[Message], None] | None = None):
        self.runtime = runtime
        self.checker = checker
        self.manifest = manifest
        self.run = manifest.run_id
        self.replica = replica
        self._in_thread = run_blocking
        self._live_replicas = replicas  # the other ONLINE, non-banned replicas of my stage
        self._claimants = claimants  # every peer claiming my stage (who may ask for my gradient)
        self._contribution = contribution  # what an averaging attacker makes of its gradient
        self._is_verifier = is_verifier  # may this peer drive pipeline requests (their signer)?
        self._report = report  # signs a complaint and sends it to the verifiers
        # the signed backward requests accumulated at each kept version, in accumulation order
        # (appended on the compute thread): what a replica re-checking my contribution recomputes
        self._passes: dict[int, list[Message]] = {}
        self._passes_lock = threading.Lock()
        self.open_step = 0  # the newest pipeline step this replica accumulates passes for
        self._snapshots: dict[int, asyncio.Future] = {}
        self._round: asyncio.Task | None = None
        # the flat state last served to a re-syncing replica, by (version, parameter epoch):
        # one copy serves every part of a fetch
        self._state: tuple[tuple[int, int], torch.Tensor, list[int]] | None = None
        self.stats = LockstepStats()
        self._claimants_at = (0.0, frozenset())
        self._arithmetic: str | None = None

    @property
    def runner(self):
        return self.replica.runner

    @property
    def part_numel(self) -> int:
        return self.manifest.training.averaging_part_numel

    # -- the worker's hooks ------------------------------------------------------------------------
    async def before(self, step: int) -> None:
        """Call before computing a pipeline request of ``step``: close the current version if
        ``step`` is new, then wait for any round in flight. The caller submits its compute right
        after this returns (no await between), so the pass lands at the settled version."""
        if step > self.open_step:
            if self.open_step > 0:
                self.close(self.runner.version)
            self.open_step = step
        await self.settled()

    def record_pass(self, version: int, request: Message) -> None:
        """On the compute thread, right after a training backward accumulated at ``version``."""
        with self._passes_lock:
            self._passes.setdefault(version, []).append(request)

    def _device(self) -> str:
        if self._arithmetic is None:  # answers of equal (version, digest, arithmetic) must be bit-identical
            self._arithmetic = arithmetic_signature(self.runner.device)
        return self._arithmetic

    def stamp(self) -> dict[str, object]:
        """In the compute thread, right after a pass: the version it ran at and the digest of the
        parameters that computed it (``StageRunner.digest``: a replica changed between rounds,
        a fault, signs another digest, is re-synced, and is never taken for a liar by an exact
        check), for the signed reply."""
        return {"version": self.runner.version, "params_digest": self.runner.digest(), "device": self._device()}

    async def settled(self) -> None:
        while self._round is not None and not self._round.done():
            await asyncio.wait([self._round])

    async def digest(self) -> str:
        """The digest of the parameters now (``StageRunner.digest``, in the compute thread)."""
        return await self._in_thread(self.runner.digest)

    def reset(self) -> None:
        """After a move to another stage: nothing of the old stage's rounds carries over."""
        if self._round is not None:
            self._round.cancel()
        self._round, self._state, self._snapshots = None, None, {}
        with self._passes_lock:
            self._passes = {}
        self.open_step = 0

    # -- closing a version and its round -----------------------------------------------------------
    def close(self, version: int) -> asyncio.Future:
        """Snapshot ``version`` (once) and start its round; returns the snapshot's future."""
        snap = self._snapshots.get(version)
        if snap is not None:
            return snap
        snap = asyncio.ensure_future(self._snapshot(version))
        self._snapshots[version] = snap
        self._state = None  # a served state copy is stale from this round on
        for old in [v for v in self._snapshots if v < version - KEPT_VERSIONS]:
            del self._snapshots[old]
        with self._passes_lock:
            for old in [v for v in self._passes if v < version - KEPT_VERSIONS]:
                del self._passes[old]
        self._round = asyncio.create_task(self._run_round(version, snap, self._round))
        return snap

    async def _snapshot(self, version: int) -> Snapshot:
        runner = self.runner

        def take() -> tuple[torch.Tensor, int, str]:
            if runner.version != version:
                raise RuntimeError(f"version {version} was already left (now {runner.version})")
            grad, count = runner.accumulated_gradient()
            return grad, count, runner.digest()

        grad, count, digest = await self._in_thread(take)
        return Snapshot(version, grad, count, digest, self._device())

    async def _run_round(self, version: int, snap: asyncio.Future, previous: asyncio.Task | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        t0 = time.perf_counter()
        try:
            own = await snap
            peers = await self._live_replicas()
            got = await asyncio.gather(*(self._fetch_gradient(p, version) for p in peers))
            contributions = {self.runtime.peer_id: own}
            ahead: list[str] = []
            for peer, answer in zip(peers, got, strict=True):
                if isinstance(answer, Snapshot):
                    contributions[peer] = answer
                elif isinstance(answer, int) and answer > version:
                    ahead.append(peer)
                else:
                    self.stats.left_out += 1
                    if answer is not None:
                        logger.info("version %d round without %s: it is at version %d", version, peer[-8:], answer)
            refused = await self._check_contributions(version, contributions)
            await self._apply(version, {p: c for p, c in contributions.items() if p not in refused})
            source = self._resync_source(own.digest, contributions, ahead)
            if source:
                await self._resync(source, at_least=version + 1)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed round leaves this replica behind; it re-syncs next
            logger.warning("lockstep round for version %d failed: %s", version, e)
            METRICS.inc("sentinel_lockstep_failures_total")
        finally:
            self.stats.round_seconds += time.perf_counter() - t0

    async def _check_contributions(self, version: int, contributions: dict[str, Snapshot]) -> set[str]:
        """Re-check the round's outlier contributions (rule 7); returns those left out."""
        screen = self.manifest.screening
        used = sorted(p for p, c in contributions.items() if c.count > 0)
        flags = contribution_outliers([contributions[p].grad for p in used], screen.averaging_outlier_ratio,
                                      screen.averaging_outlier_floor)
        refused: set[str] = set()
        for peer, flagged in zip(used, flags, strict=True):
            if not flagged or peer == self.runtime.peer_id:
                continue
            self.stats.contributions_checked += 1
            METRICS.inc("sentinel_lockstep_contribution_checks_total")
            verdict = await self._recheck(version, peer, contributions[peer])
            if verdict is not False:
                refused.add(peer)
                self.stats.contributions_proven += verdict is True
                self.stats.contributions_unverified += verdict is None
        return refused

    async def _recheck(self, version: int, peer: str, snap: Snapshot) -> bool | None:
        """Recompute ``peer``'s contribution from the passes it claims. False: the same bits;
        True: other bits (reported to the verifiers); None: it could not be checked (its passes
        not produced or not a verifier's, or another arithmetic: no exact comparison)."""
        if snap.device != self._device():
            logger.info("cannot re-check %s's contribution to version %d exactly: it computes on %s",
                        peer[-8:], version, snap.device)
            return None
        if snap.digest != await self.digest():  # computed on other parameters: nothing to compare with
            logger.info("outlier contribution of %s to version %d left out: it signs other parameters",
                        peer[-8:], version)
            return None
        try:
            passes = await self._fetch_passes(peer, version, snap.count)
        except (PeerCallError, ProtocolError) as e:
            logger.info("outlier contribution of %s to version %d left out: its passes did not check (%s)",
                        peer[-8:], version, e)
            return None
        runner = self.runner

        def recompute() -> tuple[torch.Tensor, torch.Tensor] | None:
            if runner.version != version:
                return None
            grad, _ = runner.recompute_gradient([_pass_tensors(m) for m in passes])
            return grad, runner.flat_parameters()

        done = await self._in_thread(recompute)
        if done is None:
            return None
        grad, params = done
        if torch.equal(grad, snap.grad):
            return False
        logger.warning("contribution of %s to version %d is not what its own passes compute: left out, "
                       "reported to the verifiers", peer[-8:], version)
        METRICS.inc("sentinel_lockstep_contributions_proven_total")
        if self._report is not None:
            self._report(gradient_complaint(self.run, self.replica.step, self.replica.stage, version, peer,
                                            snap.replies, snap.grad, passes, params))
        return True

    async def _apply(self, version: int, contributions: dict[str, Snapshot]) -> None:
        used = [contributions[p] for p in sorted(contributions) if contributions[p].count > 0]
        runner = self.runner
        grad = None
        rule = self.manifest.training.averaging
        if used and rule == "mean":  # weighted by passes: the mean gradient of every pass the stage served
            total = sum(s.count for s in used)
            grad = torch.zeros_like(used[0].grad)
            for s in used:
                grad += s.grad * (s.count / total)
        elif used:
            grad = aggregate([s.grad for s in used], rule)
        self.stats.empty_rounds += grad is None

        def step() -> None:
            if runner.version != version:
                return
            if grad is None:
                runner.skip_step()
            else:
                runner.apply_gradient(grad)
        await self._in_thread(step)
        self.stats.rounds += 1
        METRICS.inc("sentinel_lockstep_rounds_total")

    def _resync_source(self, mine: str, contributions: dict[str, Snapshot], ahead: list[str]) -> list[str]:
        """Replicas to re-sync from, best first (empty: this replica agrees with its stage)."""
        if ahead:
            return ahead
        counts = Counter(s.digest for s in contributions.values())
        digest, n = counts.most_common(1)[0]
        if n * 2 <= len(contributions):
            # no strict majority (two honest replicas, one of which missed the other's gradient
            # once): every replica takes the state of the smallest peer id, so the stage
            # converges; with an honest majority per stage no attacker can hold such a tie
            digest = contributions[min(contributions)].digest
        if digest != mine:
            logger.warning("stage %d version %d: my parameters differ from %d of %d replicas; re-syncing",
                           self.replica.stage, next(iter(contributions.values())).version, counts[digest],
                           len(contributions))
            return sorted(p for p, s in contributions.items() if s.digest == digest)
        return []

    # -- re-sync and join ------------------------------------------------------------------------------
    async def _resync(self, sources: list[str], at_least: int = 0) -> bool:
        """Adopt the state of the first of ``sources`` that serves one at version ``at_least``
        or later (a replica still applying the round is asked again shortly)."""
        for peer in sources:
            for attempt in range(RESYNC_TRIES):
                try:
                    flat, steps, version, digest = await self._fetch_state(peer)
                except (PeerCallError, ProtocolError, ValueError) as e:
                    logger.info("re-sync from %s failed: %s", peer[-8:], e)
                    version = -1
                    break
                if version >= at_least:
                    break
                await asyncio.sleep(0.2 * (attempt + 1))
            if version < at_least:
                continue
            runner = self.runner
            await self._in_thread(runner.load_flat_state, flat, steps, version)
            mine = await self.digest()
            if mine != digest:
                logger.warning("state from %s does not hash to the digest it signed; trying another", peer[-8:])
                continue
            self._snapshots = {v: f for v, f in self._snapshots.items() if v < version}
            self.stats.resyncs += 1
            METRICS.inc("sentinel_lockstep_resyncs_total")
            logger.info("stage %d re-synced from %s at version %d", self.replica.stage, peer[-8:], version)
            return True
        return False

    async def join(self, statuses: dict[str, dict]) -> bool:
        """Adopt the (version, digest) most live replicas report, if it is ahead of mine."""
        held = Counter((s["lockstep_version"], s["params_digest"]) for s in statuses.values()
                       if isinstance(s.get("lockstep_version"), int) and isinstance(s.get("params_digest"), str))
        if not held:
            return False
        (version, digest), _ = max(held.items(), key=lambda kv: (kv[1], kv[0][0]))
        if version <= self.runner.version and digest == await self.digest():
            return False
        self.open_step = max([self.open_step, *(int(s.get("step", 0)) for s in statuses.values())])
        return await self._resync(sorted(p for p, s in statuses.items()
                                         if (s.get("lockstep_version"), s.get("params_digest")) == (version, digest)))

    # -- calls to replicas ---------------------------------------------------------------------------
    async def _fetch_gradient(self, peer: str, version: int) -> Snapshot | int | None:
        """``peer``'s version-``version`` gradient; the version it is at if it has none (an int);
        None when it did not answer properly."""
        n = self.runner.num_parameters()
        parts, count, digest, device = [], 0, "", ""
        replies: list[Message] = []
        for lo, hi in partition(n, 1, self.part_numel):
            try:
                for attempt in range(2):  # a cut stream: try once more, or both replicas must re-sync
                    req = sign_message(wire.request(self.run, self.replica.step, 0, self.replica.stage, "gradient",
                                                    {}, version=version, opened=self.open_step, part=[lo, hi]),
                                       self.runtime.identity)
                    try:
                        resp = await self.runtime.call(peer, wire.GRADIENT, req, ROUND_TIMEOUT_S)
                        break
                    except (PeerCallError, ProtocolError):
                        if attempt:
                            raise
                h = resp.header
                have = h.get("have") is True
                spec = {"grad": TensorSpec("float32", (hi - lo,))} if have else {}
                self.checker.check(resp, expected_sender=peer, expected=spec, check_replay=False)
                if h.get("in_reply_to") != req.header["digest"] or h.get("direction") != "gradient_result":
                    raise ProtocolError("gradient reply is not bound to this request")
                at = h.get("version")
                if not isinstance(at, int) or isinstance(at, bool):
                    raise MalformedMessageError("gradient reply without an integer version")
                if not have:
                    return at
                c, d, dev = h.get("count"), h.get("params_digest"), h.get("device", "")
                if at != version or not isinstance(c, int) or c < 0 or not isinstance(d, str) or \
                        not isinstance(dev, str) or (parts and (c, d, dev) != (count, digest, device)):
                    raise MalformedMessageError("gradient reply parts disagree on version, count, digest or device")
            except (PeerCallError, ProtocolError) as e:
                logger.info("gradient of version %d from %s failed: %s", version, peer[-8:], e)
                return None
            parts.append(resp.tensors["grad"])
            replies.append(resp)
            count, digest, device = c, d, dev
        return Snapshot(version, torch.cat(parts), count, digest, device, replies)

    async def _fetch_passes(self, peer: str, version: int, count: int) -> list[Message]:
        """The ``count`` backward requests ``peer`` says it accumulated at ``version``, each checked
        as what it claims to be: signed by an announced verifier, a training backward of my
        stage with the manifest's tensors, none twice."""
        out: list[Message] = []
        seen: set[bytes] = set()
        specs = wire.request_specs(self.manifest, self.replica.stage, wire.BACKWARD)

        async def fetch(index: int) -> tuple[Message, Message]:
            req = sign_message(wire.request(self.run, self.replica.step, 0, self.replica.stage, "passes", {},
                                            version=version, index=index), self.runtime.identity)
            return req, await self.runtime.call(peer, wire.PASSES, req, ROUND_TIMEOUT_S)

        # all at once: requests wait while this round is in flight
        got = await asyncio.gather(*(fetch(i) for i in range(count)), return_exceptions=True)
        for answer in got:
            if isinstance(answer, BaseException):
                raise answer
        for req, resp in got:
            self.checker.check(resp, expected_sender=peer, expected=specs, check_replay=False)
            h = resp.header
            if h.get("in_reply_to") != req.header["digest"] or h.get("direction") != "passes_result":
                raise ProtocolError("passes reply is not bound to this request")
            header, names = h.get("request"), h.get("tensor_names")
            if not isinstance(header, dict) or not isinstance(names, list) or sorted(names) != sorted(resp.tensors):
                raise MalformedMessageError("passes reply without the request's header and tensor names")
            original = Message(header=dict(header), tensors={n: resp.tensors[n] for n in names})
            signer = header.get("sender")
            self.checker.check(original, expected_sender=signer if isinstance(signer, str) else "",
                               expected=specs, check_replay=False)
            oh = original.header
            if oh.get("direction") != "backward" or oh.get("mode", "train") != "train" or \
                    oh.get("stage") != self.replica.stage or oh.get("run") != self.run:
                raise ProtocolError("a claimed pass is not a training backward of this stage")
            if self._is_verifier is not None and not await self._is_verifier(signer):
                raise ProtocolError(f"a claimed pass was signed by {str(signer)[-8:]}, not a verifier of the run")
            if oh["digest"] in seen:
                raise ProtocolError("a claimed pass appears twice")
            seen.add(oh["digest"])
            out.append(original)
        return out

    async def _fetch_state(self, peer: str) -> tuple[torch.Tensor, list[int], int, str]:
        n = self.runner.num_parameters()
        chunks, first = [], None
        for lo, hi in partition(3 * n, 1, self.part_numel):
            req = sign_message(wire.request(self.run, self.replica.step, 0, self.replica.stage, "state", {},
                                            part=[lo, hi]), self.runtime.identity)
            resp = await self.runtime.call(peer, wire.STATE, req, ROUND_TIMEOUT_S)
            self.checker.check(resp, expected_sender=peer, expected={"state": TensorSpec("float32", (hi - lo,))},
                               check_replay=False)
            h = resp.header
            if h.get("in_reply_to") != req.header["digest"] or h.get("direction") != "state_result":
                raise ProtocolError("state reply is not bound to this request")
            meta = (h.get("version"), h.get("params_digest"), h.get("adam_steps"))
            if first is None:
                first = meta
            elif meta != first:  # the peer stepped between two parts: start over from it later
                raise ValueError("the replica's version changed while its state was fetched")
            chunks.append(resp.tensors["state"])
        version, digest, steps = first
        if not (isinstance(version, int) and isinstance(digest, str) and isinstance(steps, list)
                and all(isinstance(s, int) for s in steps)):
            raise MalformedMessageError("state reply without version, params_digest and adam_steps")
        return torch.cat(chunks), steps, version, digest

    # -- handlers ----------------------------------------------------------------------------------
    def _part(self, msg: Message, total: int) -> tuple[int, int]:
        part = msg.header.get("part")
        if not (isinstance(part, list) and len(part) == 2 and tuple(part) in partition(total, 1, self.part_numel)):
            raise MalformedMessageError(f"part must be one of the parts of {total} values a round fetches, "
                                        f"got {part!r:.80}")
        return part[0], part[1]

    async def _check_replica(self, remote: str) -> None:
        at, known = self._claimants_at
        if remote not in known and time.monotonic() - at > 1.0:
            known = frozenset(await self._claimants())
            self._claimants_at = (time.monotonic(), known)
        if remote not in known:
            raise NotReplicaError(f"{remote[-8:]} does not claim stage {self.replica.stage}")

    async def on_gradient(self, msg: Message, remote: str) -> Message:
        await self._check_replica(remote)
        version = msg.header.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise MalformedMessageError(f"version must be an integer >= 0, got {version!r:.40}")
        lo, hi = self._part(msg, self.runner.num_parameters())
        if version > self.runner.version:  # finish the round in flight, then look again
            await self.settled()
        current = self.runner.version
        snap = self._snapshots.get(version)
        if snap is None and version == current:
            # the requester closed ``version`` on seeing step ``opened``: passes of that step
            # belong to the next version here too (bounded, so no replica can freeze my steps)
            opened = msg.header.get("opened")
            if isinstance(opened, int) and not isinstance(opened, bool) and \
                    self.open_step < opened <= self.open_step + OPENED_AHEAD:
                self.open_step = opened
            snap = self.close(version)
        if snap is None:
            if version > current:  # my replicas are past me: I fell behind
                logger.info("stage %d: a replica is at version %d, I am at %d; re-syncing",
                            self.replica.stage, version, current)
                self._schedule_resync(remote, version)
            return sign_message(wire.reply(msg, "gradient_result", {}, have=False, version=current),
                                self.runtime.identity)
        s: Snapshot = await snap
        grad = s.grad[lo:hi]
        if self._contribution is not None:
            grad = self._contribution(grad, f"{version}|{lo}")
        return sign_message(wire.reply(msg, "gradient_result", {"grad": grad.contiguous()}, have=True,
                                       version=version, count=s.count, params_digest=s.digest, device=s.device),
                            self.runtime.identity)

    async def on_passes(self, msg: Message, remote: str) -> Message:
        """One backward request I accumulated at ``version``, as its verifier signed it."""
        await self._check_replica(remote)
        version, index = msg.header.get("version"), msg.header.get("index")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (version, index)):
            raise MalformedMessageError(f"version and index must be integers >= 0, got {version!r:.20}, {index!r:.20}")
        with self._passes_lock:
            kept = self._passes.get(version, [])
            original = kept[index] if index < len(kept) else None
        if original is None:
            raise ProtocolError(f"no pass {index} at version {version} here")
        return sign_message(wire.reply(msg, "passes_result", dict(original.tensors), request=dict(original.header),
                                       tensor_names=list(original.tensors)), self.runtime.identity)

    def _schedule_resync(self, peer: str, at_least: int) -> None:
        if self._round is None or self._round.done():
            previous = self._round
            self._round = asyncio.create_task(self._resync_after(previous, peer, at_least))

    async def _resync_after(self, previous: asyncio.Task | None, peer: str, at_least: int) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        try:
            await self._resync([peer], at_least)
        except Exception as e:  # noqa: BLE001 - it tries again at the next round
            logger.warning("re-sync failed: %s", e)

    async def on_state(self, msg: Message, remote: str) -> Message:
        await self._check_replica(remote)
        runner = self.runner
        lo, hi = self._part(msg, 3 * runner.num_parameters())
        await self.settled()

        def take() -> tuple[torch.Tensor, list[int], int, str]:
            key = (runner.version, runner.param_epoch())
            if self._state is None or self._state[0] != key:
                self._state = (key, *runner.flat_state())
            _, flat, steps = self._state
            return flat[lo:hi].clone(), steps, runner.version, runner.digest()

        flat, steps, version, digest = await self._in_thread(take)
        return sign_message(wire.reply(msg, "state_result", {"state": flat.contiguous()}, version=version,
                                       params_digest=digest, adam_steps=steps), self.runtime.identity)


def gradient_complaint(run: str, step: int, stage: int, version: int, accused: str, replies: list[Message],
                       grad: torch.Tensor, passes: list[Message], params: torch.Tensor) -> Message:
    """The (unsigned) evidence that ``accused`` signed a contribution its own passes do not
    compute: its signed gradient replies (headers; the whole gradient as ``grad``), the verifiers'
    signed backward requests it accumulated (headers; tensors stacked as ``pass_x`` ...), and the
    stage's parameters at ``version``, which must hash to the digest ``accused`` signed, so a
    verifier recomputes the contribution itself (``ComplaintDesk.judge_gradient``)."""
    tensors = {"params": params, "grad": grad}
    for name in ("x", "grad", "targets"):
        if passes and name in passes[0].tensors:
            tensors[f"pass_{name}"] = torch.stack([m.tensors[name] for m in passes])
    return wire.request(run, step, 0, stage, "complaint", tensors, kind="gradient", accused=accused,
                        version=version, evidence=[dict(r.header) for r in replies],
                        passes=[dict(m.header) for m in passes], pass_tensors=[list(m.tensors) for m in passes])


def _pass_tensors(request: Message) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, grad_out, targets) of a backward request, as the stage's backward reads them."""
    t = request.tensors
    return t["x"], t.get("grad"), t.get("targets")
