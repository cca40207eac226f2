"""Defaults that live in two places must agree: the launcher cannot import the manifest (torch)."""

from __future__ import annotations

from sentinel.bootstrap.manifest import OptimizerConfig, RunManifest
from sentinel.swarm import LocalSwarm, SwarmConfig


def test_the_launcher_trains_with_the_manifest_defaults() -> None:
    swarm = SwarmConfig(stages=3, replicas=3, verifiers=2, steps=1)
    manifest = RunManifest()
    assert swarm.lr == OptimizerConfig().lr == manifest.optimizer.lr
    assert swarm.micro_batch_size == manifest.training.micro_batch_size
    assert swarm.micro_batches_per_step == manifest.training.micro_batches_per_step
    assert (swarm.eval_every, swarm.eval_batches) == (manifest.training.eval_every, manifest.training.eval_batches)


def test_the_launcher_warms_up_and_the_manifest_does_not(tmp_path) -> None:
    # deliberate: the warm-up counts a replica's own optimizer steps, so its length depends on the
    # swarm's shape; the launcher knows its shape, a manifest default does not (SwarmConfig.warmup_steps)
    assert RunManifest().optimizer.warmup_steps == 0
    swarm = SwarmConfig(warmup_steps=40)
    assert SwarmConfig().warmup_steps == 40
    manifest = RunManifest.from_dict(LocalSwarm(swarm, tmp_path).manifest_dict())
    assert manifest.optimizer.warmup_steps == 40
    assert RunManifest.from_dict(LocalSwarm(SwarmConfig(warmup_steps=0), tmp_path / "off").manifest_dict()
                                 ).optimizer.warmup_steps == 0


def test_the_launcher_rejects_a_negative_warmup_before_starting_anything(tmp_path, capsys) -> None:
    from sentinel.swarm import main

    assert main(["--warmup-steps", "-3", "--workdir", str(tmp_path / "run")]) == 2
    assert "--warmup-steps must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
