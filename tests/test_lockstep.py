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


def test_a_poisoned_gradient_contribution_is_proven_and_left_out() -> None:
    """A stage-1 replica honest on the pipeline sends its stage a gradient it did not compute
    (``avg_scaling``: -10 x its own). Its replicas recompute its passes at their identical
    version, get other bits, and a strict majority proves it wrong: banned, left out of the round,
    no honest replica struck; a clean run that re-checks most contributions finds none wrong."""
    cfg = dict(stages=3, replicas=3, steps=12, micro_batches_per_step=3, micro_batch_size=2, eval_every=12,
               eval_batches=1, attack_start=4, sync="lockstep")
    poisoned = Simulation(SimConfig(**cfg, malicious_fraction=0.34, attack="avg_scaling"))
    report = poisoned.run()
    assert report["recall"] == 1.0 and report["honest_banned"] == [], report["banned"]
    checks = report["averaging"]["checks"]
    assert checks["proven"] == 3 and checks["inconclusive"] == 0, checks
    assert all(b["step"] <= cfg["attack_start"] + 1 for b in report["banned"]), report["banned"]
    for stage in range(3):  # the honest replicas left applied the same, unpoisoned gradient
        honest = [w.runner for w in poisoned.workers.values() if w.stage == stage and not w.malicious]
        assert len({r.digest() for r in honest}) == 1
    clean = Simulation(SimConfig(**cfg, malicious_fraction=0.0, attack="none",
                                 screening={"averaging_outlier_ratio": 1.0})).run()  # re-check most of them
    assert clean["averaging"]["checks"]["checked"] > 10 and clean["averaging"]["checks"]["proven"] == 0
    assert clean["banned"] == []


def test_a_recomputed_contribution_matches_the_accumulated_one_bit_for_bit() -> None:
    """``StageRunner.recompute_gradient`` is what the re-check runs on another replica: the same
    passes at the same version give the same bits as the replica's own accumulation, and the
    checker's own accumulated gradient is left untouched."""
    sim = Simulation(SimConfig(stages=2, replicas=2, malicious_fraction=0.0, attack="none", steps=1,
                               micro_batches_per_step=1, micro_batch_size=2, sync="lockstep"))
    a, b = (sim.workers[n].runner for n in ("s01r00", "s01r01"))
    model = sim.manifest.model
    g = torch.Generator().manual_seed(5)
    passes = [(torch.randn(*model.hidden_shape(2), generator=g), None,
               torch.randint(0, model.vocab_size, (2, model.seq_len), generator=g)) for _ in range(3)]
    for i, (x, grad, targets) in enumerate(passes):
        a.forward(("p", i), x, targets)
        a.backward(("p", i), x, grad, targets, hold=True)
    b.backward(("own", 0), *passes[0], hold=True)
    own_before, n_before = b.accumulated_gradient()
    expected, n = a.accumulated_gradient()
    got, m = b.recompute_gradient(passes)
    assert (n, m) == (3, 3) and torch.equal(got, expected)
    own_after, n_after = b.accumulated_gradient()
    assert n_after == n_before == 1 and torch.equal(own_after, own_before)
