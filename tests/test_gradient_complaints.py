"""Complaints about lockstep gradient contributions (``kind = "gradient"``): a verifier recomputes
the accused's contribution from the evidence alone, with real signatures and a real stage.

The live path (replicas re-checking an outlier in their round, leaving it out and reporting it;
verifiers banning) is ``test_swarm_screening.py``; here the verifier's judgement, rule by rule.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sentinel.model.config import ModelConfig
from sentinel.model.stages import arithmetic_signature, build_stage, parameters_digest, recompute_gradient
from sentinel.protocol import rpc as wire
from sentinel.protocol.checks import MessageChecker
from sentinel.protocol.identity import Identity
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import RunManifest, TrainingConfig
from sentinel.verifier.complaints import ComplaintDesk, ComplaintRejected
from sentinel.worker.lockstep import gradient_complaint

RUN = "gradient-complaints"
NOW = 30
VERSION = 7
MODEL = ModelConfig(vocab_size=256, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32)
MANIFEST = RunManifest(run_id=RUN, num_stages=2, model=MODEL, training=TrainingConfig(micro_batch_size=2))


class Stage0:
    """Stage 0 of 2 at version ``VERSION``: three replicas (0 accused, 1 complains), a verifier,
    and the two backward passes the accused accumulated, as the verifier signed them."""

    def __init__(self) -> None:
        self.ids = [Identity.generate() for _ in range(3)]
        self.verifier = Identity.generate()
        self.module = build_stage(MODEL, 0, 2, seed=3)
        self.params = torch.nn.utils.parameters_to_vector(self.module.parameters()).detach().clone()
        g = torch.Generator().manual_seed(1)
        self.passes = [self.backward(self.verifier, mb, g) for mb in range(2)]
        self.honest, _ = recompute_gradient(self.module, [(m.tensors["x"], m.tensors["grad"], None)
                                                          for m in self.passes])

    def backward(self, signer: Identity, mb: int, g: torch.Generator):
        x = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len), generator=g)
        grad = torch.randn(2, MODEL.seq_len, MODEL.d_model, generator=g)
        return sign_message(wire.request(RUN, NOW, mb, 0, "backward", {"x": x, "grad": grad}, mode="train"), signer)

    @property
    def peers(self) -> list[str]:
        return [i.peer_id for i in self.ids]

    def live(self, stage: int) -> list[str]:
        return self.peers if stage == 0 else []

    def reply(self, grad: torch.Tensor, *, digest: str | None = None, count: int = 2):
        """What the accused signs when the complainer asks for its version-``VERSION`` gradient."""
        req = sign_message(wire.request(RUN, NOW, 0, 0, "gradient", {}, version=VERSION, part=[0, grad.numel()]),
                           self.ids[1])
        return sign_message(wire.reply(req, "gradient_result", {"grad": grad}, have=True, version=VERSION,
                                       count=count, device=arithmetic_signature(torch.device("cpu")),
                                       params_digest=digest or parameters_digest(self.module)), self.ids[0])

    def complaint(self, grad: torch.Tensor, *, passes=None, params=None, reply=None):
        passes = self.passes if passes is None else passes
        msg = gradient_complaint(RUN, NOW, 0, VERSION, self.peers[0], [reply or self.reply(grad)], grad, passes,
                                 self.params if params is None else params)
        return sign_message(msg, self.ids[1])

    def desk(self) -> ComplaintDesk:
        async def fetch(*_):
            return []
        return ComplaintDesk(RUN, 3.0, 0.02, fetch, now_step=lambda: NOW, manifest=MANIFEST,
                             is_verifier=lambda peer: peer == self.verifier.peer_id)


@pytest.fixture(scope="module")
def stage() -> Stage0:
    return Stage0()


def test_the_complaint_passes_the_dispatchers_checks(stage) -> None:
    msg = stage.complaint(-10 * stage.honest)
    MessageChecker(RUN).check(msg, expected_sender=stage.peers[1],
                              expected=wire.request_tensors(wire.COMPLAINT, MANIFEST, -1, msg.header))


def test_a_gradient_its_passes_do_not_compute_is_upheld(stage) -> None:
    verdict = stage.desk().judge_gradient(stage.complaint(-10 * stage.honest), stage.peers[1], stage.live)
    assert verdict.upheld and verdict.reason == "gradient" and verdict.replicas == 2
    assert verdict.evidence["version"] == VERSION


def test_an_honest_gradient_is_dismissed_bit_for_bit(stage) -> None:
    verdict = stage.desk().judge_gradient(stage.complaint(stage.honest.clone()), stage.peers[1], stage.live)
    assert not verdict.upheld
    nudged = stage.honest.clone()
    nudged[0] = torch.nextafter(nudged[0], torch.tensor(1.0))  # one bit off: the same arithmetic is exact
    assert stage.desk().judge_gradient(stage.complaint(nudged), stage.peers[1], stage.live).upheld


def test_parameters_other_than_the_signed_digest_are_refused(stage) -> None:
    """A complainer cannot frame an honest replica with other parameters: they must hash to
    the digest the accused itself signed."""
    other = stage.params + 1e-3
    with pytest.raises(ComplaintRejected, match="digest") as e:
        stage.desk().judge_gradient(stage.complaint(stage.honest.clone(), params=other), stage.peers[1], stage.live)
    assert e.value.reason == "wrong_params"


def test_passes_not_signed_by_a_verifier_are_refused(stage) -> None:
    """Nor with invented inputs: every pass must carry a verifier's signature."""
    g = torch.Generator().manual_seed(9)
    forged = [stage.backward(stage.ids[1], mb, g) for mb in range(2)]
    with pytest.raises(ComplaintRejected, match="verifier") as e:
        stage.desk().judge_gradient(stage.complaint(stage.honest.clone(), passes=forged), stage.peers[1], stage.live)
    assert e.value.reason == "not_gradient"


def test_a_pass_count_other_than_the_signed_one_is_refused(stage) -> None:
    reply = stage.reply(stage.honest.clone(), count=3)
    with pytest.raises(ComplaintRejected, match="passes"):
        stage.desk().judge_gradient(stage.complaint(stage.honest.clone(), reply=reply), stage.peers[1], stage.live)


def test_the_same_contribution_is_judged_once(stage) -> None:
    desk = stage.desk()
    desk.judge_gradient(stage.complaint(-10 * stage.honest), stage.peers[1], stage.live)
    with pytest.raises(ComplaintRejected, match="already judged"):
        desk.judge_gradient(stage.complaint(-10 * stage.honest), stage.peers[2], stage.live)


def test_an_averaging_attacker_poisons_its_lockstep_gradient() -> None:
    """What the live screening test's stage-2 attacker sends its replicas: in lockstep its
    contribution is a gradient, an update from zero, so ``avg_scaling`` sends -10 x it."""
    from sentinel.attacks.loader import load_attack
    from sentinel.worker.node import WorkerNode

    node = WorkerNode(runtime=None, manifest=MANIFEST, attack=load_attack("avg_scaling"))
    node.runtime = SimpleNamespace(peer_id="attacker")  # all the poison reads of the node's runtime
    try:
        grad = torch.randn(50)
        assert torch.allclose(node.poison_gradient(grad, f"{VERSION}|0"), -10 * grad)
    finally:
        node.executor.shutdown(wait=False)
