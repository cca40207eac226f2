"""Defaults that live in two places must agree: the launcher cannot import the manifest (torch)."""

from __future__ import annotations

from sentinel.bootstrap.manifest import OptimizerConfig, RunManifest
from sentinel.swarm import SwarmConfig


def test_the_launcher_trains_with_the_manifest_defaults() -> None:
    swarm = SwarmConfig(stages=3, replicas=3, verifiers=2, steps=1)
    manifest = RunManifest()
    assert swarm.lr == OptimizerConfig().lr == manifest.optimizer.lr
    assert swarm.micro_batch_size == manifest.training.micro_batch_size
    assert swarm.micro_batches_per_step == manifest.training.micro_batches_per_step
    assert (swarm.eval_every, swarm.eval_batches) == (manifest.training.eval_every, manifest.training.eval_batches)
