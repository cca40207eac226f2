"""SENTINEL screening on a live multi-process swarm (3 stages x 3 replicas, 3 verifiers, tinyshakespeare).

One malicious worker in the middle stage, separately: sign flip on its activations, and Gaussian
noise on its gradients. Each must be banned by a committee majority within 10 steps of its
first attack (see MAX_LATENCY), with no honest worker banned, and the final validation loss within 5 % of a clean run of the same length (one clean
run serves both). The Gaussian run also has a byzantine verifier in
the committee of 3, which votes to ban an honest worker and never votes against the attacker:
the honest worker must survive and the attacker must still be banned by the two honest votes.
"""

from __future__ import annotations

import json

import pytest

from sentinel.swarm import LocalSwarm, SwarmConfig
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm

STEPS = 30
ATTACK_START = 12
# The target: steps from the first attack to the effective ban. On this 2-core machine
# the sign flip was banned within 0-3 steps in every live run; the Gaussian-backward attacker
# within 4-7 steps in 4 of 7 runs (11, 16 and 11 in the others) until probation and short
# recalibrations (``screen.py``), and within 2-4 steps in every live run since (7 runs); the
# simulator with this test's settings took 2-8 steps over 8 seeds.
MAX_LATENCY = 10
# The bound on the final validation loss against one clean run of the same length. Two
# clean runs differ too (asynchronous training); at lr 3e-3 by up to 11 % at step 30, because
# runs left the unigram plateau at different steps, and this check failed in 2 of 5 clean-clone
# runs; at lr 1e-3 (the default since) see BENCHMARKS.md for the measured gaps.
MAX_VAL_GAP = 0.05


def _config(shakespeare, **kw) -> SwarmConfig:
    base = dict(stages=3, replicas=3, verifiers=3, steps=STEPS, data=str(shakespeare), malicious=1,
                attack_start=ATTACK_START, eval_every=1000)
    return SwarmConfig(**{**base, **kw})


def _run(cfg: SwarmConfig, workdir) -> tuple[LocalSwarm, dict]:
    swarm = LocalSwarm(cfg, workdir)
    try:
        swarm.start()
        swarm.wait()
    finally:
        swarm.stop()
    assert_all_gone(swarm.all_pids())
    return swarm, swarm.report()


@pytest.fixture(scope="module")
def clean_report(tmp_path_factory, shakespeare) -> dict:
    _, report = _run(_config(shakespeare, malicious=0), tmp_path_factory.mktemp("clean"))
    assert report["banned"] == [], report["banned"]
    assert report["micro_batches"]["lost"] == 0
    return report


def _check_attacker_banned(cfg: SwarmConfig, report: dict, clean: dict, record_property=None) -> dict:
    attacker = next(p for p in report["peers"] if p["malicious"])
    assert attacker["stage"] == 1
    assert report["honest_banned"] == [], report["banned"]
    assert [b["peer"] for b in report["banned"]] == [attacker["id"]], report["banned"]
    ban = report["banned"][0]
    assert len(ban["votes"]) >= 2, ban  # a strict majority of the 3-member committee
    latency = ban["step"] - cfg.attack_start
    print(f"ban latency {latency} steps (limit {MAX_LATENCY})")
    if record_property is not None:
        record_property("ban_latency_steps", latency)
    assert latency <= MAX_LATENCY, ban
    assert report["micro_batches"]["lost"] == 0
    gap = (report["val_loss_last"] - clean["val_loss_last"]) / clean["val_loss_last"]
    print(f"val loss {report['val_loss_last']:.4f} vs clean {clean['val_loss_last']:.4f}: {gap:+.1%}")
    if record_property is not None:
        record_property("val_gap", round(gap, 4))
    assert gap <= MAX_VAL_GAP, (report["val_loss_last"], clean["val_loss_last"])
    return ban


def test_sign_flip_forward_attacker_is_banned(tmp_path, shakespeare, clean_report, record_property):
    cfg = _config(shakespeare, attack="sign_flip", attack_direction="forward")
    _, report = _run(cfg, tmp_path)
    _check_attacker_banned(cfg, report, clean_report, record_property)
    assert report["flags"].get("stage1/forward", 0) >= 3


def test_gaussian_backward_attacker_is_banned_despite_a_framing_verifier(tmp_path, shakespeare, clean_report,
                                                                          record_property):
    cfg = _config(shakespeare, attack="gaussian", attack_direction="backward", frame_verifiers=1)
    swarm, report = _run(cfg, tmp_path)
    ban = _check_attacker_banned(cfg, report, clean_report, record_property)
    assert report["flags"].get("stage1/backward", 0) >= 3
    framer = swarm.verifiers[-1]
    votes = {v.name: json.loads(v.report_path.read_text())["my_votes"] for v in swarm.verifiers}
    framed = [p for p in votes[framer.name] if p != ban["peer"]]
    assert framed, "the byzantine verifier never cast its framing vote"
    assert ban["peer"] not in votes[framer.name]  # it never votes against the attacker
    assert framer.name not in ban["votes"]
    for name, mine in votes.items():
        if name != framer.name:
            assert not set(mine) & set(framed), (name, mine)  # nobody honest endorsed the frame
