"""Complaints about poisoned averaging contributions: check the evidence, re-judge, strike.

A worker honest on the pipeline can still poison what it contributes to its stage's average
(``sentinel.attacks.averaging``), and only its replicas see that. So a replica whose round finds a
contribution far outside the stage's spread sends the verifiers the contributor's own signed
``params_result``: a malicious worker cannot frame an honest one with a tensor it never signed.
The verifier re-judges the contribution against the stage's other replicas, fetched by itself,
before it strikes; an upheld complaint is a strike in the same ledger as a pipeline flag.

Rejected, each with its own reason (``sentinel_averaging_complaints_received_total``): a complainer
or accused that is not a live replica of the stage; evidence whose signature or sender does not
check; evidence older than ``stale_steps`` pipeline steps (an old snapshot replayed to frame an
honest replica); a parameter state already judged (one per accused and optimizer step); a second
complaint in flight per accused; complaints beyond a complainer's token bucket (each costs a fetch
from every other replica: unlimited, they would make the verifiers download the stage repeatedly).

Freshness counts pipeline steps: the evidence's ``step`` is the complainer's own request step,
echoed in the signed reply and checked (:func:`sentinel.net.view.fetch_params`), so the accused
cannot choose it. Its optimizer-step ``version`` it signs as it likes, and honest replicas differ
in it by their share of the traffic, so a version rule would refuse valid complaints as stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sentinel.metrics import METRICS
from sentinel.model.stages import (
    StageModule,
    arithmetic_signature,
    build_stage,
    parameters_digest,
    recompute_gradient,
)
from sentinel.protocol.aggregation import contribution_scores, partition
from sentinel.protocol.checks import MessageChecker, TensorSpec
from sentinel.protocol.codec import Message
from sentinel.protocol.errors import MalformedMessageError, ProtocolError
from sentinel.protocol.rpc import BACKWARD, request_specs
from sentinel.run.manifest import RunManifest

logger = logging.getLogger(__name__)

# (peer, flat parameters or the slice ``part``, optimizer-step count) of the stage's other
# replicas, fetched by the verifier: fetch(stage, exclude, part)
FetchReplicas = Callable[[int, set[str], "tuple[int, int] | None"], Awaitable[list[tuple[str, torch.Tensor, int]]]]

# What a contribution may be: a replica's whole parameters or one slice of them answering a
# ``params`` request, a slice it pushed to a butterfly reducer, or a reducer's own slice
# (``sentinel.worker.butterfly``). All are signed by the accused; all say what it contributed.
EVIDENCE_DIRECTIONS = ("params_result", "reduce", "slice")

# A lockstep contribution recomputed on other arithmetic (another torch build, device model or
# thread count) may differ by rounding: it is upheld as wrong only beyond this relative distance
# (the exact spot checks' bound across devices, ``DriverConfig.spot_mixed_rtol``).
MIXED_RTOL = 1e-3


class ComplaintRejected(ProtocolError):
    """A complaint the verifier will not judge; ``reason`` names why (a metric label)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Verdict:
    """The verifier's judgement of one complaint."""

    accused: str
    stage: int
    upheld: bool
    score: float  # the contribution's distance to the stage's median, in units of its spread
    bound: float  # the ratio it had to exceed (``ScreeningConfig.averaging_outlier_ratio``)
    replicas: int  # contributions the verifier compared it with
    evidence: dict[str, Any] = field(default_factory=dict)  # for a ban vote: digest, signature, version
    reason: str = "contribution"  # or "reduction": a butterfly reducer's answer its own inputs contradict


