"""Crash faults on a live swarm: a worker, a verifier or the bootstrap peer SIGKILLed mid-run loses
no micro-batch; a worker restarted with the same identity resumes from its checkpoint and serves
its stage again, a verifier resumes from its journal."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm


def wait_for_step(swarm: LocalSwarm, step: int, timeout: float = 600.0) -> None:
    """Until every verifier has completed ``step`` steps (recording each node's p2pd on the way)."""
    deadline = time.monotonic() + timeout
    while min(p.get("step", 0) for p in swarm.progress()) < step:
        assert time.monotonic() < deadline, "swarm made no progress"
        assert all(v.alive for v in swarm.verifiers), [swarm.tail(v) for v in swarm.verifiers]
        swarm.record_descendants()
        time.sleep(0.5)


def assert_nothing_lost(report: dict, drill: str, cfg: SwarmConfig | None = None) -> dict:
    """Print the drill's micro-batch accounting (a DRILL line) and assert every micro-batch was
    completed; with ``cfg``, also that every verifier sent all of its micro-batches."""
    mb = report["micro_batches"]
    print(f"DRILL {drill}: micro-batches {mb}")
    assert mb["accounted"] and mb["lost"] == 0 and mb["failed"] == 0, mb
    if cfg is not None:
        assert mb["total"] == cfg.verifiers * cfg.steps * cfg.micro_batches_per_step, mb
    return mb


def recovery_seconds(swarm: LocalSwarm, timeout: float = 300.0) -> float:
    """Seconds from now until every verifier has completed one more step than it had (the swarm
    trains again); printed as a DRILL line for ``bench/drills.py faults``."""
    start = [p.get("step", 0) for p in swarm.progress()]
    t0 = time.monotonic()
    while True:
        now = [p.get("step", 0) for p in swarm.progress()]
        if all(n > s or n >= p.get("steps", 1 << 30) for n, s, p in zip(now, start, swarm.progress(), strict=True)):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"no step completed within {timeout:.0f}s of the fault"
        time.sleep(0.2)


def test_sigkill_worker_mid_run_loses_nothing(tmp_path):
    cfg = SwarmConfig(stages=3, replicas=2, verifiers=2, steps=30, malicious=0, eval_every=1000,
                      micro_batches_per_step=2)
    swarm = LocalSwarm(cfg, tmp_path)
    victim = next(w for w in swarm.workers if w.stage == 1)
    victim.extra_args = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    try:
        swarm.start()
        wait_for_step(swarm, 10)
        daemons = set(victim.descendants)
        assert daemons, "the worker's p2pd should be its child"
        swarm.kill(victim, signal.SIGKILL)
        recovered = recovery_seconds(swarm)
        print(f"DRILL worker-sigkill: recovered in {recovered:.1f} s")
        assert recovered < 30, "training must go on within 30 s of losing a worker"
        # its p2pd dies with it (PR_SET_PDEATHSIG), long before any teardown could reap it
        _, orphans = psutil.wait_procs([psutil.Process(p) for p in daemons if psutil.pid_exists(p)], timeout=20)
        orphans = [p for p in orphans if p.status() != psutil.STATUS_ZOMBIE]
        assert list((tmp_path / "ckpt").glob("*-stage1.pt")), "no checkpoint was written before the kill"
        killed_log = victim.log_path.read_text(errors="replace")
        swarm.start_node(victim)  # same identity, same flags: a volunteer restarting the process
        deadline = time.monotonic() + 300
        while "ONLINE on stage 1" not in victim.log_path.read_text(errors="replace")[len(killed_log):]:
            assert victim.alive and time.monotonic() < deadline, swarm.tail(victim)
            time.sleep(0.5)
        restarted = victim.log_path.read_text(errors="replace")[len(killed_log):]
        assert "worker resumed stage 1 from" in restarted, restarted[-3000:]
        swarm.wait()
    finally:
        swarm.stop()
    report = swarm.report()
    assert_nothing_lost(report, "worker-sigkill", cfg)
    assert not orphans, f"p2pd of the killed worker outlived it: {orphans}"
    assert_all_gone(swarm.all_pids())


def test_ctrl_c_on_every_role_leaves_nothing_behind(tmp_path):
    """SIGINT (Ctrl-C in a volunteer's terminal) to a verifier mid-run, a worker and the bootstrap
    peer: each exits by itself with status 0 and takes its p2pd daemon with it."""
    cfg = SwarmConfig(stages=2, replicas=1, verifiers=1, steps=100_000, malicious=0, eval_every=100_000,
                      micro_batches_per_step=2)
    swarm = LocalSwarm(cfg, tmp_path)
    try:
        swarm.start()
        wait_for_step(swarm, 2)
        swarm.record_descendants()
        for node in [*swarm.verifiers, *swarm.workers, swarm.bootstrap]:
            daemons = [psutil.Process(p) for p in node.descendants if psutil.pid_exists(p)]
            assert daemons, f"{node.name} should have its p2pd as a child"
            node.popen.send_signal(signal.SIGINT)
            assert node.popen.wait(timeout=120) == 0, swarm.tail(node)
            _, left = psutil.wait_procs(daemons, timeout=30)
            left = [p for p in left if p.status() != psutil.STATUS_ZOMBIE]
            assert not left, f"{node.name} left {left} behind after Ctrl-C"
    finally:
        swarm.stop()
    assert_all_gone(swarm.all_pids())


def test_sigkill_verifier_mid_step_resumes_then_sigkill_bootstrap_training_goes_on(tmp_path):
    """Two drills on one swarm. A verifier killed in the middle of a step: the other verifier
    trains on; restarted with the same identity it resumes after its last journaled step and
    drives the interrupted step again, so its report accounts for every micro-batch of every step
    exactly once. Then the bootstrap peer, which is only the way in: once every node has joined,
    the DHT and the P2P streams run between the nodes themselves, so killing it stops nothing."""
    # 60 steps: the survivor runs on alone while the victim restarts (tens of seconds on two
    # loaded cores); at 30 it once finished the run before the victim was back
    cfg = SwarmConfig(stages=3, replicas=2, verifiers=2, steps=60, malicious=0, eval_every=1000,
                      micro_batches_per_step=2)
    swarm = LocalSwarm(cfg, tmp_path)
    victim, other = swarm.verifiers
    try:
        swarm.start()
        wait_for_step(swarm, 8)
        journal = tmp_path / "reports" / f"{victim.name}.journal.json"
        assert journal.exists(), "the verifier keeps no journal"
        swarm.kill(victim, signal.SIGKILL)
        killed_after = json.loads(journal.read_text())["step"]
        before = json.loads(other.progress_path.read_text())["step"]
        t0 = time.monotonic()
        while json.loads(other.progress_path.read_text())["step"] <= before:
            assert other.alive and time.monotonic() - t0 < 300, swarm.tail(other)
            time.sleep(0.2)
        recovered = time.monotonic() - t0
        print(f"DRILL verifier-sigkill: the other verifier completed a step {recovered:.1f} s after the kill")
        assert recovered < 30, "training must go on within 30 s of losing a verifier"
        swarm.start_node(victim)  # same identity, same flags (the journal among them)

        wait_for_step(swarm, killed_after + 4)  # the restarted verifier is back in the swarm
        swarm.kill(swarm.bootstrap, signal.SIGKILL)
        bootstrap_killed_at = min(p.get("step", 0) for p in swarm.progress())
        recovered = recovery_seconds(swarm)
        print(f"DRILL bootstrap-sigkill: recovered in {recovered:.1f} s")
        assert recovered < 30, "training must go on within 30 s of losing the bootstrap peer"
        swarm.wait()
    finally:
        swarm.stop()
    report = json.loads(victim.report_path.read_text())
    assert report["resumed"] == [{"after_step": killed_after, "retried_step": killed_after + 1}], report["resumed"]
    assert report["steps"] == cfg.steps
    mb = report["micro_batches"]
    assert sorted(int(s) for s in mb["per_step"]) == list(range(1, cfg.steps + 1)), mb["per_step"]
    assert all(d["micro_batches"] == cfg.micro_batches_per_step for d in mb["per_step"].values()), mb["per_step"]
    assert bootstrap_killed_at < cfg.steps, "the run ended before the bootstrap was killed: the drill tested nothing"
    assert_nothing_lost(swarm.report(), "verifier-and-bootstrap-sigkill", cfg)
    assert_all_gone(swarm.all_pids())


def test_silent_slow_and_trickling_workers_are_routed_around_without_stalling_a_step(tmp_path):
    """Stragglers from step 4, one replica of every stage: a stage-0 worker answering 5 s late, a
    stage-1 worker that sends its replies at 4 KiB/s (a live stream, a minute per activation) and
    a stage-2 worker that stops answering. Every hop they are given is hedged on their replica
    after a few typical latencies, so no step waits out the 20-s hop timeout, and no micro-batch
    is lost. Their tensors are honest: nobody is struck."""
    attacks = {0: "slow,delay=5", 1: "trickle", 2: "silent"}
    cfg = SwarmConfig(stages=3, replicas=2, verifiers=2, steps=14, malicious=0, eval_every=1000,
                      micro_batches_per_step=2)
    swarm = LocalSwarm(cfg, tmp_path)
    for stage, attack in attacks.items():
        victim = next(w for w in swarm.workers if w.stage == stage)
        victim.extra_args = ["--attack", attack, "--attack-start", "4"]
    name = "+".join(a.split(",")[0] for a in attacks.values()) + "-worker"
    try:
        swarm.start()
        swarm.wait()
    finally:
        swarm.stop()
    report = swarm.report()
    mb = assert_nothing_lost(report, name)
    assert mb["hedged_hops"] >= len(attacks), "too few hops were hedged: a straggler was never tried"
    timeout_floor = 20.0  # TrainingConfig.hop_timeout_min_s
    for v in swarm.verifiers:
        steps = json.loads(v.report_path.read_text())["step_seconds"]
        print(f"DRILL {name}: {v.name} step time median {sorted(steps)[len(steps) // 2]:.2f} s, "
              f"max {max(steps):.2f} s (hop timeout {timeout_floor:.0f} s)")
        assert max(steps) < timeout_floor, f"a step waited out a hop timeout: {steps}"
    assert report["banned"] == [], report["banned"]
    assert_all_gone(swarm.all_pids())
