"""Butterfly averaging: each replica of a stage robustly reduces only its parts of the parameters.

A gather round costs each replica ``n - 1`` copies of its stage and needs the stage to fit in one
message. Here the flat parameters are cut into parts (:func:`~sentinel.protocol.aggregation.partition`),
part ``i`` owned by member ``i % n`` of the group sorted by peer id. From one requester's side:

1. Push my slice of each part to its owner in a signed ``reduce`` request naming the group; the
   owner answers with the part reduced by the run's rule and a signed commitment to the
   (contributor, digest) pairs it reduced.
2. Reduce myself the parts I own and those whose owner failed or was caught lying.
3. Audit a reducer's answers until one passes, every answer that moves my slice far more than the
   round's other parts do, and a random share ``averaging_audit``: fetch the committed slices
   (each signed by its contributor), check them and recompute. A mismatch is a provable lie,
   reported to the verifiers; I reduce that owner's parts myself from then on, this round's too.

The reducer (:meth:`Butterfly.on_reduce`) reuses slices pushed or pulled within
``averaging_reuse_s``, so each replica sends and receives about one copy of its stage a round, and
no message exceeds one part; it screens the slices like whole contributions and complains with the
outlier's own signed slice. Replicas average on their own clocks: two requesters' reductions of one
part may mix slices a few seconds apart (docs/design.md, "Butterfly rounds").
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from sentinel.metrics import METRICS
from sentinel.net.runtime import PeerCallError
from sentinel.protocol import rpc as wire
from sentinel.protocol.aggregation import (
    aggregate,
    canonical_part,
    contribution_scores,
    partition,
    same_reduction,
)
from sentinel.protocol.checks import MessageChecker, TensorSpec
from sentinel.protocol.codec import Message
from sentinel.protocol.errors import MalformedMessageError, ProtocolError, ShapeMismatchError
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import TrainingConfig
from sentinel.run.screening import ScreeningConfig
from sentinel.worker.replica import Replica

logger = logging.getLogger(__name__)

MAX_GROUP = 1024  # members one reduce request may name (a stage never has that many replicas)
# A pushed slice must be signed within this many pipeline steps of the reducer's own: it is the
# evidence of a complaint, and the verifiers refuse evidence older than a few steps.
PUSH_STEPS_BEHIND = 2
PUSH_STEPS_AHEAD = 8
# A reducer asked for a part waits this long for the other members' pushes before it pulls their
# slices: replicas that average together push within moments of each other, and a pull moves a
# slice that is about to arrive anyway.
PUSH_WAIT_S = 1.0
KNOWN_REPLICAS_S = 5.0  # how long a reducer trusts its last read of the stage's claims
# Reductions whose inputs are kept for audits (a reducer serves about parts * (n-1) / n answers
# a round; the inputs are mostly the same few signed slices, shared between entries)
KEEP_REDUCTIONS = 256
KEEP_REDUCTIONS_S = 60.0
# A committed slice must be signed within this many pipeline steps of the auditor's own: a
# reducer must not reduce a member's old parameters into a round (a rollback) undetected
AUDIT_STEPS_BEHIND = 16
# An answer that moves my slice more than this many times the round's median part does (or more
# than AUDIT_FLOOR of its norm, whichever is larger) is always audited: the same 3x-the-spread
# rule the contribution screen uses. A liar can then hide only lies below it, and each of those
# is still audited at the random share.
AUDIT_OUTLIER = 3.0
AUDIT_FLOOR = 0.005


class ReductionMismatch(ProtocolError):
    """A reducer's answer does not follow from the slices it committed to. ``proof`` holds the
    reducer's signed answer and the signed slices when the lie is provable to a third party."""

    reason = "reduction_mismatch"

    def __init__(self, message: str, proof: tuple[Message, list[Message]] | None = None) -> None:
        super().__init__(message)
        self.proof = proof


@dataclass
class _Kept:
    group: frozenset[str]
    inputs: list[Message]
    at: float


