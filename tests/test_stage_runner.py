"""The stage runner: the learning-rate warm-up and its manifest checks, and the lockstep half (an
agreed gradient applied, a replica's state adopted as a copy)."""

from __future__ import annotations

import pytest
import torch

from sentinel.model.config import ModelConfig
from sentinel.model.corpus import TextCorpus
from sentinel.run.manifest import ManifestError, OptimizerConfig, RunManifest
from sentinel.worker.stage_runner import StageRunner

MODEL = ModelConfig(vocab_size=256, seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)


def _lrs(warmup: int, steps: int, lr: float = 1e-3) -> list[float]:
    """The learning rate each of ``steps`` optimizer steps of a one-stage runner applied."""
    runner = StageRunner(RunManifest(num_stages=1, model=MODEL,
                                     optimizer=OptimizerConfig(lr=lr, warmup_steps=warmup)), 0)
    data = TextCorpus.default()
    seen = []
    for i in range(steps):
        x, y = data.batch("train", 2, MODEL.seq_len, seed=0, index=i)
        runner.forward(("mb", i), x, y)
        runner.backward(("mb", i), x, None, y)
        seen.append(runner.optimizer.param_groups[0]["lr"])
    assert runner.version == steps
    return seen


def test_warmup_ramps_the_learning_rate_linearly_then_holds_it() -> None:
    assert _lrs(4, 6) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_no_warmup_keeps_the_learning_rate() -> None:
    assert _lrs(0, 3) == [1e-3] * 3


def test_a_warmed_up_runner_moves_less_in_its_first_step() -> None:
    def first_step(warmup: int) -> float:
        torch.manual_seed(0)
        runner = StageRunner(RunManifest(num_stages=1, model=MODEL,
                                         optimizer=OptimizerConfig(warmup_steps=warmup)), 0)
        before = runner.flat_parameters().clone()
        x, y = TextCorpus.default().batch("train", 2, MODEL.seq_len, seed=0, index=0)
        runner.forward(("mb", 0), x, y)
        runner.backward(("mb", 0), x, None, y)
        return float((runner.flat_parameters() - before).abs().max())

    # Adam's first step moves each weight by about lr: a tenth of it under a 10-step warm-up
    assert first_step(10) == pytest.approx(first_step(0) / 10, rel=0.05)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_the_manifest_rejects_a_bad_warmup(bad) -> None:
    with pytest.raises(ManifestError, match="warmup_steps"):
        RunManifest(optimizer=OptimizerConfig(warmup_steps=bad))


def test_an_adopted_state_is_a_copy_and_a_wrong_sized_gradient_is_refused() -> None:
    manifest = RunManifest(num_stages=1, model=MODEL)
    a, b = StageRunner(manifest, 0), StageRunner(manifest, 0)
    x, y = TextCorpus.default().batch("train", 2, MODEL.seq_len, seed=0, index=0)
    a.forward(("mb", 0), x, y)
    a.backward(("mb", 0), x, None, y, hold=True)
    grad, passes = a.accumulated_gradient()
    assert passes == 1 and grad.numel() == a.num_parameters() and grad.abs().sum() > 0
    a.apply_gradient(grad)
    b.load_state(a.state())
    assert b.digest() == a.digest() and b.version == a.version == 1
    a.apply_gradient(grad)  # a moves on; b's optimizer moments must not move with it
    assert b.digest() != a.digest()
    b.apply_gradient(grad)
    assert b.digest() == a.digest()
    with pytest.raises(ValueError, match="gradient of"):
        a.apply_gradient(grad[:-1])
