"""SENTINEL screening on a live multi-process swarm (``conftest.live_config``: 3 stages x 3
replicas, 3 verifiers, tinyshakespeare), attacked from step ATTACK_START by one replica of every
stage at once, beside a byzantine verifier:

- stage 0 sign-flips the activations it sends forward;
- stage 1 adds Gaussian noise to the gradients it sends back;
- stage 2 poisons its stage's lockstep rounds (its gradient contribution, sign-flipped x10, in
  every round), while its activations and gradients stay honest: its replicas recompute the
  outlier from the passes it claims, leave it out and report it, and every verifier recomputes
  it from the evidence;
- one verifier of the committee of 3 votes to ban an honest stage-1 worker and never votes
  against an attacker.

Every attacker must be banned by the two honest votes, nobody honest banned (the frame never
endorsed), nothing lost, the honest stage-2 parameters as large as in the clean run
(``conftest.clean_swarm``), and the model must still train. The gap to the clean run's
validation loss is printed, not asserted: at this length two clean live runs differ by about as
much as the attacks cost once banned, so the 5 % damage bound is asserted in the simulator,
where clean, defended and undefended runs share their seed (``test_sim.py``).
"""

from __future__ import annotations

import json

import pytest

from sentinel.cli.swarm import LocalSwarm
from tests.conftest import ATTACK_START, live_config, run_swarm

pytestmark = pytest.mark.swarm

ATTACKS = {0: "sign_flip,directions=forward", 1: "gaussian,directions=backward", 2: "avg_scaling"}
# Steps from the first attack to the effective ban: sign flips are banned in about 4, Gaussian
# noise on gradients (flagged on some of its messages only) in up to 12 at five strikes to a ban.
MAX_LATENCY = 15
# Honest stage-2 parameter norms against the clean run's: the poison pushes against the training
# direction x10 every round, so an uncontained attacker moves the norm by far more.
MAX_NORM_GAP = 0.05


def test_an_attacker_in_every_stage_and_a_framing_verifier(tmp_path, shakespeare, clean_swarm):
    _, clean = clean_swarm
    cfg = live_config(shakespeare, frame_verifiers=1)
    swarm = LocalSwarm(cfg, tmp_path)
    attackers = {}
    for stage, spec in ATTACKS.items():
        node = next(w for w in swarm.workers if w.stage == stage and w.name.endswith(f"r{cfg.replicas - 1}"))
        node.attack = spec
        attackers[stage] = node.peer_id
    report = run_swarm(swarm)

    assert report["honest_banned"] == [], report["banned"]
    assert {b["peer"] for b in report["banned"]} == set(attackers.values()), report["banned"]
    framer = swarm.verifiers[-1]
    for stage, peer in attackers.items():
        ban = next(b for b in report["banned"] if b["peer"] == peer)
        latency = ban["step"] - ATTACK_START
        print(f"stage {stage} {ATTACKS[stage]}: banned {latency} steps after its first attack "
              f"(limit {MAX_LATENCY}) by {ban['votes']} for {ban['reasons']}")
        assert len(ban["votes"]) >= 2 and framer.name not in ban["votes"], ban  # the 2 honest of 3
        assert latency <= MAX_LATENCY, ban
    assert "gradient" in next(b for b in report["banned"] if b["peer"] == attackers[2])["reasons"]
    for boundary in ("stage0/forward", "stage1/backward"):
        assert report["flags"].get(boundary, 0) >= 3, (boundary, report["flags"])
    assert report["flags"].get("stage2/average", 0) >= 2, report["flags"]  # one upheld proof per honest verifier
    assert report["micro_batches"]["lost"] == 0, report["micro_batches"]

    votes = {v.name: json.loads(v.report_path.read_text())["my_votes"] for v in swarm.verifiers}
    framed = [p for p in votes[framer.name] if p not in attackers.values()]
    assert framed, "the byzantine verifier never cast its framing vote"
    for name, mine in votes.items():
        if name != framer.name:
            assert not set(mine) & set(framed), (name, mine)  # nobody honest endorsed the frame

    gap = (report["val_loss_last"] - clean["val_loss_last"]) / clean["val_loss_last"]
    print(f"val loss {report['val_loss_first']:.4f} -> {report['val_loss_last']:.4f}, "
          f"clean {clean['val_loss_last']:.4f} ({gap:+.1%})")
    assert report["val_loss_last"] < 0.75 * report["val_loss_first"], report
    clean_norms = {w["name"]: w["params"]["norm"] for w in clean["workers"] if w["stage"] == 2}
    for w in report["workers"]:
        if w["stage"] != 2 or w["malicious"]:
            continue
        assert w["params"]["finite"] and w["lockstep_rounds"] > 0 and w["lockstep_proven"] >= 1, w
        norm_gap = abs(w["params"]["norm"] - clean_norms[w["name"]]) / clean_norms[w["name"]]
        print(f"{w['name']}: parameter norm {w['params']['norm']:.3f} vs clean {clean_norms[w['name']]:.3f} "
              f"({norm_gap:+.2%})")
        assert norm_gap <= MAX_NORM_GAP, (w, clean_norms)
