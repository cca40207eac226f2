"""`sentinel-swarm`: a whole local swarm as separate OS processes on 127.0.0.1.

One bootstrap peer, ``stages x replicas`` workers and ``verifiers`` verifiers, each its own
process with its own p2pd daemon, exactly as volunteers would run them. Used by `make demo`,
the integration tests and the throughput benchmark. Identities are generated up front, so the
launcher knows every peer id and can score bans against the ground truth of who is malicious.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class NodeProc:
    name: str
    role: str
    stage: int | None
    identity_path: Path
    peer_id: str
    log_path: Path
    report_path: Path
    progress_path: Path | None = None
    attack: str | None = None
    extra_args: list[str] = field(default_factory=list)
    popen: subprocess.Popen | None = None
    descendants: set[int] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class SwarmConfig:
    """A local swarm. Defaults: the demo (3 stages x 3 replicas, 2 verifiers, one attacker)."""

    stages: int = 3
    replicas: int = 3
    verifiers: int = 2
    steps: int = 100
    data: str | None = None  # corpus path; None = the generated default corpus
    malicious: int = 1  # malicious workers, placed in middle stages first
    attack: str = "sign_flip"
    # None: forward for a built-in attack, and for a plugin the directions whose methods it defines
    attack_direction: str | None = None
    attack_start: int = 20
    screening: bool = True
    frame_verifiers: int = 0  # byzantine verifiers that try to frame an honest worker
    committee_size: int = 3
    micro_batch_size: int = 8
    micro_batches_per_step: int = 4
    # How a stage's replicas stay together (TrainingConfig.sync): "lockstep" (the manifest's
    # default) or the "async" baseline.
    sync: str = "lockstep"
    # None: the schedule measured for ``sync`` (SCHEDULES). A lockstep replica applies one update
    # per verifier step covering every replica's passes of that step (12 micro-batches in the
    # 3 x 3 demo shape with 3 verifiers): warm-up over its first 10 versions, twice async's rate.
    # An async replica steps once per pass: warm-up over 40 of its own optimizer steps (about
    # 10 verifier steps in the same shape) at the manifest's 1e-3. Both narrow the run-to-run
    # spread of the validation loss (BENCHMARKS.md, "Live screening test", "Lockstep stages in
    # the live swarm"); the manifest's warm-up default is 0 because the right length depends on
    # the swarm's shape, which the launcher knows.
    lr: float | None = None
    warmup_steps: int | None = None
    averaging: str = "centered-clip"  # within-stage aggregation rule (TrainingConfig.averaging)
    training_overrides: dict[str, Any] = field(default_factory=dict)  # other TrainingConfig fields
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    run_id: str = "local"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    screening_overrides: dict[str, Any] = field(default_factory=dict)
    startup_timeout_s: float = 300.0
    run_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.sync not in SCHEDULES:
            raise ValueError(f"sync must be {'|'.join(SCHEDULES)}, got {self.sync!r}")
        lr, warmup = SCHEDULES[self.sync]
        self.lr = lr if self.lr is None else self.lr
        self.warmup_steps = warmup if self.warmup_steps is None else self.warmup_steps


#: sync -> (lr, warm-up steps) the launcher uses unless told otherwise (SwarmConfig.lr).
SCHEDULES: dict[str, tuple[float, int]] = {"lockstep": (2e-3, 10), "async": (1e-3, 40)}


def _malicious_slots(cfg: SwarmConfig) -> list[tuple[int, int]]:
    """(stage, replica) of the malicious workers: middle stages first, never a whole stage."""
    order = list(range(1, cfg.stages - 1)) + [0, cfg.stages - 1] if cfg.stages > 2 else list(range(cfg.stages))
    slots = []
    per_stage_max = (cfg.replicas - 1) // 2  # honest majority per stage
    for r in range(per_stage_max):
        for s in order:
            if len(slots) < cfg.malicious:
                slots.append((s, cfg.replicas - 1 - r))
    if len(slots) < cfg.malicious:
        raise ValueError(f"--malicious {cfg.malicious} would break the honest majority of some stage "
                         f"({cfg.stages} stages x {cfg.replicas} replicas allow {len(slots)})")
    return slots


class LocalSwarm:
    """Starts, watches and tears down a local swarm. Every child is killed by PID on stop."""

    def __init__(self, cfg: SwarmConfig, workdir: str | Path):
        from sentinel.protocol.identity import Identity

        self.cfg = cfg
        self.workdir = Path(workdir)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "ids").mkdir(exist_ok=True)
        (self.workdir / "reports").mkdir(exist_ok=True)
        self.nodes: list[NodeProc] = []
        self.maddr: str | None = None
        self.monitor_url: str | None = None
        self.started_at = time.time()

        def make(name: str, role: str, stage: int | None) -> NodeProc:
            ident = Identity.generate()
            path = self.workdir / "ids" / f"{name}.id"
            ident.save(path)
            return NodeProc(name, role, stage, path, ident.peer_id, self.workdir / "logs" / f"{name}.log",
                            self.workdir / "reports" / f"{name}.json")

        self.bootstrap = make("bootstrap", "bootstrap", None)
        bad = set(_malicious_slots(cfg)) if cfg.malicious else set()
        for s in range(cfg.stages):
            for r in range(cfg.replicas):
                node = make(f"worker-s{s}r{r}", "worker", s)
                if (s, r) in bad:
                    node.attack = cfg.attack
                self.nodes.append(node)
        honest = [n for n in self.nodes if n.attack is None and n.stage == min(1, cfg.stages - 1)]
        for v in range(cfg.verifiers):
            node = make(f"verifier-{v}", "verifier", None)
            node.progress_path = self.workdir / "reports" / f"{node.name}.progress.json"
            if v >= cfg.verifiers - cfg.frame_verifiers and honest:
                node.extra_args = ["--frame", honest[0].peer_id]
            self.nodes.append(node)

    # -- processes -------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env

    def _spawn(self, node: NodeProc, args: list[str]) -> None:
        log = open(node.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        node.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                      stdin=subprocess.DEVNULL)
        log.close()

    def manifest_dict(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "run_id": c.run_id, "num_stages": c.stages, "seed": c.seed, "committee_size": c.committee_size,
            "corpus": c.data or "default", "model": c.model,
            "optimizer": {"lr": c.lr, "warmup_steps": c.warmup_steps},
            "training": {"micro_batch_size": c.micro_batch_size, "micro_batches_per_step": c.micro_batches_per_step,
                         "eval_every": c.eval_every, "eval_batches": c.eval_batches, "averaging": c.averaging,
                         "sync": c.sync, **c.training_overrides},
            "screening": c.screening_overrides,
        }

    def start(self) -> None:
        import yaml

        cfg_path = self.workdir / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(self.manifest_dict()))
        maddr_file = self.workdir / "bootstrap.maddr"
        url_file = self.workdir / "monitor.url"
        self._spawn(self.bootstrap, [sys.executable, "-m", "sentinel.cli.bootstrap", "--new-swarm",
                                     "--identity-path", str(self.bootstrap.identity_path), "--config", str(cfg_path),
                                     "--maddr-file", str(maddr_file), "--monitor-url-file", str(url_file)])
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not maddr_file.exists():
            if not self.bootstrap.alive:
                raise RuntimeError(f"bootstrap peer exited; see {self.bootstrap.log_path}:\n{self.tail(self.bootstrap)}")
            if time.monotonic() > deadline:
                raise TimeoutError("bootstrap peer did not start in time")
            time.sleep(0.2)
        self.maddr = maddr_file.read_text().split()[0]
        if url_file.exists():  # written before the maddr file
            self.monitor_url = url_file.read_text().strip()
        for node in self.nodes:
            self.start_node(node)

    def start_node(self, node: NodeProc) -> None:
        c = self.cfg
        args = [sys.executable, "-m", "sentinel.cli.node", "join", "--initial-peers", self.maddr,
                "--identity-path", str(node.identity_path), "--role", node.role, "--report", str(node.report_path)]
        if node.role == "worker":
            # stages are assigned here, and every local worker shares this machine: measuring
            # throughput in each (all at once, on the same cores) would only measure contention
            args += ["--stage", str(node.stage), "--throughput", "1"]
            if node.attack:
                from sentinel.attacks.loader import default_directions

                args += ["--attack", node.attack, "--attack-start", str(c.attack_start)]
                direction = c.attack_direction or default_directions(node.attack)
                if direction is not None:
                    args += ["--attack-direction", direction]
        else:
            idx = int(node.name.rsplit("-", 1)[1])
            args += ["--steps", str(c.steps), "--data-shard", f"{idx}/{c.verifiers}",
                     "--progress", str(node.progress_path),
                     "--journal", str(self.workdir / "reports" / f"{node.name}.journal.json")]
            if not c.screening:
                args.append("--no-screening")
        self._spawn(node, args + node.extra_args)

    def record_descendants(self) -> None:
        """Remember every child's p2pd, so a SIGKILLed node's daemon can be reaped by PID too."""
        import psutil

        for node in [self.bootstrap, *self.nodes]:
            if node.alive:
                with contextlib.suppress(psutil.Error):
                    node.descendants |= {c.pid for c in psutil.Process(node.popen.pid).children(recursive=True)}

    def kill(self, node: NodeProc, sig: int = signal.SIGKILL) -> None:
        self.record_descendants()
        if node.alive:
            node.popen.send_signal(sig)
            node.popen.wait(timeout=30)

    @property
    def verifiers(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.role == "verifier"]

    @property
    def workers(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.role == "worker"]

    def progress(self) -> list[dict[str, Any]]:
        out = []
        for v in self.verifiers:
            try:
                out.append(json.loads(v.progress_path.read_text()))
            except (OSError, ValueError):
                out.append({"step": 0, "steps": self.cfg.steps})
        return out

    def wait(self, on_tick=None, tick_s: float = 1.0) -> None:
        """Until every verifier exits; a node that dies early is an error with its log tail."""
        deadline = time.monotonic() + self.cfg.run_timeout_s
        while any(v.alive for v in self.verifiers):
            self.record_descendants()
            if on_tick is not None:
                on_tick(self)
            if time.monotonic() > deadline:
                raise TimeoutError(f"swarm did not finish within {self.cfg.run_timeout_s:.0f}s")
            time.sleep(tick_s)
        failed = [v for v in self.verifiers if v.popen.returncode != 0]
        if failed:
            raise RuntimeError("verifier failed:\n" + "\n".join(f"{v.name}:\n{self.tail(v)}" for v in failed))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM everyone (clean OFFLINE + reports), then SIGKILL stragglers and their p2pd by PID."""
        import psutil

        self.record_descendants()
        everyone = [*self.nodes, self.bootstrap]
        for n in everyone:
            if n.alive:
                with contextlib.suppress(ProcessLookupError):
                    n.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in everyone:
            if n.popen is None:
                continue
            try:
                n.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.popen.kill()
                n.popen.wait(timeout=10)
        for n in everyone:
            for pid in n.descendants:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    p.kill()
                    p.wait(timeout=10)

    def all_pids(self) -> set[int]:
        pids = set()
        for n in [self.bootstrap, *self.nodes]:
            if n.popen is not None:
                pids.add(n.popen.pid)
            pids |= n.descendants
        return pids

    @staticmethod
    def tail(node: NodeProc, lines: int = 30) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- report ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        from sentinel.report import swarm_report

        return swarm_report(self)


