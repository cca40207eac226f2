"""Lockstep stages live: real processes, real P2P. Replicas of a stage average their gradients at
every step boundary and apply one update, so after 50 steps every replica of a stage holds the
same version and parameter digest and answers the same input with the same bits; a replica whose
parameters were nudged mid-run re-syncs from its stage instead of being struck."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import run_swarm

pytestmark = pytest.mark.swarm

DIVERGE = Path(__file__).with_name("lockstep_diverge.py")


@pytest.fixture(scope="module")
def lockstep_report(tmp_path_factory, shakespeare) -> dict:
    # 2 stages x 3 replicas (a strict majority can outvote one diverged replica), one verifier;
    # the "malicious" worker (stage 0, replica 2) only nudges its own parameters once at step 20
    cfg = SwarmConfig(stages=2, replicas=3, verifiers=1, committee_size=1, steps=50, data=str(shakespeare),
                      malicious=1, attack=f"{DIVERGE}:Diverge", attack_direction="forward", attack_start=0,
                      eval_every=1000, training_overrides={"sync": "lockstep"})
    return run_swarm(LocalSwarm(cfg, tmp_path_factory.mktemp("lockstep")))


def test_replicas_of_a_live_stage_stay_bit_identical(lockstep_report) -> None:
    r = lockstep_report
    assert r["val_loss_last"] < r["val_loss_first"], r
    mb = r["micro_batches"]
    assert mb["accounted"] and mb["failed"] == 0, mb
    for stage in range(2):
        workers = [w for w in r["workers"] if w["stage"] == stage]
        assert len(workers) == 3, workers
        assert len({(w["lockstep_version"], w["params_digest"]) for w in workers}) == 1, workers
        assert workers[0]["lockstep_version"] >= 40, workers  # about one version per step
    (rows,) = r["replica_agreement"]
    for row in rows:
        assert row["answered"] == row["backward_answered"] == 3, row
        assert row["forward_identical"] is True and row["digests"] == 1 and len(row["versions"]) == 1, row
    assert rows[1]["backward_identical"] is True, rows


def test_a_diverged_replica_resyncs_instead_of_being_struck(lockstep_report) -> None:
    r = lockstep_report
    (nudged,) = [w for w in r["workers"] if w["malicious"]]
    assert nudged["resyncs"] >= 1, nudged
    assert r["banned"] == [], r["banned"]


@pytest.fixture(scope="module")
def spot_report(tmp_path_factory, shakespeare) -> dict:
    # an attacker the fences cannot see (1 % relative noise on stage 0's output) against exact
    # spot checks; the share is raised from the default 5 % so that a 40-step run checks the
    # attacker's hops many times over, whatever the routing
    cfg = SwarmConfig(stages=2, replicas=3, verifiers=1, committee_size=1, steps=40, data=str(shakespeare),
                      malicious=1, attack="invisible,eps=0.01", attack_direction="forward", attack_start=10,
                      eval_every=1000, training_overrides={"sync": "lockstep"},
                      screening_overrides={"spot_check": 0.25})
    return run_swarm(LocalSwarm(cfg, tmp_path_factory.mktemp("lockstep-spot")))


def test_exact_spot_checks_ban_an_attacker_the_fences_pass(spot_report) -> None:
    r = spot_report
    (attacker,) = r["malicious"]
    assert [b["peer"] for b in r["banned"]] == [attacker], r["banned"]
    assert r["honest_banned"] == []
    (rows,) = r["replica_agreement"]  # the two honest replicas of stage 0 still agree exactly
    assert all(row["forward_identical"] is True and row["digests"] == 1 for row in rows), rows
