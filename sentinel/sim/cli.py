"""``sentinel-sim``: one simulated run at the paper's scale, or the whole detection table.

    sentinel-sim --stages 16 --replicas 8 --malicious-fraction 0.375 --attack sign_flip \\
        --direction forward --attack-start 20 --defense sentinel --steps 150 \\
        --data ../shared/data/tinyshakespeare.txt --seed 0 --report runs/sim.json

    sentinel-sim --table [table options, see --table --help]

Every flag mirrors a field of :class:`sentinel.sim.swarm.SimConfig` (defaults documented there);
``--screen KEY=VALUE`` overrides a field of :class:`sentinel.run.screening.ScreeningConfig`
(``--screen fence_k=4 --screen strike_limit=5``), exactly as a run manifest's verifier policy does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from sentinel.sim.swarm import DEFENSES, MODEL_SIZES, SYNC_MODES, SimConfig, Simulation


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["fence_k=4", "window=200"]`` -> ``{"fence_k": 4.0, "window": 200}`` (typed by the config)."""
    from sentinel.run.screening import ScreeningConfig

    fields = {f.name: f for f in dataclasses.fields(ScreeningConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise SystemExit(f"--screen {item!r}: write KEY=VALUE with KEY one of {', '.join(fields)}")
        default = getattr(ScreeningConfig(), key)
        try:
            out[key] = int(raw) if isinstance(default, int) else float(raw)
        except ValueError:
            raise SystemExit(f"--screen {item!r}: {key} expects a number, got {raw!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="sentinel-sim",
        description="In-process Sentinel swarm: the live verifier's driver, screening, strikes and routing, "
                    "the live workers' stage code and the attack catalogue, in one process.",
    )
    p.add_argument("--table", action="store_true",
                   help="run the whole detection matrix instead (see `sentinel-sim --table --help`)")
    p.add_argument("--stages", type=int, default=d.stages, help="pipeline stages (default %(default)s)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="workers per stage (default %(default)s)")
    p.add_argument("--malicious-fraction", type=float, default=d.malicious_fraction,
                   help="floor(fraction x replicas) attackers per stage, < 1/2 (default %(default)s)")
    p.add_argument("--spare-ends", action="store_true", help="keep the first and last stages honest")
    p.add_argument("--attack", default=d.attack,
                   help="attack spec (NAME[,k=v...] or path.py:Class), or 'none' (default %(default)s)")
    p.add_argument("--direction", choices=("forward", "backward", "both"), default=None,
                   help="what the attackers corrupt (default: forward for a built-in attack, and for a "
                        "plugin class the directions whose methods it defines)")
    p.add_argument("--attack-start", type=int, default=d.attack_start,
                   help="attackers behave honestly before this step (default %(default)s)")
    p.add_argument("--defense", choices=DEFENSES, default=d.defense, help="default %(default)s")
    p.add_argument("--screen", action="append", default=[], metavar="KEY=VALUE",
                   help="ScreeningConfig override, repeatable (e.g. fence_k=4)")
    p.add_argument("--duplicate-rtol", type=float, default=d.duplicate_rtol,
                   help="tolerance of the duplicate defense's comparison (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="verifier steps (default %(default)s)")
    p.add_argument("--micro-batches-per-step", type=int, default=d.micro_batches_per_step)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--model-size", choices=tuple(MODEL_SIZES), default=d.model_size)
    p.add_argument("--layers", type=int, default=d.layers, help="0 = one layer per stage")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up over each replica's first N optimizer steps "
                        "(versions in lockstep; default %(default)s = off; the live launcher uses 10 in lockstep, "
                        "40 in async)")
    p.add_argument("--sync", choices=SYNC_MODES, default=d.sync,
                   help="lockstep: replicas of a stage apply one aggregated gradient per step and stay identical; "
                        "async: each steps alone and averages parameters every --average-every steps "
                        "(default %(default)s)")
    p.add_argument("--average-every", type=int, default=d.average_every, help="async only")
    p.add_argument("--averaging", choices=("mean", "trimmed-mean", "centered-clip"), default=d.averaging)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--data", default=d.data, help="corpus text file (default: the generated corpus)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--routing-seed", type=int, default=d.routing_seed,
                   help="seed of the simulated hop latencies, i.e. the routing (default: --seed); "
                        "changes which replica computes what and keeps init and data order")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default %(default)s)")
    p.add_argument("--second-witness", action="store_true",
                   help="tie-break a disputed confirmation on a third replica (off by default: see "
                        "DriverConfig.second_witness)")
    p.add_argument("--spot-check", type=float, default=d.spot_check, metavar="SHARE",
                   help="share of accepted hops also recomputed on another replica and compared "
                        "(default: the screening's spot_check, 0.05, in lockstep; none in async; 0 = off)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def config_from_args(a: argparse.Namespace) -> SimConfig:
    return SimConfig(
        stages=a.stages, replicas=a.replicas, malicious_fraction=a.malicious_fraction, spare_ends=a.spare_ends,
        attack=a.attack, direction=a.direction, attack_start=a.attack_start, defense=a.defense,
        screening=parse_overrides(a.screen), duplicate_rtol=a.duplicate_rtol, steps=a.steps,
        micro_batches_per_step=a.micro_batches_per_step, micro_batch_size=a.micro_batch_size,
        model_size=a.model_size, layers=a.layers, lr=a.lr, warmup_steps=a.warmup_steps,
        average_every=a.average_every, averaging=a.averaging, sync=a.sync, eval_every=a.eval_every,
        eval_batches=a.eval_batches, data=a.data, seed=a.seed, routing_seed=a.routing_seed, threads=a.threads,
        second_witness=a.second_witness, spot_check=a.spot_check,
    )


def summary_lines(r: dict[str, Any]) -> list[str]:
    """Human-readable summary of a report."""
    c = r["config"]

    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    return [
        f"{c['stages']} stages x {c['replicas']} replicas, {len(r['malicious'])} malicious, attack {c['attack']} "
        f"({c['direction']}, from step {c['attack_start']}), defense {c['defense']}",
        f"val loss {f(r['val_loss_first'])} -> {f(r['val_loss_final'])}   train loss {f(r['train_loss_final'])}",
        f"precision {f(r['precision'], 2)}  recall {f(r['recall'], 2)}  F1 {f(r['f1'], 2)}  "
        f"latency {f(r['detection_latency_steps'], 1)} steps  honest banned {len(r['honest_banned'])}",
        f"flag rate honest {r['flag_rate_honest']:.3%}  attacked {f(r['flag_rate_attacked'])}",
        f"{r['tokens_per_s']:.0f} tokens/s  {r['stage_passes_per_token']:.1f} stage passes/token  "
        f"{r['flops_per_token'] / 1e6:.2f} MFLOP/token  ({r['train_seconds']:.1f} s training, "
        f"{r['screen_seconds']:.1f} s screening)",
    ]


def run_one(cfg: SimConfig, report: Path | None, quiet: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()

    def progress(sim: Simulation) -> None:
        if quiet or (sim.step % max(1, cfg.steps // 10) and sim.step != cfg.steps):
            return
        train = sim.train_loss[-1][1] if sim.train_loss else float("nan")
        print(f"step {sim.step:4d}/{cfg.steps}  train {train:.3f}  val {sim.val_loss[-1][1]:.3f}  "
              f"banned {len(sim.banned_at)}  {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    from sentinel.attacks.loader import AttackSpecError
    from sentinel.model.corpus import CorpusError

    try:
        sim = Simulation(cfg)
    except (AttackSpecError, CorpusError) as e:
        raise SystemExit(f"sentinel-sim: {e}") from None
    r = sim.run(progress)
    r["command"] = " ".join(["sentinel-sim", *sys.argv[1:]])
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(r, indent=1))
    for line in summary_lines(r):
        print(line)
    return r


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--table" in argv:
        from sentinel.sim.table import main as table_main

        table_main([a for a in argv if a != "--table"])
        return
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"sentinel-sim: {e}") from None
    run_one(cfg, args.report, args.quiet)


if __name__ == "__main__":
    main()