class ComplaintDesk:
    """Accepts, de-duplicates and judges complaints for one verifier.

    Args:
        run: the run id (evidence for another run is rejected).
        ratio, floor: ``ScreeningConfig.averaging_outlier_ratio`` / ``averaging_outlier_floor``.
        fetch_replicas: how the verifier gets the other replicas' current parameters.
        now_step: the verifier's current pipeline step.
        stale_steps: evidence (the step of the request it answered) may lag ``now_step`` by at
            most this much; newer evidence is always fresh (verifiers' clocks differ a little).
        remember: digests of judged evidence kept to refuse duplicates.
        min_interval_s, burst: a complainer's token bucket: ``burst`` complaints at once (an
            honest replica may find several outliers in one averaging round), then one per
            ``min_interval_s``.
        clock: monotonic seconds (injectable for tests).
        rule: the run's aggregation rule, to recompute a reduction a reducer is accused of faking.
    """

    def __init__(self, run: str, ratio: float, floor: float, fetch_replicas: FetchReplicas,
                 now_step: Callable[[], int] = lambda: 0, stale_steps: int = 4, remember: int = 4096, min_interval_s: float = 1.0,
                 burst: int = 4, clock: Callable[[], float] = time.monotonic, rule: str = "mean",
                 manifest: RunManifest | None = None, is_verifier: Callable[[str], bool] = lambda peer: False):
        self.run = run
        self.manifest = manifest  # what a lockstep contribution is recomputed with (judge_gradient)
        self.is_verifier = is_verifier  # signers a pass may come from
        self._modules: dict[int, StageModule] = {}
        self.rule = rule  # the run's aggregation rule (TrainingConfig.averaging): how reductions are recomputed
        self.ratio = ratio
        self.floor = floor
        self.fetch_replicas = fetch_replicas
        self.now_step = now_step
        self.stale_steps = stale_steps
        self.checker = MessageChecker(run)
        self._seen: OrderedDict[str, None] = OrderedDict()  # (accused, version) states judged
        self._remember = remember
        self._busy: set[str] = set()
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.burst = burst
        self._tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()  # complainer -> (tokens, at)

    def admit(self, msg: Message, complainer: str, live: Callable[[int], list[str]]) -> tuple[str, int, Message]:
        """Check a complaint already verified as signed by ``complainer``; returns (accused,
        stage, the accused's signed reply) or raises :class:`ComplaintRejected` /
        :class:`ProtocolError`. ``live(stage)`` lists the stage's live, non-banned replicas."""
        h = msg.header
        accused, evidence, stage = h.get("accused"), h.get("evidence"), h["stage"]
        if not isinstance(accused, str) or not isinstance(evidence, dict) or set(msg.tensors) != {"params"}:
            raise MalformedMessageError("a complaint carries 'accused', the accused's reply header as 'evidence', "
                                        "and its 'params' tensor")
        _check_parties(complainer, accused, stage, live)
        reply = Message(header=dict(evidence), tensors={"params": msg.tensors["params"]})
        self.checker.check(reply, expected_sender=accused, expected={"params": TensorSpec("float32", (None,))},
                           check_replay=False)
        rh = reply.header
        if rh.get("direction") not in EVIDENCE_DIRECTIONS or rh.get("stage") != stage:
            raise ComplaintRejected("the evidence is not a contribution to that stage's averaging", "not_params")
        part = rh.get("part")
        if part is not None and not (isinstance(part, list) and len(part) == 2 and all(type(v) is int for v in part)
                                     and 0 <= part[0] < part[1] and part[1] - part[0] == reply.tensors["params"].numel()):
            raise ComplaintRejected(f"the evidence's part {part!r:.80} does not match its tensor", "not_params")
        self._check_fresh(rh["step"])
        state = _state_key(accused, rh.get("version"), part)
        if state in self._seen:
            raise ComplaintRejected(f"{accused[-8:]}'s parameters at optimizer step {rh.get('version')!r} were "
                                    "already judged", "duplicate")
        if accused in self._busy:
            raise ComplaintRejected(f"a complaint against {accused[-8:]} is being judged", "busy")
        self._take_token(complainer)
        return accused, stage, reply

    async def judge(self, accused: str, stage: int, reply: Message) -> Verdict | None:
        """Compare the accused's signed contribution with the stage's other replicas, fetched
        now. None when there are too few of them to say (fewer than two)."""
        digest = bytes(reply.header["digest"])
        part = reply.header.get("part")
        state = _state_key(accused, reply.header.get("version"), part)
        self._busy.add(accused)
        try:
            others = await self.fetch_replicas(stage, {accused}, tuple(part) if part is not None else None)
        finally:
            self._busy.discard(accused)
        contribution = reply.tensors["params"]
        others = [(p, t, v) for p, t, v in others if t.shape == contribution.shape]
        if len(others) < 2:
            METRICS.inc("sentinel_averaging_complaints_received_total", outcome="undecided")
            return None
        version = reply.header.get("version", 0)
        self._judged(state)
        scores = contribution_scores([contribution, *(t for _, t, _ in others)], self.floor)
        upheld = scores[0] > self.ratio
        METRICS.inc("sentinel_averaging_complaints_received_total", outcome="upheld" if upheld else "dismissed")
        return Verdict(accused, stage, upheld, scores[0], self.ratio, len(others),
                       {"digest": digest, "signature": bytes(reply.header["signature"]), "version": version,
                        "evidence_step": reply.header["step"], **({"part": part} if part is not None else {})})

    def _judged(self, key: str) -> None:
        """Remember that the evidence ``key`` names was judged (the last ``remember`` of them)."""
        self._seen[key] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def _check_fresh(self, step: int) -> None:
        """Evidence dated more than ``stale_steps`` pipeline steps ago is refused."""
        age = self.now_step() - step
        if age > self.stale_steps:
            raise ComplaintRejected(f"evidence answers a request of step {step}, {age} steps ago "
                                    f"(at most {self.stale_steps})", "stale")

    def _take_token(self, complainer: str) -> None:
        now = self.clock()
        tokens, at = self._tokens.get(complainer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.min_interval_s) if self.min_interval_s > 0 \
            else float(self.burst)
        if tokens < 1.0:
            raise ComplaintRejected(f"{complainer[-8:]} complains faster than {self.burst} at once and one per "
                                    f"{self.min_interval_s:g}s", "rate_limited")
        self._tokens[complainer] = (tokens - 1.0, now)
        self._tokens.move_to_end(complainer)
        while len(self._tokens) > self._remember:
            self._tokens.popitem(last=False)

    def judge_reduction(self, msg: Message, complainer: str, live: Callable[[int], list[str]]) -> Verdict:
        """Judge a complaint that a butterfly reducer lied (``sentinel.worker.butterfly``): its
        signed ``reduce_result`` (header as ``evidence``, tensor ``part``) and the slices it
        committed to (headers as ``contributions``, stacked as ``params``). Every slice must be
        signed by the contributor the reducer named, with the digest it committed to; the
        verifier then recomputes the reduction with the run's ``rule``. Nothing is fetched: the
        reducer's own signature binds it to inputs that prove it wrong, and an honest reducer
        cannot be framed, because any inputs that match its commitment reproduce its answer."""
        from sentinel.protocol.aggregation import same_reduction

        h = msg.header
        accused, evidence, heads = h.get("accused"), h.get("evidence"), h.get("contributions")
        stage = h["stage"]
        if not isinstance(accused, str) or not isinstance(evidence, dict) or not isinstance(heads, list) \
                or set(msg.tensors) != {"part", "params"}:
            raise MalformedMessageError("a reduction complaint carries 'accused', the reducer's reply header as "
                                        "'evidence', the committed slices' headers as 'contributions', and the "
                                        "'part' and stacked 'params' tensors")
        _check_parties(complainer, accused, stage, live)
        part, stacked = msg.tensors["part"], msg.tensors["params"]
        result = Message(header=dict(evidence), tensors={"part": part})
        self.checker.check(result, expected_sender=accused, expected={"part": TensorSpec("float32", (None,))},
                           check_replay=False)
        rh = result.header
        committed = rh.get("contributions")
        bounds = rh.get("part")
        if rh.get("direction") != "reduce_result" or rh.get("stage") != stage or not isinstance(committed, list) \
                or not isinstance(bounds, list) or len(committed) != len(heads) or stacked.dim() != 2 \
                or stacked.shape != (len(heads), part.numel()):
            raise ComplaintRejected("the evidence is not a reduce_result of that stage with its committed slices",
                                    "not_params")
        self._check_fresh(rh["step"])
        key = "reduction@" + bytes(rh["digest"]).hex()
        if key in self._seen:
            raise ComplaintRejected("that reduction was already judged", "duplicate")
        self._take_token(complainer)
        inputs = []
        for i, (head, entry) in enumerate(zip(heads, committed, strict=True)):
            if not isinstance(head, dict) or not isinstance(entry, list) or len(entry) != 2:
                raise MalformedMessageError(f"committed slice {i} is malformed")
            one = Message(header=dict(head), tensors={"params": stacked[i].contiguous()})
            self.checker.check(one, expected_sender=entry[0], expected={"params": TensorSpec("float32", (None,))},
                               check_replay=False)
            if one.header.get("digest") != entry[1] or one.header.get("part") != bounds \
                    or one.header.get("stage") != stage:
                raise ComplaintRejected(f"slice {i} is not the one the reducer committed to", "not_params")
            inputs.append(one.tensors["params"])
        self._judged(key)
        upheld = not same_reduction(part, inputs, self.rule)
        METRICS.inc("sentinel_averaging_complaints_received_total", outcome="upheld" if upheld else "dismissed")
        return Verdict(accused, stage, upheld, 1.0 if upheld else 0.0, 0.0, len(inputs),
                       {"digest": bytes(rh["digest"]), "signature": bytes(rh["signature"]),
                        "evidence_step": rh["step"], "part": bounds}, reason="reduction")

    def judge_gradient(self, msg: Message, complainer: str, live: Callable[[int], list[str]]) -> Verdict:
        """Judge a complaint that a lockstep replica signed a contribution its own passes do not
        compute (``sentinel.worker.lockstep``, rule 7): the accused's signed gradient replies
        (headers as ``evidence``, the whole gradient as ``grad``), the backward requests it
        claims (headers as ``passes``, tensors stacked as ``pass_x`` / ``pass_grad`` /
        ``pass_targets``), each signed by a verifier of the run, and the stage's parameters at
        that version (``params``), which must hash to the digest the accused signed. The verifier
        recomputes the contribution itself: bit for bit on the accused's arithmetic, within
        ``MIXED_RTOL`` on another. Nothing is fetched, and an honest replica cannot be framed: its
        own signed digest pins the parameters, the verifiers' signatures pin the inputs, and those
        recompute what it sent."""
        if self.manifest is None:
            raise ComplaintRejected("this verifier does not judge lockstep contributions", "not_screening")
        m = self.manifest
        h = msg.header
        accused, evidence, heads, names, version = (h.get("accused"), h.get("evidence"), h.get("passes"),
                                                    h.get("pass_tensors"), h.get("version"))
        stage = h["stage"]
        if not isinstance(accused, str) or not isinstance(version, int) or isinstance(version, bool) \
                or not all(isinstance(v, list) and v for v in (evidence, heads, names)) \
                or not all(isinstance(e, dict) for e in evidence):
            raise MalformedMessageError("a gradient complaint carries 'accused', 'version', the accused's gradient "
                                        "reply headers as 'evidence', and its passes' headers and tensor names")
        _check_parties(complainer, accused, stage, live)
        grad, params = msg.tensors["grad"], msg.tensors["params"]
        bounds = partition(grad.numel(), 1, m.training.averaging_part_numel)
        if len(bounds) != len(evidence):
            raise ComplaintRejected("the evidence does not cover the gradient part by part", "not_gradient")
        meta, steps = None, []
        for head, (lo, hi) in zip(evidence, bounds, strict=True):
            reply = Message(header=dict(head), tensors={"grad": grad[lo:hi].contiguous()})
            self.checker.check(reply, expected_sender=accused, expected={"grad": TensorSpec("float32", (hi - lo,))},
                               check_replay=False)
            rh = reply.header
            if rh.get("direction") != "gradient_result" or rh.get("have") is not True or rh.get("stage") != stage \
                    or rh.get("version") != version:
                raise ComplaintRejected("the evidence is not that replica's gradient for that version", "not_gradient")
            one = (rh.get("count"), rh.get("params_digest"), rh.get("device"))
            if meta is not None and one != meta:
                raise ComplaintRejected("the evidence's parts disagree", "not_gradient")
            meta = one
            steps.append(rh["step"])
        count, digest, device = meta
        self._check_fresh(max(steps))
        key = f"gradient@{accused}@{version}"
        if key in self._seen:
            raise ComplaintRejected(f"{accused[-8:]}'s contribution to version {version} was already judged",
                                    "duplicate")
        if len(heads) != count or len(names) != count:
            raise ComplaintRejected(f"the accused averaged {count!r:.20} passes; the complaint shows {len(heads)}",
                                    "not_gradient")
        self._take_token(complainer)
        specs = request_specs(m, stage, BACKWARD)
        passes, seen = [], set()
        for i, (head, tensor_names) in enumerate(zip(heads, names, strict=True)):
            if not isinstance(head, dict) or not isinstance(tensor_names, list) \
                    or not set(tensor_names) <= set(specs) or f"pass_{tensor_names[0]}" not in msg.tensors:
                raise MalformedMessageError(f"pass {i} is malformed")
            one = Message(header=dict(head), tensors={n: msg.tensors[f"pass_{n}"][i].contiguous()
                                                       for n in tensor_names})
            signer = head.get("sender")
            self.checker.check(one, expected_sender=signer if isinstance(signer, str) else "", expected=specs,
                               check_replay=False)
            oh = one.header
            if oh.get("direction") != "backward" or oh.get("mode", "train") != "train" or oh.get("stage") != stage \
                    or not self.is_verifier(signer) or bytes(oh["digest"]) in seen:
                raise ComplaintRejected(f"pass {i} is not a verifier's training backward of that stage, or "
                                        "appears twice", "not_gradient")
            seen.add(bytes(oh["digest"]))
            t = one.tensors
            passes.append((t["x"], t.get("grad"), t.get("targets")))
        module = self._modules.get(stage)
        if module is None:
            module = self._modules[stage] = build_stage(m.model, stage, m.num_stages, seed=m.seed)
        if params.numel() != sum(q.numel() for q in module.parameters()):
            raise ComplaintRejected("the parameters are not that stage's", "wrong_params")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(params, module.parameters())
        if parameters_digest(module) != digest:
            raise ComplaintRejected("the parameters do not hash to the digest the accused signed", "wrong_params")
        recomputed, _ = recompute_gradient(module, passes, m.training.accumulate)
        if device == arithmetic_signature(torch.device("cpu")):
            upheld = not torch.equal(recomputed, grad)
        else:
            distance = float((recomputed - grad).norm() / recomputed.norm().clamp_min(1e-12))
            upheld = not distance <= MIXED_RTOL
        self._judged(key)
        METRICS.inc("sentinel_averaging_complaints_received_total", outcome="upheld" if upheld else "dismissed")
        first = evidence[0]
        return Verdict(accused, stage, upheld, 1.0 if upheld else 0.0, 0.0, count,
                       {"digest": bytes(first["digest"]), "signature": bytes(first["signature"]), "version": version,
                        "evidence_step": max(steps)}, reason="gradient")

    async def handle(self, msg: Message, complainer: str, live: Callable[[int], list[str]],
                     on_verdict: Callable[[Verdict], Any]) -> None:
        """Admit and judge in one go (the verifier runs this as a task, after acknowledging)."""
        try:
            if msg.header.get("kind") == "reduction":  # signatures and a reduction: off the event loop
                on_verdict(await asyncio.to_thread(self.judge_reduction, msg, complainer, live))
                return
            if msg.header.get("kind") == "gradient":  # signatures and a recomputation: off the event loop
                on_verdict(await asyncio.to_thread(self.judge_gradient, msg, complainer, live))
                return
            accused, stage, reply = self.admit(msg, complainer, live)
            verdict = await self.judge(accused, stage, reply)
        except ComplaintRejected as e:
            METRICS.inc("sentinel_averaging_complaints_received_total", outcome=e.reason)
            logger.info("complaint from %s rejected: %s", complainer[-8:], e)
            return
        except ProtocolError as e:
            METRICS.inc("sentinel_averaging_complaints_received_total", outcome="bad_evidence")
            logger.info("complaint from %s carries bad evidence: %s", complainer[-8:], e)
            return
        except (asyncio.TimeoutError, OSError) as e:
            logger.debug("cannot judge the complaint from %s: %s", complainer[-8:], e)
            return
        if verdict is not None:
            on_verdict(verdict)


def _check_parties(complainer: str, accused: str, stage: int, live: Callable[[int], list[str]]) -> None:
    """Complainer and accused must be two live replicas of the stage."""
    replicas = live(stage)
    if complainer not in replicas or accused not in replicas or complainer == accused:
        raise ComplaintRejected(f"complainer {complainer[-8:]} and accused {accused[-8:]} must be two live "
                                f"replicas of stage {stage}", "not_replicas")


def _state_key(accused: str, version: Any, part: Any = None) -> str:
    """One parameter state of one replica (or one slice of it): its peer id, the optimizer step
    it signed and the slice's bounds."""
    return f"{accused}@{version!r}" + (f"@{part!r}" if part is not None else "")
