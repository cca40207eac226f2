"""Lockstep stages in the simulator: a stage's replicas apply one aggregated gradient per step, so
honest replicas at the same version hold bit-identical parameters and give bit-identical answers;
a replica whose state diverged adopts its stage majority's instead of being struck."""

from __future__ import annotations

import pytest
import torch

from sentinel.sim.swarm import SimConfig, Simulation
from sentinel.worker.stage_runner import StageRunner

STAGES, REPLICAS, STEPS, PERTURB_AT = 3, 3, 50, 25


@pytest.fixture(scope="module")
def lockstep_run() -> tuple[Simulation, dict]:
    cfg = SimConfig(stages=STAGES, replicas=REPLICAS, malicious_fraction=0.0, attack="none", steps=STEPS,
                    micro_batches_per_step=3, micro_batch_size=2, eval_every=STEPS, eval_batches=1,
                    sync="lockstep")
    sim = Simulation(cfg)
    perturbed = sim.workers["s01r01"].runner

    def progress(s: Simulation) -> None:
        if s.step == PERTURB_AT:  # a fault between two steps: one parameter of one replica moves
            with torch.no_grad():
                next(perturbed.module.parameters()).view(-1)[0] += 1e-3

    return sim, sim.run(progress)


def _replicas(sim: Simulation, stage: int) -> list[StageRunner]:
    return [w.runner for w in sim.workers.values() if w.stage == stage]


def test_replicas_of_a_stage_are_bit_identical_after_50_steps(lockstep_run) -> None:
    sim, report = lockstep_run
    assert report["micro_batches"]["completed"] == STEPS * 3
    for stage in range(STAGES):
        runners = _replicas(sim, stage)
        assert len({r.version for r in runners}) == 1 and runners[0].version > 0
        assert len({r.digest() for r in runners}) == 1, stage
        for a, b in zip(runners[0].module.parameters(), runners[1].module.parameters(), strict=True):
            assert torch.equal(a, b)
        sa, sb = runners[0].optimizer.state_dict()["state"], runners[1].optimizer.state_dict()["state"]
        assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_two_replicas_answer_the_same_input_bit_identically(lockstep_run) -> None:
    sim, _ = lockstep_run
    model = sim.manifest.model
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.vocab_size, (2, model.seq_len), generator=g)
    hidden = torch.randn(*model.hidden_shape(2), generator=g)
    for stage in range(STAGES):
        a, b = _replicas(sim, stage)[:2]
        x = tokens if stage == 0 else hidden
        targets = tokens if stage == STAGES - 1 else None
        ya, yb = a.forward(("check", 0), x, targets), b.forward(("check", 0), x, targets)
        assert torch.equal(ya, yb), stage
        grad = None if stage == STAGES - 1 else torch.randn(ya.shape, generator=g)
        ga, gb = a.backward(("check", 0), x, grad, targets, hold=True), b.backward(("check", 0), x, grad, targets,
                                                                                   hold=True)
        assert (ga is None and gb is None) or torch.equal(ga, gb), stage


def test_a_diverged_replica_resyncs_instead_of_being_struck(lockstep_run) -> None:
    sim, report = lockstep_run
    assert report["resyncs"] == 1  # the perturbed replica, once, at the next step boundary
    assert report["honest_banned"] == [] and report["flags"]["honest_struck"] == 0
    assert sim.ledger.state("s01r01").strikes == 0


def test_the_medium_preset_trains_in_lockstep() -> None:
    """d_model 512 (``--model-size medium``, the width ladder's top): two lockstep steps run and
    the replicas of each stage stay bit-identical at that width too."""
    cfg = SimConfig(stages=2, replicas=2, malicious_fraction=0.0, attack="none", steps=2, micro_batches_per_step=2,
                    micro_batch_size=1, eval_every=2, eval_batches=1, model_size="medium", sync="lockstep")
    sim = Simulation(cfg)
    report = sim.run()
    assert report["model"]["d_model"] == 512 and report["micro_batches"]["completed"] == 4
    for stage in range(2):
        assert len({r.digest() for r in _replicas(sim, stage)}) == 1
