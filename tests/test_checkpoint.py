"""Stage checkpoints (sentinel.worker.checkpoint): resume continues the loss curve; bad files change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sentinel.model.config import ModelConfig
from sentinel.model.corpus import TextCorpus
from sentinel.run.manifest import RunManifest, TrainingConfig
from sentinel.worker import checkpoint as ckpt
from sentinel.worker.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sentinel.worker.stage_runner import StageRunner

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MODEL = ModelConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def manifest(stages: int = 1, model: ModelConfig = MODEL) -> RunManifest:
    # the runner steps on its own after every pass (asynchronous replicas): one pass, one version
    return RunManifest(num_stages=stages, model=model, training=TrainingConfig(sync="async"))


def corpus() -> TextCorpus:
    if SHAKESPEARE.is_file():
        return TextCorpus.from_file(SHAKESPEARE)
    return TextCorpus.default()


def train(runner: StageRunner, data: TextCorpus, steps: range) -> list[float]:
    """One optimizer step per batch (accumulate=1); the whole model is one stage, so forward is the loss."""
    losses = []
    for i in steps:
        x, y = data.batch("train", 8, MODEL.seq_len, seed=0, index=i)
        losses.append(float(runner.forward(("mb", i), x, y)))
        runner.backward(("mb", i), x, None, y)
    return losses


def test_resume_continues_the_loss_curve_exactly(tmp_path: Path) -> None:
    data = corpus()
    torch.manual_seed(0)
    a = StageRunner(manifest(), 0)
    first = train(a, data, range(10))
    path = save_checkpoint(a, checkpoint_path(tmp_path, "run-1", 0), "run-1", max_step=10)
    rest = train(a, data, range(10, 20))
    assert rest[-1] < first[0]  # it learned something: the curve is worth continuing

    b = StageRunner(manifest(), 0)  # a restarted worker: fresh initial parameters
    assert load_checkpoint(b, path, "run-1") == {"version": 10, "max_step": 10}
    assert b.version == 10
    assert train(b, data, range(10, 20)) == pytest.approx(rest, abs=1e-6)


def reject(runner: StageRunner, path: Path, run: str, match: str) -> None:
    before = runner.flat_parameters()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(runner, path, run)
    assert torch.equal(runner.flat_parameters(), before) and runner.version == 0


def test_checkpoints_of_another_run_stage_or_model_are_refused(tmp_path: Path) -> None:
    two = manifest(stages=2)
    saved = StageRunner(two, 1)
    path = save_checkpoint(saved, tmp_path / "c.pt", "run-1")
    reject(StageRunner(two, 1), path, "run-2", "run")
    reject(StageRunner(two, 0), path, "run-1", "stage")
    reject(StageRunner(manifest(2, ModelConfig(vocab_size=256, seq_len=32, d_model=16, n_layers=2, n_heads=2,
                                               d_ff=64)), 1), path, "run-1", "model")


def test_torn_garbage_and_foreign_files_are_refused(tmp_path: Path) -> None:
    runner = StageRunner(manifest(), 0)
    good = save_checkpoint(StageRunner(manifest(), 0), tmp_path / "good.pt", "r")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    reject(runner, torn, "r", "cannot read")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    reject(runner, garbage, "r", "cannot read")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    reject(runner, foreign, "r", "not a sentinel stage checkpoint")
    reject(runner, tmp_path / "missing.pt", "r", "cannot read")


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = StageRunner(manifest(), 0)
    path = save_checkpoint(runner, tmp_path / "c.pt", "r", max_step=1)
    before = path.read_bytes()

    def crash(obj, f, *a, **kw):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(runner, path, "r", max_step=2)
    assert path.read_bytes() == before


def test_find_checkpoints_by_run(tmp_path: Path) -> None:
    for run, stage in (("run/1", 0), ("run/1", 2), ("other", 1)):
        checkpoint_path(tmp_path, run, stage).write_bytes(b"x")
    assert set(find_checkpoints(tmp_path, "run/1")) == {0, 2}
    assert find_checkpoints(tmp_path / "nope", "run/1") == {}
