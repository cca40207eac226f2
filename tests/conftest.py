"""Shared fixtures: where the real corpora live, a session-wide reaper of child processes, and the
clean live swarm that the training and screening tests share."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"real corpus not found at {path} (CI checks out ../shared beside the repo)")
    return path


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    """Whatever a test leaves behind (a node, its p2pd) is killed by PID at the end of the session."""
    yield
    me = psutil.Process(os.getpid())
    leftovers = me.children(recursive=True)
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)


def assert_all_gone(pids: set[int], timeout: float = 30.0) -> None:
    """Every PID we started (nodes and their p2pd daemons) has exited."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes still running: {[(p.pid, p.name()) for p in alive]}"


# The live swarm the training and screening tests run: 3 stages x 3 replicas, 3 verifiers (a
# committee of 3), tinyshakespeare, replicas averaging with CenteredClip (the robust rule an
# averaging attacker is tested against). Attacks begin after the launcher's learning-rate warm-up
# has settled the verifiers' fences (about 10 verifier steps); the run goes on 18 steps after it,
# room for the slowest ban (Gaussian noise on gradients: 7-12 steps, the test allows 15).
LIVE_STEPS = 30
ATTACK_START = 12


def live_config(shakespeare: Path, **kw) -> SwarmConfig:
    # 16 validation micro-batches (16 x 8 x 64 tokens) instead of 4: an attacked and a clean model
    # are compared on one final evaluation, whose sampling noise would count twice
    base = dict(stages=3, replicas=3, verifiers=3, steps=LIVE_STEPS, data=str(shakespeare), malicious=0,
                attack_start=ATTACK_START, eval_every=1000, eval_batches=16, averaging="centered-clip")
    return SwarmConfig(**{**base, **kw})


def run_swarm(swarm: LocalSwarm) -> dict:
    """Run ``swarm`` to its last step, stop it, check every process it started is gone, report."""
    try:
        swarm.start()
        swarm.wait()
    finally:
        swarm.stop()
    assert_all_gone(swarm.all_pids())
    return swarm.report()


@pytest.fixture(scope="session")
def clean_swarm(tmp_path_factory, shakespeare) -> tuple[SwarmConfig, dict]:
    """The live swarm with no adversary, run once: it must train, and attacked runs compare to it."""
    cfg = live_config(shakespeare)
    return cfg, run_swarm(LocalSwarm(cfg, tmp_path_factory.mktemp("clean")))
