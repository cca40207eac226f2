"""The stage runner: the learning-rate warm-up and its manifest checks, and the lockstep half (an
agreed gradient applied, a replica's state adopted as a copy)."""

from __future__ import annotations

import pytest
import torch

from sentinel.model.config import ModelConfig
from sentinel.model.corpus import TextCorpus
from sentinel.run.manifest import ManifestError, OptimizerConfig, RunManifest, TrainingConfig
from sentinel.worker.stage_runner import StageRunner

MODEL = ModelConfig(vocab_size=256, seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
ASYNC = TrainingConfig(sync="async")  # the runner steps on its own after each pass


def _lrs(warmup: int, steps: int, lr: float = 1e-3) -> list[float]:
    """The learning rate each of ``steps`` optimizer steps of a one-stage runner applied."""
    runner = StageRunner(RunManifest(num_stages=1, model=MODEL, training=ASYNC,
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
        runner = StageRunner(RunManifest(num_stages=1, model=MODEL, training=ASYNC,
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


def _lockstep_runner(stage: int = 1, stages: int = 3) -> StageRunner:
    from sentinel.run.manifest import TrainingConfig

    model = ModelConfig(vocab_size=256, seq_len=16, d_model=16, n_layers=3, n_heads=2, d_ff=32)
    return StageRunner(RunManifest(num_stages=stages, model=model, training=TrainingConfig(sync="lockstep")), stage)


def _hidden(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, MODEL.seq_len, MODEL.d_model)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_a_lockstep_runner_only_accumulates_until_the_agreed_gradient() -> None:
    runner = _lockstep_runner()
    before = runner.flat_parameters()
    for i in range(3):
        x, g = _hidden(i)
        runner.forward(("mb", i), x)
        runner.backward(("mb", i), x, g)
    assert runner.version == 0 and runner.pending == 3
    assert torch.equal(runner.flat_parameters(), before)
    grad, count = runner.accumulated_gradient()
    assert count == 3
    runner.apply_gradient(grad)
    assert runner.version == 1 and not torch.equal(runner.flat_parameters(), before)


def test_a_probe_backward_answers_like_backward_and_leaves_the_update_alone() -> None:
    a, b = _lockstep_runner(), _lockstep_runner()
    x, g = _hidden(0)
    probe = a.probe_backward(x, g)
    assert all(p.grad is None for p in a.module.parameters())  # nothing accumulated
    assert torch.equal(probe, b.backward(("mb", 0), x, g))  # the same bits a training pass returns
    last = _lockstep_runner(2)
    ids = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len))
    assert last.probe_backward(x, None, ids).shape == x.shape
    assert _lockstep_runner(0).probe_backward(ids, g) is None  # stage 0 answers nothing


def test_a_flat_state_round_trip_makes_a_bit_identical_replica() -> None:
    """What a re-syncing replica adopts over the wire: parameters, AdamW moments and step
    counts; afterwards both replicas take the next step to the same bits."""
    a, b = _lockstep_runner(), _lockstep_runner()
    for i in range(3):  # a is 3 versions ahead of b
        x, g = _hidden(i)
        a.backward(("mb", i), x, g)
        a.apply_gradient(a.accumulated_gradient()[0])
    flat, steps = a.flat_state()
    assert flat.numel() == 3 * a.num_parameters() and set(steps) == {3}
    b.load_flat_state(flat, steps, a.version)
    assert (b.version, b.digest()) == (a.version, a.digest())
    x, g = _hidden(9)
    for r in (a, b):
        r.backward(("mb", 9), x, g)
        r.apply_gradient(r.accumulated_gradient()[0])
    assert a.digest() == b.digest()
    with pytest.raises(ValueError, match="expected a state"):
        b.load_flat_state(flat[:-1], steps, 1)
