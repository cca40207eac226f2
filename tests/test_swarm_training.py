"""A real multi-process swarm on 127.0.0.1 trains: every role its own process with its own p2pd,
every tensor signed, checked and screened, no adversary (the clean run the screening tests
compare with, ``conftest.clean_swarm``)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.swarm


def test_swarm_trains_on_tinyshakespeare(clean_swarm):
    cfg, report = clean_swarm
    assert report["verifier_reports"] == cfg.verifiers
    assert report["val_loss_last"] < 0.75 * report["val_loss_first"], report
    mb = report["micro_batches"]
    assert mb["accounted"] and mb["lost"] == 0 and mb["failed"] == 0, mb
    assert mb["total"] == cfg.verifiers * cfg.steps * cfg.micro_batches_per_step, mb
    assert report["tokens"] == cfg.verifiers * cfg.steps * cfg.micro_batches_per_step * cfg.micro_batch_size * 64
    assert {p["role"] for p in report["peers"]} == {"bootstrap", "worker", "verifier"}
    assert report["banned"] == [], report["banned"]  # a clean run bans nobody
    for stage in range(cfg.stages):  # lockstep replicas: one version, one digest, answers alike
        workers = [w for w in report["workers"] if w["stage"] == stage]
        assert all(w["params"]["finite"] and w["lockstep_rounds"] > 0 for w in workers), workers
        assert len({(w["lockstep_version"], w["params_digest"]) for w in workers}) == 1, workers
        assert sum(w["lockstep_proven"] for w in workers) == 0, workers  # every outlier re-checked was honest
    assert all(row["forward_identical"] and row["backward_identical"] in (True, None)
               for rows in report["replica_agreement"] for row in rows), report["replica_agreement"]
