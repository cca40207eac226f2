"""Within-stage averaging: the aggregation rules and the drift log a worker keeps."""

from __future__ import annotations

import pytest
import torch

from sentinel.node.averaging import AveragingLog, aggregate


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
