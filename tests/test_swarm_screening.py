"""SENTINEL screening on a live multi-process swarm (3 stages x 3 replicas, 3 verifiers, tinyshakespeare).

One malicious worker in the middle stage, separately: sign flip on its activations, and Gaussian
noise on its gradients. Each must be banned by a committee majority within 10 steps of its
first attack (see MAX_LATENCY), with no honest worker banned, and the final validation loss
within 5 % of a clean run of the same length, 60 steps (one clean run serves both; MAX_VAL_GAP
says why that holds although two clean runs differ). The Gaussian run also has a byzantine verifier in
the committee of 3, which votes to ban an honest worker and never votes against the attacker:
the honest worker must survive and the attacker must still be banned by the two honest votes.
"""

from __future__ import annotations

import json

import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm

STEPS = 60
ATTACK_START = 12
# The target: steps from the first attack to the effective ban. On this 2-core machine
# the sign flip was banned within 0-3 steps in every live run; the Gaussian-backward attacker
# within 4-7 steps in 4 of 7 runs (11, 16 and 11 in the others) until probation and short
# recalibrations (``screen.py``), and within 2-4 steps in the 7 live runs after; with the
# launcher's warm-up (2026-11-25) the sign flip within 0-2 steps over 8 runs and the Gaussian
# within 1-7 over 8. The simulator with this test's settings took 2-8 steps over 8 seeds at lr
# 3e-3, 2-4 at lr 1e-3 (sign flip: 1-2).
MAX_LATENCY = 10
# The final validation loss against one clean run of the same length: within the 5 %.
# Two runs of this asynchronous swarm differ with no attack at all (which replica computes which
# micro-batch, and when each replica's averaging rounds fall, differ between runs; the data order
# is fixed). The launcher's learning-rate warm-up (``SwarmConfig.warmup_steps``, 40 optimizer
# steps) narrowed that: measured on this machine (2026-11-25, BENCHMARKS.md "Live screening test"),
# eleven clean runs ended at 2.334-2.407 (standard deviation 1.2 %) and sixteen attacked runs of
# this file's two shapes at 2.327-2.417 (1.2 %; mean 0.1 % below the clean mean, so the attacks do
# no measurable damage once banned); all 176 attacked-vs-clean pairs were within -3.3..+3.6 %, and
# a normal fit puts one comparison over 5 % about once in a thousand. Without the warm-up clean
# runs spread 5.2 % and this bound was 10 %.
MAX_VAL_GAP = 0.05
# The averaging test (the issue on Byzantine-robust averaging) judges containment by the honest
# parameter norms (MAX_NORM_GAP); its validation loss only has to stay in the same regime, and a
# second 5 % comparison against the shared clean run would double the suite's noise risk for no
# acceptance point.
AVERAGING_VAL_GAP = 0.10


def _config(shakespeare, **kw) -> SwarmConfig:
    # 16 validation micro-batches (16 x 8 x 64 tokens) instead of 4: two models are compared on
    # one final evaluation, so its sampling noise counts against the 5 % twice
    base = dict(stages=3, replicas=3, verifiers=3, steps=STEPS, data=str(shakespeare), malicious=1,
                attack_start=ATTACK_START, eval_every=1000, eval_batches=16)
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


def _check_attacker_banned(cfg: SwarmConfig, report: dict, clean: dict, record_property=None,
                           max_gap: float = MAX_VAL_GAP) -> dict:
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
    print(f"val loss {report['val_loss_last']:.4f} vs clean {clean['val_loss_last']:.4f}: {gap:+.1%} "
          f"(at most {max_gap:.0%})")
    if record_property is not None:
        record_property("val_gap", round(gap, 4))
    assert gap <= max_gap, (report["val_loss_last"], clean["val_loss_last"])
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


# The averaging axis (issue: Byzantine-robust averaging inside a stage). The attacker sends honest
# activations and gradients and contributes its sign-flipped update x10 to every averaging round
# of its stage (``avg_scaling``); its replicas aggregate with CenteredClip, complain with its
# signed contribution, and the verifiers re-judge and ban through the same ledger and committee
# (default screening: ``averaging_outlier_ratio`` 3, ``averaging_outlier_floor`` 0.02). Rounds
# gather (``averaging_partition: auto`` for this small stage); butterfly rounds, where the
# attacker also lies as a reducer, are ``test_butterfly.py`` and ``test_butterfly_p2p.py``.
# Honest parameter norms against the clean run's, same stage: the poison pushes against the
# training direction x10 every round, so an uncontained attacker moves the norm by far more.
MAX_NORM_GAP = 0.05


def test_poisoned_averaging_contributions_get_the_replica_banned(tmp_path, shakespeare, clean_report,
                                                                 record_property):
    cfg = _config(shakespeare, attack="avg_scaling", attack_direction="forward", averaging="centered-clip")
    _, report = _run(cfg, tmp_path)
    ban = _check_attacker_banned(cfg, report, clean_report, record_property, max_gap=AVERAGING_VAL_GAP)
    assert "contribution" in ban["reasons"], ban
    assert report["flags"].get("stage1/average", 0) >= 3, report["flags"]
    clean_norms = {w["name"]: w["params"]["norm"] for w in clean_report["workers"] if w["stage"] == 1}
    for w in report["workers"]:
        if w["stage"] != 1 or w["malicious"]:
            continue
        assert w["params"]["finite"], w
        gap = abs(w["params"]["norm"] - clean_norms[w["name"]]) / clean_norms[w["name"]]
        print(f"{w['name']}: parameter norm {w['params']['norm']:.3f} vs clean {clean_norms[w['name']]:.3f} "
              f"({gap:+.2%}), drift from the stage average per round {w['averaging_divergence']:.2%}")
        assert gap <= MAX_NORM_GAP, (w, clean_norms)
        assert w["averaging_rounds"] > 0, w
