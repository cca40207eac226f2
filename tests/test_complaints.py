"""Complaints about averaging contributions: what a verifier accepts as evidence and how it judges.

These are the asynchronous baseline's parameter contributions (``--sync async``); no live test
drives that path over P2P any more (the live screening test runs the lockstep default, whose
gradient complaints are ``test_gradient_complaints.py``). Here each rejection rule gets its own
case, with real signatures.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from sentinel.protocol import rpc as wire
from sentinel.protocol.aggregation import contribution_outliers, contribution_scores
from sentinel.protocol.errors import ForgedSignatureError, WrongSenderError
from sentinel.protocol.identity import Identity
from sentinel.protocol.signing import sign_message
from sentinel.verifier.complaints import ComplaintDesk, ComplaintRejected

RUN = "complaints-test"
STAGE = 1
D = 400
NOW = 30  # the verifier's pipeline step


class Stage:
    """Three replicas of one stage (honest parameters near a common point) and a verifier."""

    def __init__(self, n: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(D, generator=g)
        self.ids = [Identity.generate() for _ in range(n)]
        self.params = {i.peer_id: self.base + 0.005 * torch.randn(D, generator=g) for i in self.ids}
        self.versions = {i.peer_id: 20 for i in self.ids}
        self.verifier = Identity.generate()

    @property
    def peers(self) -> list[str]:
        return [i.peer_id for i in self.ids]

    def reply(self, who: int, params: torch.Tensor | None = None, *, stage: int = STAGE, version: int = 20,
              direction: str = "params_result", step: int = NOW):
        """What replica ``who`` signs when replica 0 asks for its parameters at pipeline ``step``."""
        req = sign_message(wire.request(RUN, step, 0, stage, "params", {}), self.ids[0])
        flat = self.params[self.peers[who]] if params is None else params
        return sign_message(wire.reply(req, direction, {"params": flat}, version=version), self.ids[who])

    def complaint(self, by: int, against: int, reply):
        return sign_message(wire.request(RUN, NOW, 0, STAGE, "complaint", {"params": reply.tensors["params"]},
                                         accused=self.peers[against], evidence=dict(reply.header)), self.ids[by])

    async def fetch(self, stage: int, exclude: set[str], part: tuple[int, int] | None = None):
        lo, hi = part if part is not None else (0, D)
        return [(p, t[lo:hi], self.versions[p]) for p, t in self.params.items() if p not in exclude]

    def live(self, stage: int) -> list[str]:
        return self.peers if stage == STAGE else []

    def desk(self, ratio: float = 3.0, floor: float = 0.02) -> ComplaintDesk:
        return ComplaintDesk(RUN, ratio, floor, self.fetch, now_step=lambda: NOW, stale_steps=4, min_interval_s=0.0)


def _judge(desk: ComplaintDesk, s: Stage, msg, by: int):
    accused, stage, reply = desk.admit(msg, s.peers[by], s.live)
    return asyncio.run(desk.judge(accused, stage, reply))


def test_a_poisoned_contribution_is_upheld_with_its_signed_digest_as_evidence() -> None:
    s = Stage()
    bad = s.base - 10 * (s.params[s.peers[2]] - s.base) + 0.5 * torch.randn(D)
    reply = s.reply(2, bad)
    verdict = _judge(s.desk(), s, s.complaint(0, 2, reply), by=0)
    assert verdict is not None and verdict.upheld, verdict
    assert verdict.accused == s.peers[2] and verdict.stage == STAGE and verdict.replicas == 2
    assert verdict.evidence["digest"] == reply.header["digest"]
    assert verdict.evidence["signature"] == reply.header["signature"]


def test_a_pushed_butterfly_slice_is_judged_against_the_same_slice_of_the_others() -> None:
    """A butterfly reducer complains with the slice the accused pushed to it (``reduce``, signed
    by the accused): the verifier fetches that part only, and the dedupe is per slice."""
    s = Stage()
    lo, hi = 100, 250

    def pushed(flat: torch.Tensor, version: int = 20):
        return sign_message(wire.request(RUN, NOW, 0, STAGE, "reduce", {"params": flat[lo:hi].contiguous()},
                                         part=[lo, hi], version=version, group=s.peers), s.ids[2])

    bad = s.base - 10 * (s.params[s.peers[2]] - s.base) + 0.5 * torch.randn(D)
    desk = s.desk()
    verdict = _judge(desk, s, s.complaint(0, 2, pushed(bad)), by=0)
    assert verdict is not None and verdict.upheld and verdict.replicas == 2, verdict
    assert verdict.evidence["part"] == [lo, hi]
    honest = _judge(s.desk(), s, s.complaint(0, 2, pushed(s.params[s.peers[2]])), by=0)
    assert honest is not None and not honest.upheld
    with pytest.raises(ComplaintRejected, match="already judged"):
        desk.admit(s.complaint(1, 2, pushed(bad)), s.peers[1], s.live)
    lying = pushed(bad)
    lying.header["part"] = [lo, hi + 1]  # bounds that do not match the tensor: rejected, even re-signed
    sign_message(lying, s.ids[2])
    with pytest.raises(ComplaintRejected, match="does not match"):
        s.desk().admit(s.complaint(0, 2, lying), s.peers[0], s.live)


def test_an_honest_contribution_is_dismissed() -> None:
    s = Stage()
    verdict = _judge(s.desk(), s, s.complaint(0, 2, s.reply(2)), by=0)
    assert verdict is not None and not verdict.upheld and verdict.score < 3.0


def test_a_forged_contribution_cannot_frame_an_honest_replica() -> None:
    s = Stage()
    forged = s.reply(2, s.base + 5.0)
    forged.header["signature"] = s.reply(2).header["signature"]  # the honest replica's signature, other bytes
    with pytest.raises(ForgedSignatureError):
        s.desk().admit(s.complaint(0, 2, forged), s.peers[0], s.live)
    signed_by_complainer = s.reply(0, s.base + 5.0)  # the complainer's own poison, said to be replica 2's
    with pytest.raises(WrongSenderError):
        s.desk().admit(s.complaint(0, 2, signed_by_complainer), s.peers[0], s.live)


@pytest.mark.parametrize("case", ["outsider", "self", "wrong_stage", "not_params"])
def test_complaints_outside_the_stage_are_rejected(case: str) -> None:
    s = Stage()
    desk = s.desk()
    if case == "outsider":  # only a replica of the stage averages with the accused
        other = Identity.generate()
        msg = sign_message(wire.request(RUN, 5, 0, STAGE, "complaint", {"params": s.params[s.peers[2]]},
                                        accused=s.peers[2], evidence=dict(s.reply(2).header)), other)
        complainer, reason = other.peer_id, "not_replicas"
    elif case == "self":
        msg, complainer, reason = s.complaint(2, 2, s.reply(2)), s.peers[2], "not_replicas"
    elif case == "wrong_stage":
        msg, complainer, reason = s.complaint(0, 2, s.reply(2, stage=0)), s.peers[0], "not_params"
    else:
        msg, complainer, reason = s.complaint(0, 2, s.reply(2, direction="status_result")), s.peers[0], "not_params"
    with pytest.raises(ComplaintRejected) as e:
        desk.admit(msg, complainer, s.live)
    assert e.value.reason == reason


def test_the_same_evidence_is_judged_once() -> None:
    s = Stage()
    desk = s.desk()
    reply = s.reply(2, s.base + 3.0)
    assert _judge(desk, s, s.complaint(0, 2, reply), by=0).upheld
    with pytest.raises(ComplaintRejected) as e:  # the other honest replica got the same poison
        desk.admit(s.complaint(1, 2, reply), s.peers[1], s.live)
    assert e.value.reason == "duplicate"


def test_an_old_honest_snapshot_replayed_as_evidence_is_stale() -> None:
    """Dated by the step of the request it answered (the complainer's, echoed and signed by the
    accused): an honest replica's reply from 10 steps ago is refused, whatever version it names."""
    s = Stage()
    old = s.reply(2, s.base * 0.5, version=20, step=NOW - 10)
    with pytest.raises(ComplaintRejected) as e:
        _judge(s.desk(), s, s.complaint(0, 2, old), by=0)
    assert e.value.reason == "stale"
    assert _judge(s.desk(), s, s.complaint(0, 2, s.reply(2, s.base * 0.5, step=NOW - 4)), by=0).upheld


