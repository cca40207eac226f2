"""A real multi-process swarm on 127.0.0.1: every role its own process with its own p2pd."""

from __future__ import annotations

import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm


def test_swarm_trains_on_tinyshakespeare(tmp_path, shakespeare):
    # screening off: this test is about the pipeline training over P2P with integrity checks on
    # every message; screening has its own tests (and needs more messages per step, see manifest)
    cfg = SwarmConfig(stages=3, replicas=2, verifiers=2, steps=150, data=str(shakespeare), malicious=0,
                      eval_every=1000, micro_batches_per_step=2, screening=False)
    swarm = LocalSwarm(cfg, tmp_path)
    try:
        swarm.start()
        swarm.wait()
    finally:
        swarm.stop()
    pids = swarm.all_pids()
    report = swarm.report()
    assert report["verifier_reports"] == 2
    assert report["val_loss_last"] < 0.75 * report["val_loss_first"], report
    mb = report["micro_batches"]
    assert mb["accounted"] and mb["lost"] == 0, mb
    assert report["tokens"] == 2 * 150 * cfg.micro_batches_per_step * cfg.micro_batch_size * 64
    assert {p["role"] for p in report["peers"]} == {"bootstrap", "worker", "verifier"}
    assert_all_gone(pids)
