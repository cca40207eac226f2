"""The white-box attacker over a long run: how much damage riding just under the fences adds up to.

    python bench/white_box_long.py [--steps 1000] [--jobs 2] [--out results/white_box_long.md]
    python bench/white_box_long.py --steps 240 --spot-check 0.05 --out results/white_box_spot.md
    python bench/white_box_long.py --spot-check 0.05 --defences sentinel+spot --out results/white_box_long_spot.md

The frontier's setting (16 x 8, 3 malicious per stage, tiny model, ``bench/frontier.py``) with
``white_box`` (:class:`sentinel.attacks.adaptive.WhiteBox`: it reads the verifier's exact
decision and pushes in a fixed direction as hard as it can without being flagged) from step
``steps // 16``, forward and backward, undefended and defended, against clean runs of the same
length. Damage is the attacked run's validation loss minus the clean run's of the same defence,
relative to it, at every evaluation: the table reports the final and the largest.
``--spot-check SHARE`` adds a third defence, ``sentinel+spot``: the same screening with that
share of accepted hops recomputed on another replica (``DriverConfig.spot_check``), and reports
its compute cost as FLOPs per token against ``sentinel`` alone on the same clean run.
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
    ap.add_argument("--spot-check", type=float, default=0.0, metavar="SHARE",
                    help="also run the defence with this share of hops spot-checked (0 = no such rows)")
    ap.add_argument("--defences", default="",
                    help="comma-separated subset of none, sentinel, sentinel+spot to run (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "white_box_long.md")
    args = ap.parse_args()
    start = max(1, args.steps // 16)
    common = dict(steps=args.steps, attack_start=start, eval_every=args.eval_every)
    defences = {"none": dict(defense="none"), "sentinel": dict(defense="sentinel")}
    if args.spot_check:
        defences["sentinel+spot"] = dict(defense="sentinel", spot_check=args.spot_check)
    if args.defences:
        wanted = [d.strip() for d in args.defences.split(",") if d.strip()]
        unknown = [d for d in wanted if d not in defences]
        if unknown:
            ap.error(f"unknown or unavailable defence(s) {unknown}; have {list(defences)} "
                     "(sentinel+spot needs --spot-check)")
        defences = {d: defences[d] for d in wanted}
    jobs = [(f"clean/{d}", dict(attack="none", **kw, **common)) for d, kw in defences.items()]
    jobs += [(f"white_box/{direction}/{d}", dict(attack="white_box", direction=direction, **kw, **common))
             for direction in ("forward", "backward") for d, kw in defences.items()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        done = {}
        for name, report, secs in pool.map(_run, jobs):
            done[name] = report
            print(f"{name}: val {report['val_loss_final']:.3f}, honest bans {report['honest_banned']}, "
                  f"F1 {report['f1']}, {secs:.0f} s", flush=True)
    wall = (time.perf_counter() - t0) / 60

    def curve(r: dict[str, Any]) -> dict[int, float]:
        return {int(s): float(v) for s, v in r["val_loss"]}

    lines = [
        "# White-box attacker over a long run", "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `python bench/white_box_long.py --steps {args.steps}"
        f"{f' --spot-check {args.spot_check}' if args.spot_check else ''}"
        f"{f' --defences {args.defences}' if args.defences else ''}` "
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
        for d in defences:
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
    if "sentinel+spot" in defences:
        spot = done["clean/sentinel+spot"]
        base = done.get("clean/sentinel")
        cost = (f"{spot['flops_per_token'] / base['flops_per_token']:.3f}x the FLOPs per token of `sentinel` alone "
                "on the clean run" if base else "(`sentinel` alone not run: no cost ratio)")
        lines += ["", f"Spot checks ({args.spot_check:g} of accepted hops, follow-ups after a disagreement): "
                  f"{cost}; per run:", "",
                  "| run | spot checks | recomputed hops | struck | inconclusive | FLOPs/token | vs sentinel |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("clean/sentinel+spot", "white_box/forward/sentinel+spot", "white_box/backward/sentinel+spot"):
            f, plain = done[name]["flags"], done.get(name.replace("+spot", ""))
            ratio = f"{done[name]['flops_per_token'] / plain['flops_per_token']:.3f}x" if plain else "-"
            lines.append(f"| {name} | {f['spot_checks']} | {f['spot_hops']} | {f['spot_struck']} | "
                         f"{f['spot_inconclusive']} | {done[name]['flops_per_token']:.4g} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
