"""The verifier's journal: what a restarted verifier takes back, and what it refuses.

The live drill (``test_swarm_faults.py::test_sigkill_verifier_mid_step_resumes_from_its_journal``)
kills a real verifier mid-step; here the file handling: a journal of another run or identity,
or a damaged one, is ignored with a warning, never half-loaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sentinel.model.corpus import load_corpus
from sentinel.protocol.identity import Identity
from sentinel.run.manifest import RunManifest
from sentinel.verifier.node import VerifierNode, write_json


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("default")


def _node(corpus, journal, peer: str) -> VerifierNode:
    runtime = SimpleNamespace(peer_id=peer)  # the journal is read before any network is touched
    return VerifierNode(runtime, RunManifest(run_id="journal-test"), corpus, steps=50, journal_path=str(journal))


def test_a_journal_round_trip_resumes_after_its_last_step(tmp_path, corpus) -> None:
    peer = Identity.generate().peer_id
    worker = Identity.generate().peer_id
    first = _node(corpus, tmp_path / "j.json", peer)
    assert first.start_step == 0
    first.step, first.tokens, first.train_seconds = 7, 3584, 12.5
    first.train_losses, first.val_losses = [(s, 5.0 - 0.1 * s) for s in range(1, 8)], [(0, 5.5)]
    first.prior = {"total": 28, "completed": 28, "per_step": {str(s): {"micro_batches": 4, "completed": 4,
                                                                        "failed": 0} for s in range(1, 8)}}
    first.ledger.record(worker, True)
    first.ledger.record(worker, False)
    first.flag_counts["stage1/forward"] = 1
    first._write_journal()

    again = _node(corpus, tmp_path / "j.json", peer)
    assert again.start_step == 7 and again.step == 7
    assert again.train_losses == first.train_losses and again.val_losses == [(0, 5.5)]
    assert again.tokens == 3584 and again.train_seconds == 12.5
    assert again.ledger.state(worker).strikes == first.ledger.state(worker).strikes > 0
    assert again.flag_counts["stage1/forward"] == 1
    assert again.resumed == [{"after_step": 7, "retried_step": 8}]
    acc = again._accounting()
    assert acc["total"] == 28 and sorted(acc["per_step"], key=int) == [str(s) for s in range(1, 8)]


@pytest.mark.parametrize("case", ["other_identity", "other_run", "garbage", "bad_step", "missing_step"])
def test_a_foreign_or_damaged_journal_is_ignored(tmp_path, corpus, case: str) -> None:
    peer = Identity.generate().peer_id
    path = tmp_path / "j.json"
    good = {"run": "journal-test", "peer": peer, "step": 5, "train_losses": [[1, 4.0]], "val_losses": []}
    if case == "other_identity":
        write_json(path, {**good, "peer": Identity.generate().peer_id})
    elif case == "other_run":
        write_json(path, {**good, "run": "another-run"})
    elif case == "garbage":
        path.write_bytes(b"\x00{not json")
    elif case == "bad_step":
        write_json(path, {**good, "step": 10_000})
    else:
        write_json(path, {k: v for k, v in good.items() if k != "step"})
    node = _node(corpus, path, peer)
    assert node.start_step == 0 and node.step == 0 and node.train_losses == [] and node.resumed == []
    assert path.exists()  # left in place for a human to read, not deleted or overwritten on start