def clean_baseline(cfg: SwarmConfig, workdir: str | Path, on_tick=None) -> dict[str, Any]:
    """Run the same swarm with no attacker and no framing verifier; the figures to compare with.

    Same model, data, seed, step count and screening: only the adversaries are gone, so the gap
    in validation loss is what the attack cost *after* the defense.
    """
    clean = dataclasses.replace(cfg, malicious=0, frame_verifiers=0, run_id=f"{cfg.run_id}-clean")
    swarm = LocalSwarm(clean, Path(workdir))
    try:
        swarm.start()
        swarm.wait(on_tick=on_tick)
    finally:
        swarm.stop()
    r = swarm.report()
    return {k: r[k] for k in ("steps", "val_loss_first", "val_loss_last", "train_loss_last", "tokens_per_s",
                              "honest_banned", "flag_rates")}


def compare_with_clean(report: dict[str, Any], clean: dict[str, Any]) -> dict[str, Any]:
    """Attach the clean run to ``report``, with the relative validation-loss gap."""
    report["clean_run"] = clean
    a, b = report.get("val_loss_last"), clean.get("val_loss_last")
    report["val_loss_vs_clean"] = (a - b) / b if a is not None and b else None
    return report


def _figure(value: float | None) -> str:
    """A loss for the progress line: a dash until the first one exists."""
    return "-" if value is None else f"{value:.3f}"


