"""Defaults that live in two places must agree: the launcher cannot import the manifest (torch)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from sentinel.cli.swarm import SCHEDULES, LocalSwarm, SwarmConfig
from sentinel.run.manifest import ManifestError, OptimizerConfig, RunManifest
from sentinel.run.screening import ScreeningConfig


def test_the_launcher_trains_with_the_manifest_defaults() -> None:
    swarm = SwarmConfig(stages=3, replicas=3, verifiers=2, steps=1)
    manifest = RunManifest()
    assert swarm.sync == manifest.training.sync
    assert swarm.averaging == manifest.training.averaging
    assert swarm.micro_batch_size == manifest.training.micro_batch_size
    assert swarm.micro_batches_per_step == manifest.training.micro_batches_per_step
    assert (swarm.eval_every, swarm.eval_batches) == (manifest.training.eval_every, manifest.training.eval_batches)


def test_the_launcher_schedule_follows_the_sync_mode_and_the_manifest_has_no_warmup(tmp_path) -> None:
    # deliberate: the warm-up counts a replica's own optimizer steps (versions in lockstep), so its
    # length depends on the swarm's shape; the launcher knows its shape, a manifest default does not
    assert RunManifest().optimizer.warmup_steps == 0
    lockstep = SwarmConfig()
    assert lockstep.sync == "lockstep" and (lockstep.lr, lockstep.warmup_steps) == SCHEDULES["lockstep"]
    asynchronous = SwarmConfig(sync="async")
    assert (asynchronous.lr, asynchronous.warmup_steps) == SCHEDULES["async"] == (OptimizerConfig().lr, 40)
    manifest = RunManifest.from_dict(LocalSwarm(lockstep, tmp_path).manifest_dict())
    assert (manifest.optimizer.lr, manifest.optimizer.warmup_steps) == SCHEDULES["lockstep"]
    assert manifest.training.sync == "lockstep"
    off = SwarmConfig(sync="async", warmup_steps=0, lr=5e-4)
    manifest = RunManifest.from_dict(LocalSwarm(off, tmp_path / "off").manifest_dict())
    assert (manifest.optimizer.lr, manifest.optimizer.warmup_steps, manifest.training.sync) == (5e-4, 0, "async")
    with pytest.raises(ValueError, match=re.escape("sync must be lockstep|async")):
        SwarmConfig(sync="together")


def test_the_launcher_rejects_a_negative_warmup_before_starting_anything(tmp_path, capsys) -> None:
    from sentinel.cli.swarm import main

    assert main(["--warmup-steps", "-3", "--workdir", str(tmp_path / "run")]) == 2
    assert "--warmup-steps must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_manifest_screening_section_is_a_typed_screening_config() -> None:
    m = RunManifest.from_dict({"screening": {"fence_k": 4.0}})
    assert isinstance(m.screening, ScreeningConfig)
    assert m.screening.fence_k == 4.0 and m.screening.strike_limit == ScreeningConfig().strike_limit
    # it survives the round trip every node makes when it reads the published manifest
    assert RunManifest.from_dict(m.to_dict()).screening == m.screening


@pytest.mark.parametrize("section, bad", [
    ({"screening": {"fense_k": 3.0}}, "fense_k"),
    ({"training": {"micro_batch": 4}}, "micro_batch"),
    ({"optimizer": {"learning_rate": 1e-3}}, "learning_rate"),
    ({"comittee_size": 3}, "comittee_size"),
])
def test_sentinel_bootstrap_refuses_an_unknown_key_anywhere_in_the_config(tmp_path, section, bad) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(section))
    # the real entry point, as a maintainer runs it; it must refuse before any network start
    r = subprocess.run([sys.executable, "-m", "sentinel.cli.bootstrap", "--new-swarm", "--config", str(config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert bad in r.stderr and "known" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_an_out_of_range_screening_value_names_its_section() -> None:
    with pytest.raises(ManifestError, match="screening.*fence_k"):
        RunManifest.from_dict({"screening": {"fence_k": -1.0}})


def test_the_manifest_names_the_sync_modes_it_accepts() -> None:
    from sentinel.run.manifest import TrainingConfig

    assert RunManifest.from_dict({"training": {"sync": "lockstep"}}).training.sync == "lockstep"
    with pytest.raises(ManifestError, match=re.escape("training.sync must be async|lockstep, got 'together'")):
        RunManifest(training=TrainingConfig(sync="together"))
