"""Lockstep stages live: real processes, real P2P. Replicas of a stage average their gradients at
every step boundary and apply one update, so after 50 steps every replica of a stage holds the
same version and parameter digest and answers the same input with the same bits. In the same
swarm a stage-0 replica whose parameters were nudged mid-run re-syncs from its stage instead of
being struck, and a stage-1 attacker whose noise no fence sees is banned by exact spot checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import run_swarm

pytestmark = pytest.mark.swarm

PLUGIN = Path(__file__).with_name("lockstep_diverge.py")


@pytest.fixture(scope="module")
def lockstep_report(tmp_path_factory, shakespeare) -> dict:
    # 2 stages x 3 replicas (a strict majority can outvote one odd replica), one verifier; the
    # two "malicious" slots are stage 0 replica 2 (the nudged one) and stage 1 replica 2 (the
    # attacker). The spot-check share is raised from the default 5 % so that the attacker's
    # hops are checked many times over in 40 steps, whatever the routing.
    cfg = SwarmConfig(stages=2, replicas=3, verifiers=1, committee_size=1, steps=50, data=str(shakespeare),
                      malicious=2, attack=f"{PLUGIN}:DivergeOrLie", attack_direction="forward", attack_start=0,
                      eval_every=1000,
                      screening_overrides={"spot_check": 0.25})
    return run_swarm(LocalSwarm(cfg, tmp_path_factory.mktemp("lockstep")))


def test_replicas_of_a_live_stage_stay_bit_identical(lockstep_report) -> None:
    r = lockstep_report
    assert r["val_loss_last"] < r["val_loss_first"], r
    mb = r["micro_batches"]
    assert mb["accounted"] and mb["failed"] == 0, mb
    banned = {b["name"] for b in r["banned"]}
    for stage in range(2):
        workers = [w for w in r["workers"] if w["stage"] == stage and w["name"] not in banned]
        assert len(workers) == (3 if stage == 0 else 2), (workers, banned)
        assert len({(w["lockstep_version"], w["params_digest"]) for w in workers}) == 1, workers
        assert workers[0]["lockstep_version"] >= 40, workers  # about one version per step
    (rows,) = r["replica_agreement"]  # the unbanned replicas, one step past training
    for row, n in zip(rows, (3, 2), strict=True):
        assert row["answered"] == row["backward_answered"] == n, row
        assert row["forward_identical"] is True and row["digests"] == 1 and len(row["versions"]) == 1, row
    assert rows[1]["backward_identical"] is True, rows


def test_a_diverged_replica_resyncs_instead_of_being_struck(lockstep_report) -> None:
    r = lockstep_report
    (nudged,) = [w for w in r["workers"] if w["malicious"] and w["stage"] == 0]
    assert nudged["resyncs"] >= 1, nudged
    assert nudged["name"] not in {b["name"] for b in r["banned"]}, r["banned"]


def test_exact_spot_checks_ban_an_attacker_the_fences_pass(lockstep_report) -> None:
    r = lockstep_report
    (attacker,) = [w["name"] for w in r["workers"] if w["malicious"] and w["stage"] == 1]
    assert [b["name"] for b in r["banned"]] == [attacker], r["banned"]
    assert r["honest_banned"] == []