def _progress_printer(plain: bool):
    last = {"t": 0.0}

    def tick(swarm: LocalSwarm) -> None:
        now = time.monotonic()
        if now - last["t"] < (5.0 if plain else 1.0):
            return
        last["t"] = now
        rows = swarm.progress()
        parts = []
        for i, p in enumerate(rows):
            tl, vl = p.get("train_loss"), p.get("val_loss")
            tps = p.get("tokens", 0) / p["train_seconds"] if p.get("train_seconds") else 0.0
            parts.append(f"v{i} step {p.get('step', 0)}/{p.get('steps', swarm.cfg.steps)}"
                         f" loss {_figure(tl)} val {_figure(vl)}"
                         f" {tps:.0f} tok/s bans {len(p.get('banned', []))}")
        print(f"[{time.time() - swarm.started_at:6.0f}s] " + " | ".join(parts), flush=True)

    return tick


def build_parser() -> argparse.ArgumentParser:
    d = SwarmConfig()
    p = argparse.ArgumentParser(prog="sentinel-swarm", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=d.stages)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--verifiers", type=int, default=d.verifiers)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--data", default=None, help="UTF-8 text file to train on (default: generated corpus)")
    p.add_argument("--malicious", type=int, default=d.malicious, help="malicious workers (0 = clean run)")
    p.add_argument("--attack", default=d.attack, help="attack name/spec for malicious workers")
    p.add_argument("--attack-direction", choices=["forward", "backward", "both"], default=None,
                   help="what the attackers corrupt (default: forward for a built-in attack, and for a "
                        "plugin class the directions whose methods it defines)")
    p.add_argument("--attack-start", type=int, default=d.attack_start)
    p.add_argument("--no-screening", action="store_true", help="verifiers do not screen (undefended baseline)")
    p.add_argument("--frame-verifiers", type=int, default=0, help="byzantine verifiers that frame an honest worker")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--micro-batches-per-step", type=int, default=d.micro_batches_per_step)
    lrs = ", ".join(f"{lr:g} in {m}" for m, (lr, _) in SCHEDULES.items())
    warmups = ", ".join(f"{w} in {m}" for m, (_, w) in SCHEDULES.items())
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {lrs})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear learning-rate warm-up over each replica's first N optimizer steps (versions "
                        f"in lockstep; default: {warmups}; 0 = off)")
    p.add_argument("--averaging", choices=["mean", "trimmed-mean", "centered-clip"], default=d.averaging,
                   help="how the replicas of a stage aggregate their gradients (lockstep) or parameters (async)")
    p.add_argument("--averaging-partition", choices=["auto", "butterfly", "gather"], default=None,
                   help="how a round moves parameters: each replica reduces its parts (butterfly) or "
                        "fetches every replica's whole parameters (gather); auto (the manifest's "
                        "default): gather while a stage fits in half a message")
    p.add_argument("--sync", choices=tuple(SCHEDULES), default=d.sync,
                   help="how the replicas of a stage stay together: aggregate gradients at every step boundary "
                        "and apply one identical update (lockstep, the default: bit-identical replicas, exact "
                        "checks) or average parameters on their own clocks (async, the baseline)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", default=None, help="where logs, identities and reports go (default: runs/<time>)")
    p.add_argument("--report", default=None, help="write the final JSON report here")
    p.add_argument("--compare-clean", action="store_true",
                   help="afterwards, run the same swarm without attackers and report the loss against it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = SwarmConfig(stages=args.stages, replicas=args.replicas, verifiers=args.verifiers, steps=args.steps,
                      data=args.data, malicious=args.malicious, attack=args.attack,
                      attack_direction=args.attack_direction, attack_start=args.attack_start,
                      screening=not args.no_screening, frame_verifiers=args.frame_verifiers,
                      micro_batch_size=args.micro_batch_size, micro_batches_per_step=args.micro_batches_per_step,
                      sync=args.sync, lr=args.lr, warmup_steps=args.warmup_steps, averaging=args.averaging,
                      seed=args.seed, training_overrides={"averaging_partition": args.averaging_partition}
                      if args.averaging_partition else {})
    if cfg.data and not Path(cfg.data).is_file():
        print(f"sentinel-swarm: error: --data {cfg.data}: no such file", file=sys.stderr)
        return 2
    if cfg.warmup_steps < 0:
        print(f"sentinel-swarm: error: --warmup-steps must be >= 0, got {cfg.warmup_steps}", file=sys.stderr)
        return 2
    try:
        _malicious_slots(cfg)
    except ValueError as e:
        print(f"sentinel-swarm: error: {e}", file=sys.stderr)
        return 2
    attacked = "-"
    if cfg.malicious:
        from sentinel.attacks.loader import AttackSpecError, default_directions, load_attack

        try:  # the workers load it again; loading here refuses a bad spec before any process starts
            attack = load_attack(cfg.attack, directions=cfg.attack_direction or default_directions(cfg.attack))
        except AttackSpecError as e:
            print(f"sentinel-swarm: error: --attack: {e}", file=sys.stderr)
            return 2
        attacked = f"{cfg.attack}, attacking {getattr(attack, 'directions', 'both')}"
    workdir = Path(args.workdir or f"runs/swarm-{time.strftime('%Y%m%d-%H%M%S')}")
    swarm = LocalSwarm(cfg, workdir)

    def on_sigterm(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt the shutdown
        raise KeyboardInterrupt  # same clean shutdown as Ctrl-C: every child stopped, by PID

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"starting {cfg.stages} stages x {cfg.replicas} replicas + {cfg.verifiers} verifiers "
          f"({cfg.malicious} malicious, attack {attacked}); logs in {workdir}/logs",
          flush=True)
    try:
        swarm.start()
        print(f"bootstrap: {swarm.maddr}", flush=True)
        if swarm.monitor_url:
            print(f"monitor: {swarm.monitor_url}  (open it in a browser to watch the swarm)", flush=True)
        swarm.wait(on_tick=_progress_printer(plain=not sys.stdout.isatty()))
    except KeyboardInterrupt:
        print("interrupted; stopping the swarm", flush=True)
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"sentinel-swarm: error: {e}", file=sys.stderr)
        return 1
    finally:
        swarm.stop()
    report = swarm.report()
    if args.compare_clean and (cfg.malicious or cfg.frame_verifiers):
        print("clean run for comparison: the same swarm without attackers", flush=True)
        try:
            compare_with_clean(report, clean_baseline(cfg, workdir / "clean",
                                                      on_tick=_progress_printer(plain=not sys.stdout.isatty())))
        except KeyboardInterrupt:
            print("clean run interrupted; reporting without it", flush=True)
        except (RuntimeError, TimeoutError) as e:
            print(f"sentinel-swarm: clean run failed: {e}; reporting without it", file=sys.stderr)
    out = Path(args.report) if args.report else workdir / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    from sentinel.report import print_summary

    print_summary(report)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
