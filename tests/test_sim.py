"""The in-process simulator: an obvious attack is caught, a clean run bans nobody, runs are reproducible.

Small swarms and few steps (the whole file runs in well under a minute on two cores); the
paper-scale numbers come from ``bench/detection_table.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from sentinel.sim.cli import main as sim_main
from sentinel.sim.swarm import SimConfig, Simulation, malicious_slots, run_simulation
from sentinel.sim.transport import InProcessTransport

#: 3 stages x 5 replicas, one attacker per stage (20 %), on the generated default corpus, screened
#: at the library defaults.
SMALL = dict(stages=3, replicas=5, malicious_fraction=0.2, steps=24, micro_batches_per_step=5,
             micro_batch_size=4, eval_every=12, eval_batches=2, attack_start=8)


def test_malicious_placement_keeps_an_honest_majority_per_stage():
    cfg = SimConfig(stages=16, replicas=8, malicious_fraction=0.375, attack="sign_flip")
    slots = malicious_slots(cfg)
    assert len(slots) == 48
    assert all(sum(1 for s, _ in slots if s == stage) == 3 for stage in range(16))
    wide = SimConfig(stages=16, replicas=11, malicious_fraction=4 / 11, attack="sign_flip")
    assert len(malicious_slots(wide)) == 64
    spared = SimConfig(stages=4, replicas=8, malicious_fraction=0.375, attack="sign_flip", spare_ends=True)
    assert {s for s, _ in malicious_slots(spared)} == {1, 2}
    with pytest.raises(ValueError, match="honest majority"):
        SimConfig(replicas=8, malicious_fraction=0.5, attack="sign_flip")


def test_obvious_attack_is_caught_without_honest_bans():
    r = run_simulation(SimConfig(**SMALL, attack="scaling,factor=10", direction="forward", defense="sentinel"))
    assert len(r["malicious"]) == 3
    assert r["recall"] == 1.0, r["banned"]
    assert r["honest_banned"] == []
    assert r["precision"] == 1.0
    assert r["detection_latency_steps"] is not None and r["detection_latency_steps"] <= 8
    assert r["micro_batches"]["failed"] == 0


def test_the_defended_model_ends_within_5_percent_of_the_clean_one_and_the_undefended_does_not():
    """The validation-loss bound where it is not noise: clean, defended and undefended runs share
    the seed (init, data order, routing), so they differ only by the attack and the defence. A
    sign flip on two of the five replicas of every stage costs the undefended model well over 5 %
    (at the table's learning rate, where this small model learns enough in 60 steps for damage to
    show: lockstep replicas average every pass's gradient, so one corrupted replica of five is
    diluted); defended, the attackers are banned and the model ends within 5 % of the clean one."""
    cfg = dict(SMALL, steps=60, eval_every=60, eval_batches=4, attack="sign_flip", direction="forward",
               malicious_fraction=0.4, lr=3e-3)
    clean = run_simulation(SimConfig(**{**cfg, "attack": "none"}))["val_loss_final"]
    defended = run_simulation(SimConfig(**cfg, defense="sentinel"))
    undefended = run_simulation(SimConfig(**cfg, defense="none"))["val_loss_final"]
    print(f"val loss clean {clean:.3f}, defended {defended['val_loss_final']:.3f}, undefended {undefended:.3f}")
    assert defended["recall"] == 1.0 and defended["honest_banned"] == []
    assert defended["val_loss_final"] <= 1.05 * clean
    assert undefended > 1.05 * clean


def test_clean_run_bans_nobody_and_learns():
    r = run_simulation(SimConfig(**SMALL, attack="none", defense="sentinel"))
    assert r["banned"] == []
    assert r["malicious"] == []
    assert r["val_loss_final"] < r["val_loss_first"] - 0.3
    assert r["stage_passes_per_token"] >= 3 * SMALL["stages"]  # forward 1 + backward 2 per stage


def test_same_seed_same_run():
    cfg = dict(stages=2, replicas=3, malicious_fraction=0.34, steps=4, micro_batches_per_step=3,
               micro_batch_size=2, eval_every=2, eval_batches=1, attack="gaussian", direction="backward")
    a, b = run_simulation(SimConfig(**cfg)), run_simulation(SimConfig(**cfg))
    keys = ("train_loss", "val_loss", "banned", "flags", "messages", "compute", "malicious")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    c = run_simulation(SimConfig(**{**cfg, "seed": 1}))
    assert c["train_loss"] != a["train_loss"]


def test_routing_seed_changes_only_the_routing():
    cfg = dict(stages=2, replicas=3, steps=3, micro_batches_per_step=3, micro_batch_size=2, eval_every=3,
               eval_batches=1, attack="none")
    base = run_simulation(SimConfig(**cfg))
    assert run_simulation(SimConfig(**cfg, routing_seed=0))["train_loss"] == base["train_loss"]  # None = seed
    other = run_simulation(SimConfig(**cfg, routing_seed=1000))
    assert other["val_loss_first"] == base["val_loss_first"]  # same init, same evaluation set
    assert other["train_loss"] != base["train_loss"]  # different replicas computed the later steps
    with pytest.raises(ValueError, match="routing_seed"):
        SimConfig(routing_seed=-1)


def test_duplicate_defense_counts_its_compute_and_catches_a_sign_flip():
    cfg = dict(SMALL, steps=16, attack="sign_flip", direction="forward")
    dup = run_simulation(SimConfig(**cfg, defense="duplicate"))
    none = run_simulation(SimConfig(**cfg, defense="none"))
    assert dup["compute"]["check_passes"] > 0 and none["compute"]["check_passes"] == 0
    assert dup["flops_per_token"] / none["flops_per_token"] > 1.8
    assert dup["honest_banned"] == []
    assert dup["recall"] > 0


def test_transport_applies_attacks_where_the_live_worker_does():
    """Forward outputs go through attack.forward, input gradients through attack.backward;
    nothing is attacked before attack_start, and stage 0 sends no gradient."""
    sim = Simulation(SimConfig(stages=2, replicas=3, malicious_fraction=0.34, attack="sign_flip", direction="both",
                               attack_start=5, steps=1, micro_batches_per_step=1, micro_batch_size=2))
    t: InProcessTransport = sim.transport
    bad = sorted(sim.malicious)
    s1 = next(w for w in bad if sim.workers[w].stage == 1)
    honest_runner = sim.workers[s1].runner
    x = torch.randn(2, sim.manifest.model.seq_len, sim.manifest.model.d_model)
    y = torch.randint(0, 256, (2, sim.manifest.model.seq_len))
    import asyncio

    early = asyncio.run(t.forward(s1, 1, 1, 0, x, y, "train", 1.0))
    late = asyncio.run(t.forward(s1, 1, 9, 0, x, y, "train", 1.0))
    assert torch.allclose(early.tensor, honest_runner.evaluate(x, y), atol=1e-5)
    assert torch.allclose(late.tensor, -honest_runner.evaluate(x, y), atol=1e-5)
    g = asyncio.run(t.backward(s1, 1, 9, 0, x, None, y, 1.0))
    assert t.latest[(1, "backward", s1)].attacked and g.tensor is not None
    s0 = next(w for w in bad if sim.workers[w].stage == 0)
    ids = torch.randint(0, 256, (2, sim.manifest.model.seq_len))
    asyncio.run(t.forward(s0, 0, 9, 1, ids, None, "train", 1.0))
    assert asyncio.run(t.backward(s0, 0, 9, 1, ids, torch.zeros(2, sim.manifest.model.seq_len,
                                                                sim.manifest.model.d_model), None, 1.0)).tensor is None


def test_cli_writes_a_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    sim_main(["--stages", "2", "--replicas", "3", "--malicious-fraction", "0.34", "--attack", "zeros",
              "--steps", "3", "--micro-batches-per-step", "2", "--micro-batch-size", "2", "--eval-batches", "1",
              "--screen", "strike_limit=4", "--report", str(out), "--quiet"])
    r = json.loads(out.read_text())
    for key in ("precision", "recall", "f1", "detection_latency_steps", "honest_banned", "val_loss_final",
                "train_loss", "val_loss", "tokens_per_s", "flops_per_token", "flag_rates", "config"):
        assert key in r
    assert r["screening_config"]["strike_limit"] == 4
    assert "F1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown attack"):
        sim_main(["--attack", "no_such_attack", "--stages", "2", "--replicas", "3", "--steps", "1"])