def test_a_replica_lagging_in_optimizer_steps_is_still_judged() -> None:
    """Replicas' optimizer-step counts differ by their share of the traffic, and the accused signs
    its own version: neither may make fresh evidence stale. A poisoner signing version 0 is judged
    like any other."""
    s = Stage()
    for p in s.peers[:2]:
        s.versions[p] = 80
    for version in (45, 0):
        bad = s.base - 10 * (s.params[s.peers[2]] - s.base) + 0.5 * torch.randn(D)
        verdict = _judge(s.desk(), s, s.complaint(0, 2, s.reply(2, bad, version=version)), by=0)
        assert verdict is not None and verdict.upheld, (version, verdict)


def test_too_few_replicas_to_compare_is_undecided() -> None:
    s = Stage(n=2)
    assert _judge(s.desk(), s, s.complaint(0, 1, s.reply(1, s.base + 9.0)), by=0) is None


def test_the_floor_keeps_a_tight_stage_from_flagging_a_normal_update() -> None:
    """Right after most replicas averaged they are near-identical: the median distance collapses
    and one replica that has not averaged yet is many median distances away, while only one
    training update (about 1 % of the parameters' norm here) from the rest."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1000, generator=g)
    tight = [base + 1e-5 * torch.randn(1000, generator=g) for _ in range(6)]
    late = base + 0.01 * base.norm() / 1000**0.5 * torch.randn(1000, generator=g)
    assert contribution_scores([*tight, late])[-1] > 100  # in units of the collapsed spread
    assert contribution_outliers([*tight, late], ratio=3.0, floor=0.02) == [False] * 7
    poisoned = base - 10 * (late - base)
    assert contribution_outliers([*tight, poisoned], ratio=3.0, floor=0.02) == [False] * 6 + [True]


def test_a_complainer_is_rate_limited() -> None:
    """Judging costs the verifier a fetch of the whole stage: one complainer cannot make it do
    that in a loop, even with genuine (honest, freshly signed) replies of its peers; a few at
    once (several outliers in one averaging round) are fine."""
    s = Stage(n=4)
    now = [100.0]
    desk = ComplaintDesk(RUN, 3.0, 0.02, s.fetch, min_interval_s=1.0, burst=2, clock=lambda: now[0])
    desk.admit(s.complaint(0, 2, s.reply(2)), s.peers[0], s.live)
    desk.admit(s.complaint(0, 3, s.reply(3)), s.peers[0], s.live)
    with pytest.raises(ComplaintRejected) as e:
        desk.admit(s.complaint(0, 1, s.reply(1)), s.peers[0], s.live)
    assert e.value.reason == "rate_limited"
    desk.admit(s.complaint(1, 2, s.reply(2)), s.peers[1], s.live)  # another complainer is not held up
    now[0] += 1.5
    desk.admit(s.complaint(0, 1, s.reply(1)), s.peers[0], s.live)
    with pytest.raises(ComplaintRejected):
        desk.admit(s.complaint(0, 3, s.reply(3)), s.peers[0], s.live)


@pytest.mark.parametrize("reason", ["contribution", "reduction"])
def test_an_upheld_verdict_strikes_and_is_logged_in_its_own_terms(reason: str, caplog) -> None:
    """A verifier records an upheld complaint as an averaging strike with its evidence; a faked
    reduction is logged as a contradicted recomputation, not as a distance to the spread."""
    from types import SimpleNamespace

    from sentinel.model.corpus import load_corpus
    from sentinel.run.manifest import RunManifest
    from sentinel.verifier.complaints import Verdict
    from sentinel.verifier.node import VerifierNode

    node = VerifierNode(SimpleNamespace(peer_id=Identity.generate().peer_id), RunManifest(run_id=RUN),
                        load_corpus("default"), steps=50)
    accused = Identity.generate().peer_id
    score, bound = (7.5, 3.0) if reason == "contribution" else (1.0, 0.0)
    verdict = Verdict(accused, STAGE, True, score, bound, 4, {"digest": b"d" * 32, "evidence_step": NOW - 1},
                      reason=reason)
    with caplog.at_level("INFO", logger="sentinel.verifier.node"):
        node._on_verdict(verdict)
    assert node.ledger.state(accused).flags == 1 and node.averaging_upheld[accused] == 1
    assert node.evidence[accused][-1]["reasons"] == [reason]
    text = caplog.text
    assert f"{reason} complaint against" in text and "upheld" in text
    if reason == "reduction":
        assert "contradicts the recomputation" in text and "spread" not in text
    else:
        assert "7.5 x the spread of 4 replicas (bound 3.0)" in text
