"""Within-stage averaging: the aggregation rules and the drift log a worker keeps."""

from __future__ import annotations

import pytest
import torch

from sentinel.protocol.aggregation import AveragingLog, aggregate


def test_mean_is_the_plain_average():
    vs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    assert torch.allclose(aggregate(vs, "mean"), torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("rule", ["trimmed-mean", "centered-clip"])
def test_robust_rules_ignore_one_far_outlier_among_five(rule):
    gen = torch.Generator().manual_seed(0)
    honest = [torch.randn(64, generator=gen) * 0.01 + 1.0 for _ in range(4)]
    out = aggregate([*honest, torch.full((64,), 1e6)], rule)
    honest_mean = torch.stack(honest).mean(0)
    assert float((out - honest_mean).norm() / honest_mean.norm()) < 0.05
    assert float((aggregate([*honest, torch.full((64,), 1e6)], "mean") - honest_mean).norm()) > 1e3


def test_unknown_rule_and_empty_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate([torch.zeros(2)], "median-of-means")
    with pytest.raises(ValueError, match="nothing to aggregate"):
        aggregate([], "mean")


def test_averaging_log_measures_drift_and_keeps_the_largest_gaps():
    log = AveragingLog(keep=2)
    agg = torch.ones(4)
    first = log.record(step=1, version=3, own=torch.ones(4) * 1.1, agg=agg, peers=2)
    assert first.optimizer_steps == 3 and first.divergence == pytest.approx(0.1, rel=1e-5)
    log.record(step=2, version=5, own=torch.ones(4), agg=agg, peers=2)
    third = log.record(step=3, version=9, own=torch.ones(4) * 1.5, agg=agg, peers=1)
    assert third.optimizer_steps == 4  # counted from the previous round, not from the start
    summary = log.summary()
    assert summary["rounds"] == 3
    assert summary["divergence_mean"] == pytest.approx(0.2, rel=1e-5)
    assert [g["divergence"] for g in summary["largest"]] == pytest.approx([0.5, 0.1], rel=1e-5)


# -- bounded staleness: a worker holds optimizer steps while an overdue round is in flight ------

def _stage_runner(stage: int = 1):
    from sentinel.run.manifest import RunManifest, TrainingConfig
    from sentinel.worker.stage_runner import StageRunner

    torch.manual_seed(0)  # bounded staleness is the asynchronous replicas' rule: they step on their own
    return StageRunner(RunManifest(training=TrainingConfig(sync="async")), stage)


def _backward(runner, i: int, hold: bool) -> None:
    cfg = runner.manifest.model
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    y = runner.forward(("v", i, 0), x)
    runner.backward(("v", i, 0), x, torch.randn_like(y), hold=hold)


def test_held_passes_accumulate_and_step_once_when_the_round_ends():
    runner = _stage_runner()
    before = runner.flat_parameters()
    _backward(runner, 0, hold=True)
    _backward(runner, 1, hold=True)
    assert runner.version == 0 and runner.pending == 2 and runner.stats.held_steps == 2
    assert torch.equal(runner.flat_parameters(), before)  # nothing applied while held
    assert runner.step_if_due()
    assert runner.version == 1 and runner.pending == 0
    assert not torch.equal(runner.flat_parameters(), before)
    assert not runner.step_if_due()  # nothing left to apply
    _backward(runner, 2, hold=False)
    assert runner.version == 2  # not held: steps as usual


def test_worker_holds_only_while_a_round_that_began_max_local_steps_ago_is_in_flight():
    import asyncio

    from sentinel.run.manifest import ManifestError, RunManifest, TrainingConfig
    from sentinel.worker.node import WorkerNode

    async def scenario() -> list[bool]:
        node = WorkerNode(runtime=None, manifest=RunManifest(training=TrainingConfig(max_local_steps=3)))
        node.runner = _stage_runner()
        seen = [node._round_overdue()]  # no round yet
        gate = asyncio.Event()
        node._averaging_task = asyncio.create_task(gate.wait())
        node._last_averaged_version = 0
        node.runner.version = 2
        seen.append(node._round_overdue())  # in flight, 2 steps since it began
        node.runner.version = 3
        seen.append(node._round_overdue())  # in flight, 3 steps: overdue
        gate.set()
        await node._averaging_task
        seen.append(node._round_overdue())  # finished: never hold
        node.executor.shutdown(wait=False)
        return seen

    assert asyncio.run(scenario()) == [False, False, True, False]
    with pytest.raises(ManifestError, match="max_local_steps"):
        RunManifest(training=TrainingConfig(max_local_steps=-1))
