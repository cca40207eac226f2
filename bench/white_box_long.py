"""The white-box attacker over a long run: how much damage riding just under the fences adds up to.

    python bench/white_box_long.py [--steps 1000] [--jobs 2] [--out results/white_box_long.md]

The frontier's setting (16 x 8, 3 malicious per stage, tiny model, ``bench/frontier.py``) with
``white_box`` (:class:`sentinel.attacks.adaptive.WhiteBox`: it reads the verifier's exact
decision and pushes in a fixed direction as hard as it can without being flagged) from step
``steps // 16``, forward and backward, undefended and defended, against clean runs of the same
length. Damage is the attacked run's validation loss minus the clean run's of the same defence,
relative to it, at every evaluation: the table reports the final and the largest. No
spot-recomputation defence exists in Sentinel yet, so there is no "with" column for one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from sentinel.sim.frontier import FrontierConfig
from sentinel.sim.swarm import run_simulation

REPO = Path(__file__).resolve().parents[1]


def _run(job: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any], float]:
    import torch

    torch.set_num_threads(1)
    name, kw = job
    t0 = time.perf_counter()
    report = run_simulation(FrontierConfig().sim(**kw))
    return name, report, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "white_box_long.md")
    args = ap.parse_args()
    start = max(1, args.steps // 16)
    common = dict(steps=args.steps, attack_start=start, eval_every=args.eval_every)
    jobs = [(f"clean/{d}", dict(attack="none", defense=d, **common)) for d in ("none", "sentinel")]
    jobs += [(f"white_box/{direction}/{d}", dict(attack="white_box", direction=direction, defense=d, **common))
             for direction in ("forward", "backward") for d in ("none", "sentinel")]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        done = {}
        for name, report, secs in pool.map(_run, jobs):
            done[name] = report
            print(f"{name}: val {report['val_loss_final']:.3f}, honest bans {len(report['honest_banned'])}, "
                  f"F1 {report['f1']}, {secs:.0f} s", flush=True)
    wall = (time.perf_counter() - t0) / 60

    def curve(r: dict[str, Any]) -> dict[int, float]:
        return {int(s): float(v) for s, v in r["val_loss"]}

    lines = [
        "# White-box attacker over a long run", "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `python bench/white_box_long.py --steps {args.steps}` "
        f"({wall:.0f} min wall time, {args.jobs} jobs). Machine: {platform.platform()}, code "
        f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()}.",
        "",
        f"Setting of `bench/frontier.py` (16 x 8, 3 malicious per stage, tiny model, lr 3e-3, tuned screening), "
        f"{args.steps} steps, attack from step {start}, validation every {args.eval_every} steps. Damage = attacked "
        "val loss minus the clean run's of the same defence, relative to it.", "",
        "| attack | dir | defence | final val (clean) | final damage | largest damage (at step) | flagged attacked msgs "
        "| attackers banned | honest bans |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for direction in ("forward", "backward"):
        for d in ("none", "sentinel"):
            r, c = done[f"white_box/{direction}/{d}"], done[f"clean/{d}"]
            rc, cc = curve(r), curve(c)
            dmg = {s: (rc[s] - cc[s]) / cc[s] for s in rc if s in cc and s >= start}
            worst = max(dmg, key=dmg.get) if dmg else None
            flagged = r.get("flag_rate_attacked")
            lines.append(
                f"| white_box | {direction} | {d} | {r['val_loss_final']:.3f} ({c['val_loss_final']:.3f}) "
                f"| {100 * (r['val_loss_final'] - c['val_loss_final']) / c['val_loss_final']:+.1f}% "
                f"| {100 * dmg[worst]:+.1f}% ({worst}) | "
                f"{'-' if flagged is None else f'{100 * flagged:.2f}%'} "
                f"| {len(r['banned']) - len(r['honest_banned'])} | {len(r['honest_banned'])} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