@dataclass
class _Answer:
    """A reducer's signed answer for one part of my round, kept until it is audited or not."""

    owner: str
    resp: Message
    committed: list[list]
    request: Message
    lo: int
    hi: int
    part: torch.Tensor


def _part_of(header: dict[str, Any]) -> tuple[int, int] | None:
    part = header.get("part")
    if not isinstance(part, list) or len(part) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in part):
        return None
    return part[0], part[1]


def _digest_of(msg: Message) -> bytes:
    return bytes(msg.header["digest"])


class Butterfly:
    """One worker's side of butterfly averaging: requester (:meth:`round`) and reducer
    (:meth:`on_reduce`, :meth:`on_audit`)."""

    def __init__(self, *, runtime: Any, checker: MessageChecker, run: str, training: TrainingConfig,
                 screen_config: ScreeningConfig, replica: Replica,
                 run_blocking: Callable[..., Awaitable[Any]],
                 contribution: Callable[..., torch.Tensor],
                 replicas: Callable[[], Awaitable[list[str]]],
                 banned: Callable[[], Awaitable[set[str]]],
                 complain: Callable[[str, Message, float], None],
                 report_lie: Callable[[str, Message, list[Message]], None]) -> None:
        """Everything a round uses, given explicitly: the node's ``runtime`` (calls, identity),
        its message ``checker``, the run's ``training`` and ``screen_config``, the live
        ``replica`` state (stage, step, runner), ``run_blocking(fn, *args)`` to run compute off
        the event loop, ``contribution(flat, tag, part)`` (what this replica contributes: its
        parameters, or an averaging attack's poison of them), ``replicas()`` and ``banned()``
        (the stage's announced replicas and the banned peers), ``complain(peer, evidence,
        score)`` (report a poisoned slice to the verifiers) and ``report_lie(reducer, answer,
        inputs)`` (report a reduction its committed inputs contradict)."""
        self.runtime = runtime
        self.checker = checker
        self.run = run
        self.screen_config = screen_config
        self.replica = replica
        self.run_blocking = run_blocking
        self.contribution = contribution
        self.replicas = replicas
        self.banned = banned
        self.complain = complain
        self.report_lie = report_lie
        t = training
        self.rule = t.averaging
        self.part_numel = t.averaging_part_numel
        self.reuse_s = t.averaging_reuse_s
        self.audit_share = t.averaging_audit
        # (lo, hi) -> contributor -> (when it arrived, its signed slice)
        self._slices: dict[tuple[int, int], dict[str, tuple[float, Message]]] = {}
        self._kept: OrderedDict[bytes, _Kept] = OrderedDict()  # reduction digest -> its inputs
        self._pulling: dict[tuple[str, int, int], asyncio.Future] = {}  # pulls in flight, shared
        self._arrivals: dict[tuple[int, int], asyncio.Condition] = {}  # notified on every push of a part
        self._complained: OrderedDict[bytes, None] = OrderedDict()  # slices already reported
        self._audited: set[str] = set()  # reducers that have passed an audit
        self.distrusted: set[str] = set()  # reducers caught lying: their parts are reduced here
        self._own: tuple[tuple[int, int], torch.Tensor] | None = None
        self._known: tuple[float, set[str]] | None = None  # (when read, replicas of my stage)
        self._own_slices: dict[tuple, Message] = {}  # my signed slices of the current parameter state
        # recent reductions by their exact inputs ((contributor, digest), ...), shared
        self._reductions: OrderedDict[tuple, asyncio.Future] = OrderedDict()
        self._rng = random.SystemRandom()  # a reducer must not be able to predict which answers get audited
        self.stats = {"parts_pushed": 0, "parts_reduced": 0, "parts_served": 0, "slices_pulled": 0,
                      "slices_reused": 0, "reductions_shared": 0, "audits": 0, "lies_caught": 0,
                      "fallbacks": 0}

    # -- my own slices ---------------------------------------------------------------------------
    async def _own_flat(self) -> torch.Tensor:
        """My current flat parameters, as contributed (an attacker's poison included); cached
        until my parameters next change, since every part of a round needs them."""
        r = self.replica.runner
        key = (r.version, r.stats.averaging_rounds)
        if self._own is None or self._own[0] != key:
            flat = await self.run_blocking(r.flat_parameters)
            self._own = (key, self.contribution(flat, "contribution"))
        return self._own[1]

    def _sign_slice(self, flat: torch.Tensor, lo: int, hi: int, direction: str, **extra: Any) -> Message:
        msg = wire.request(self.run, self.replica.step, 0, self.replica.stage, direction, {"params": flat[lo:hi].contiguous()},
                           part=[lo, hi], version=self.replica.runner.version, **extra)
        return sign_message(msg, self.runtime.identity)

    # -- requester -------------------------------------------------------------------------------
    async def round(self, peers: list[str], timeout: float = 30.0) -> torch.Tensor:
        """One averaging round with ``peers`` (live, non-banned replicas): the aggregate of the
        whole flat parameters, assembled part by part."""
        me = self.runtime.peer_id
        group = sorted({me, *peers})
        numel = self.replica.runner.num_parameters()
        parts = partition(numel, len(group), self.part_numel)
        own = await self._own_flat()

        # parts go out in order, a few at a time: requesters averaging together then push each
        # part at about the same moment, so its reducer finds the slices it needs already pushed
        in_flight = asyncio.Semaphore(max(2, len(group)))
        answers: dict[int, _Answer] = {}

        async def one(i: int, lo: int, hi: int) -> torch.Tensor:
            async with in_flight:
                owner = group[i % len(group)]
                if owner != me and owner not in self.distrusted:
                    try:
                        answers[i] = await self._ask(owner, own, lo, hi, group, timeout)
                        return answers[i].part
                    except ReductionMismatch as e:
                        self._caught(owner, lo, hi, e)
                    except (PeerCallError, ProtocolError, asyncio.TimeoutError) as e:
                        self._failed(owner, lo, hi, e)
                # mine: wait for the others' pushes; someone else's: nobody pushes it to me
                return await self.reduce(lo, hi, group, None, timeout, wait=owner == me)

        reduced = list(await asyncio.gather(*(one(i, lo, hi) for i, (lo, hi) in enumerate(parts))))

        # which answers to audit: a reducer's until one audit of it has passed, a random share,
        # and every answer that moves my slice more than AUDIT_OUTLIER times the round's median
        # part does (a liar's part stands out among the honest ones, mine included; an outlier
        # audited and found honest costs only the audit)
        moved = [float((r - own[lo:hi]).norm() / own[lo:hi].norm().clamp_min(1e-12))
                 for r, (lo, hi) in zip(reduced, parts, strict=True)]
        bound = max(AUDIT_OUTLIER * sorted(moved)[len(moved) // 2], AUDIT_FLOOR)
        due = [i for i, a in answers.items()
               if a.owner not in self._audited or moved[i] > bound or self._rng.random() < self.audit_share]

        async def audit(i: int) -> bool:
            a = answers[i]
            async with in_flight:
                try:
                    await self._audit(a.owner, a.resp, a.committed, a.lo, a.hi, a.request, timeout)
                    self._audited.add(a.owner)
                    return True
                except ReductionMismatch as e:
                    self._caught(a.owner, a.lo, a.hi, e)
                except (PeerCallError, ProtocolError, asyncio.TimeoutError) as e:
                    self._failed(a.owner, a.lo, a.hi, e)
                return False

        passed = dict(zip(due, await asyncio.gather(*(audit(i) for i in due)), strict=True))
        # an answer whose audit did not pass, or from a reducer caught lying on another part,
        # is replaced by my own reduction of that part
        redo = [i for i, a in answers.items() if not passed.get(i, True) or a.owner in self.distrusted]
        again = await asyncio.gather(*(self.reduce(*parts[i], group, None, timeout, wait=False) for i in redo))
        for i, part in zip(redo, again, strict=True):
            reduced[i] = part
        return torch.cat(reduced)

    def _caught(self, owner: str, lo: int, hi: int, e: ReductionMismatch) -> None:
        self.stats["lies_caught"] += 1
        self.distrusted.add(owner)
        METRICS.inc("sentinel_averaging_reducer_lies_total")
        logger.warning("reducer %s lied about part [%d, %d) of stage %d (%s): reducing its parts here from now on",
                       owner[-8:], lo, hi, self.replica.stage, e)
        if e.proof is not None:
            self.report_lie(owner, *e.proof)

    def _failed(self, owner: str, lo: int, hi: int, e: Exception) -> None:
        self.stats["fallbacks"] += 1
        METRICS.inc("sentinel_averaging_failures_total", reason=getattr(e, "reason", "error"))
        logger.debug("reduce of [%d, %d) by %s failed: %s; reducing it here", lo, hi, owner[-8:], e)

    async def _ask(self, owner: str, own: torch.Tensor, lo: int, hi: int, group: list[str],
                   timeout: float) -> _Answer:
        """Push my slice of ``[lo, hi)`` to its owner and take its answer (not yet audited)."""
        req = self._sign_slice(own, lo, hi, "reduce", group=group)
        self.stats["parts_pushed"] += 1
        resp = await self.runtime.call(owner, wire.REDUCE, req, timeout)
        self.checker.check(resp, expected_sender=owner, expected={"part": TensorSpec("float32", (hi - lo,))},
                        check_replay=False)
        h = resp.header
        if h.get("in_reply_to") != req.header["digest"] or h.get("direction") != "reduce_result" \
                or _part_of(h) != (lo, hi) or h.get("stage") != self.replica.stage:
            raise ProtocolError("reduce reply is not bound to this request (in_reply_to/part/stage)")
        committed = h.get("contributions")
        if not isinstance(committed, list) or not all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], bytes)
                for c in committed):
            raise MalformedMessageError("reduce reply lacks its 'contributions' commitment")
        who = [c[0] for c in committed]
        if len(set(who)) != len(who) or not set(who) <= set(group) \
                or [self.runtime.peer_id, req.header["digest"]] not in committed:
            raise ReductionMismatch("committed to slices from outside the group, twice from one member, or not "
                                    "to the slice I pushed")
        if set(who) != set(group):
            # members it could not reach (or does not know yet): not a lie, but not an answer
            # either. A reducer free to leave members out could keep only its accomplices' slices
            # with mine, and a robust rule needs an honest majority of its inputs.
            raise PeerCallError(f"reduced {len(who)} slices of a group of {len(group)}", "incomplete")
        return _Answer(owner, resp, committed, req, lo, hi, resp.tensors["part"])

    async def _audit(self, owner: str, resp: Message, committed: list[list], lo: int, hi: int, mine: Message,
                     timeout: float) -> None:
        """Fetch every slice ``owner`` committed to (but ``mine``, the one I pushed), check each
        against its contributor's signature and the commitment, and recompute the reduction."""
        self.stats["audits"] += 1
        METRICS.inc("sentinel_averaging_audits_total")

        async def fetch(i: int) -> Message:
            if committed[i] == [self.runtime.peer_id, mine.header["digest"]]:
                return mine
            req = sign_message(wire.request(self.run, self.replica.step, 0, self.replica.stage, "reduce_audit", {},
                                            of=resp.header["digest"], index=i), self.runtime.identity)
            got = await self.runtime.call(owner, wire.REDUCE_AUDIT, req, timeout)
            self.checker.check(got, expected_sender=owner, expected={"params": TensorSpec("float32", (hi - lo,))},
                            check_replay=False)
            header = got.header.get("contribution")
            if got.header.get("in_reply_to") != req.header["digest"] or not isinstance(header, dict):
                raise ProtocolError("audit reply is not bound to this request")
            inner = Message(header=dict(header), tensors={"params": got.tensors["params"]})
            contributor, digest = committed[i]
            try:
                self._check_slice(inner, contributor, lo, hi)
            except ProtocolError as e:
                raise ReductionMismatch(f"committed slice {i} from {contributor[-8:]} does not check: {e}") from e
            if inner.header["digest"] != digest:
                raise ReductionMismatch(f"slice {i} is not the one committed to")
            if inner.header["step"] < self.replica.step - AUDIT_STEPS_BEHIND:
                raise PeerCallError(f"committed slice {i} from {contributor[-8:]} is of step {inner.header['step']}, "
                                    f"I am at {self.replica.step}", "stale_slice")
            return inner

        inputs = await asyncio.gather(*(fetch(i) for i in range(len(committed))))
        if not same_reduction(resp.tensors["part"], [m.tensors["params"] for m in inputs], self.rule):
            raise ReductionMismatch(f"its {self.rule} of the {len(inputs)} committed slices is not what it sent",
                                    proof=(resp, list(inputs)))

    def _check_slice(self, msg: Message, contributor: str, lo: int, hi: int) -> None:
        """A slice of this stage's parameters, signed by ``contributor``, for exactly ``[lo, hi)``."""
        self.checker.check(msg, expected_sender=contributor, expected={"params": TensorSpec("float32", (hi - lo,))},
                        check_replay=False)
        h = msg.header
        if h.get("direction") not in ("reduce", "params_result", "slice") or h.get("stage") != self.replica.stage \
                or _part_of(h) != (lo, hi):
            raise ProtocolError(f"not a slice [{lo}, {hi}) of stage {self.replica.stage}")

    # -- reducer ---------------------------------------------------------------------------------
    async def on_reduce(self, msg: Message, remote: str) -> Message:
        """Serve a requester's reduce: its pushed slice in, the signed reduction of that part out."""
        h = msg.header
        part = _part_of(h)
        numel = self.replica.runner.num_parameters()
        if part is None or not canonical_part(numel, self.part_numel, *part):
            raise MalformedMessageError(f"part must be one of the parts a round cuts {numel} parameters into "
                                        f"(at most {self.part_numel} long), got {h.get('part')!r:.80}")
        lo, hi = part
        if msg.tensors["params"].shape != (hi - lo,):
            raise ShapeMismatchError(f"a slice [{lo}, {hi}) must have {hi - lo} elements, got "
                                     f"{tuple(msg.tensors['params'].shape)}")
        group = h.get("group")
        if not isinstance(group, list) or not 2 <= len(group) <= MAX_GROUP \
                or not all(isinstance(p, str) for p in group) or len(set(group)) != len(group):
            raise MalformedMessageError("group must be a list of distinct peer ids")
        if h["stage"] != self.replica.stage or self.runtime.peer_id not in group or remote not in group:
            raise ProtocolError(f"a reduce for stage {h['stage']} by a group without both of us; I serve {self.replica.stage}")
        if not self.replica.step - PUSH_STEPS_BEHIND <= h["step"] <= self.replica.step + PUSH_STEPS_AHEAD:
            raise ProtocolError(f"pushed slice signed at step {h['step']}, I am at step {self.replica.step}")
        if h.get("direction") != "reduce":
            raise MalformedMessageError("a reduce request has direction 'reduce'")
        banned = await self.banned()
        if remote in banned:
            raise ProtocolError("banned replicas are not averaged with")
        # only replicas of my stage are served and pulled from: a stranger must not park slices
        # here, nor a group padded with made-up peers make me dial each of them
        known = await self._known_replicas()
        if remote not in known:
            raise ProtocolError(f"{remote[-8:]} is not a replica of stage {self.replica.stage} in the stage claims")
        self._slices.setdefault((lo, hi), {})[remote] = (time.monotonic(), msg)
        arrived = self._arrivals.setdefault((lo, hi), asyncio.Condition())
        async with arrived:
            arrived.notify_all()
        members = [p for p in group if p not in banned and (p in known or p == self.runtime.peer_id)]
        result = await self.reduce(lo, hi, members, msg)
        self.stats["parts_served"] += 1
        return result

    async def _known_replicas(self) -> set[str]:
        """The replicas of my stage in the DHT's stage claims, re-read at most every few seconds."""
        now = time.monotonic()
        if self._known is None or now - self._known[0] > KNOWN_REPLICAS_S:
            try:
                self._known = (now, set(await self.replicas()))
            except Exception as e:  # noqa: BLE001 - a DHT hiccup: keep the last view
                logger.debug("cannot read the stage's claims: %s", e)
                self._known = (now, self._known[1] if self._known else set())
        return self._known[1]

    async def reduce(self, lo: int, hi: int, group: list[str], request: Message | None,
                     timeout: float = 20.0, wait: bool = True) -> Any:
        """Reduce part ``[lo, hi)`` over ``group``'s slices: mine, reused or pulled ones. For a
        ``request`` the signed ``reduce_result`` (inputs kept for audits); else the tensor."""
        me = self.runtime.peer_id
        mine = await self._own_slice(lo, hi)
        now = time.monotonic()
        held = self._slices.setdefault((lo, hi), {})
        slices: dict[str, Message] = {me: mine}
        if request is not None:
            slices[request.header["sender"]] = request
        # first the slices of this very round: pushed within the last PUSH_WAIT_S, or arriving
        # within PUSH_WAIT_S from now (replicas averaging together push within moments of each
        # other, and then their requests reduce identical inputs, computed once); then older
        # slices up to averaging_reuse_s (a replica averaging on another clock); then pulls
        stale = self._take_fresh(group, held, slices, now, PUSH_WAIT_S)
        if stale and wait:
            arrived = self._arrivals.setdefault((lo, hi), asyncio.Condition())
            deadline = time.monotonic() + PUSH_WAIT_S
            while stale and time.monotonic() < deadline:
                async with arrived:
                    try:
                        await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())
                    except asyncio.TimeoutError:
                        pass
                stale = self._take_fresh(stale, held, slices, time.monotonic(), 2 * PUSH_WAIT_S)
        stale = self._take_fresh(stale, held, slices, time.monotonic(), self.reuse_s)
        if stale:
            got = await asyncio.gather(*(self._pull(p, lo, hi, timeout) for p in stale))
            slices.update({p: m for p, m in zip(stale, got, strict=True) if m is not None})
        self._prune(now)
        order = [p for p in group if p in slices]
        inputs = [slices[p] for p in order]
        agg = await self._aggregate(order, inputs)
        if request is None:
            return agg
        agg = self.contribution(agg, "reduction", (lo, hi))
        reply = wire.reply(request, "reduce_result", {"part": agg.contiguous()}, part=[lo, hi],
                           contributions=[[p, _digest_of(m)] for p, m in zip(order, inputs, strict=True)])
        sign_message(reply, self.runtime.identity)
        self._kept[_digest_of(reply)] = _Kept(frozenset(order), inputs, now)
        while len(self._kept) > KEEP_REDUCTIONS:
            self._kept.popitem(last=False)
        return reply

    async def _own_slice(self, lo: int, hi: int) -> Message:
        """My slice ``[lo, hi)``, signed once per parameter state: the same input to every
        reduction of that part until my parameters change, so those reductions can be shared."""
        own = await self._own_flat()
        state = self._own[0]
        got = self._own_slices.get((state, lo, hi))
        if got is None:
            if any(k[0] != state for k in self._own_slices):
                self._own_slices.clear()
            got = self._own_slices[(state, lo, hi)] = self._sign_slice(own, lo, hi, "slice")
        return got

    async def _aggregate(self, order: list[str], inputs: list[Message]) -> torch.Tensor:
        """The reduction of ``inputs``, computed once for requests that reduce the very same
        signed slices (replicas averaging together all ask for one part at about once)."""
        key = tuple((p, _digest_of(m)) for p, m in zip(order, inputs, strict=True))
        task = self._reductions.get(key)
        if task is None:
            task = asyncio.ensure_future(self.run_blocking(aggregate, [m.tensors["params"] for m in inputs], self.rule))
            self._reductions[key] = task
            task.add_done_callback(lambda t, key=key: t.cancelled() or t.exception() is None
                                   or self._reductions.pop(key, None))
            while len(self._reductions) > KEEP_REDUCTIONS:
                self._reductions.popitem(last=False)
            self.stats["parts_reduced"] += 1
            self._screen(order, inputs)
        else:
            self.stats["reductions_shared"] += 1
        return await asyncio.shield(task)

    def _take_fresh(self, members: list[str], held: dict[str, tuple[float, Message]], slices: dict[str, Message],
                    now: float, max_age: float) -> list[str]:
        """Move ``members``' slices held for at most ``max_age`` seconds into ``slices``; the rest."""
        stale = []
        for p in members:
            if p in slices:
                continue
            got = held.get(p)
            if got is not None and now - got[0] <= max_age:
                slices[p] = got[1]
                self.stats["slices_reused"] += 1
            else:
                stale.append(p)
        return stale

    async def _pull(self, peer: str, lo: int, hi: int, timeout: float) -> Message | None:
        """``peer``'s current slice ``[lo, hi)``, or None if it does not answer. Concurrent
        reductions of one part (requesters that average at the same moment) share one pull."""
        key = (peer, lo, hi)
        task = self._pulling.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_slice(peer, lo, hi, timeout))
            self._pulling[key] = task
            task.add_done_callback(lambda _t, key=key: self._pulling.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch_slice(self, peer: str, lo: int, hi: int, timeout: float) -> Message | None:
        from sentinel.net.view import fetch_params

        got, _ = await fetch_params(self.runtime, self.checker, self.run, self.replica.step, self.replica.stage, [peer], timeout=timeout,
                                    part=(lo, hi))
        if not got:
            return None
        self.stats["slices_pulled"] += 1
        msg = got[0][1]
        held = self._slices.setdefault((lo, hi), {})
        if peer not in held or held[peer][0] < time.monotonic() - self.reuse_s:  # a push may have arrived meanwhile
            held[peer] = (time.monotonic(), msg)
        return msg

    def _screen(self, order: list[str], inputs: list[Message]) -> None:
        """Complain about each slice that is an outlier among this part's contributions (once
        per signed slice), exactly as a gather round does with whole contributions."""
        cfg = self.screen_config
        if cfg.averaging_outlier_ratio <= 0 or len(inputs) < 3:
            return
        scores = contribution_scores([m.tensors["params"] for m in inputs], cfg.averaging_outlier_floor)
        for peer, msg, score in zip(order, inputs, scores, strict=True):
            if peer == self.runtime.peer_id or score <= cfg.averaging_outlier_ratio or _digest_of(msg) in self._complained:
                continue
            self._complained[_digest_of(msg)] = None
            while len(self._complained) > 4096:
                self._complained.popitem(last=False)
            logger.info("slice %s of %s is %.1f x the spread of stage %d: reporting it to the verifiers",
                        msg.header.get("part"), peer[-8:], score, self.replica.stage)
            self.complain(peer, msg, score)

    def _prune(self, now: float) -> None:
        """Drop old slices in place (a reduction waiting on a part holds its dict; parts are
        canonical, so the dicts and their Conditions are few and kept)."""
        horizon = max(self.reuse_s, 1.0) * 4
        for held in self._slices.values():
            for p in [p for p, v in held.items() if now - v[0] > horizon]:
                del held[p]
        while self._kept and now - next(iter(self._kept.values())).at > KEEP_REDUCTIONS_S:
            self._kept.popitem(last=False)

    async def on_audit(self, msg: Message, remote: str) -> Message:
        """Hand a member of a reduction's group one of the signed slices it reduced."""
        of, index = msg.header.get("of"), msg.header.get("index")
        kept = self._kept.get(of) if isinstance(of, bytes) else None
        if kept is None or remote not in kept.group:
            raise ProtocolError("no reduction of mine with that digest includes you (or it is too old)")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(kept.inputs):
            raise MalformedMessageError(f"index must be in 0..{len(kept.inputs) - 1}")
        inner = kept.inputs[index]
        return sign_message(wire.reply(msg, "reduce_audit_result", {"params": inner.tensors["params"]},
                                       contribution=dict(inner.header)), self.runtime.identity)
