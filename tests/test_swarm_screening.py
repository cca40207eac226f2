"""SENTINEL screening on a live multi-process swarm: a sign-flipping worker in a middle stage is
caught, struck and banned by a committee majority, and no honest worker is banned."""

from __future__ import annotations

import pytest

from sentinel.swarm import LocalSwarm, SwarmConfig
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm


def test_sign_flip_forward_attacker_is_banned(tmp_path, shakespeare):
    cfg = SwarmConfig(stages=3, replicas=3, verifiers=3, steps=40, data=str(shakespeare), malicious=1,
                      attack="sign_flip", attack_direction="forward", attack_start=12, eval_every=1000)
    swarm = LocalSwarm(cfg, tmp_path)
    try:
        swarm.start()
        swarm.wait()
    finally:
        swarm.stop()
    report = swarm.report()
    attacker = next(p for p in report["peers"] if p["malicious"])
    assert attacker["stage"] == 1
    assert report["honest_banned"] == [], report["banned"]
    assert [b["peer"] for b in report["banned"]] == [attacker["id"]], report["banned"]
    ban = report["banned"][0]
    assert len(ban["votes"]) >= 2  # a strict majority of the 3-member committee
    # measured: banned 7-12 steps after the first attack (the target is 10)
    assert ban["step"] - cfg.attack_start <= 20, ban
    assert report["micro_batches"]["lost"] == 0
    assert report["flags"].get("stage1/forward", 0) >= 3
    assert_all_gone(swarm.all_pids())
