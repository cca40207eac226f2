"""Honest replicas' averaging-contribution scores per stage, in one detection-table run.

    python bench/contribution_scores.py bias forward [--seed 0]

Runs one defended row of the detection table (``sentinel.sim.table.TableConfig``: 16 x 8, 37.5 %
malicious, the table's screening) and records, for every averaging round, the score of each
honest replica's contribution (``sentinel.protocol.aggregation.contribution_scores``: distance to the
coordinate-wise median in units of the round's spread, floored at ``averaging_outlier_floor`` of
the median's norm; above ``averaging_outlier_ratio`` is a flag). Prints the honest bans and, per
stage, the score distribution and the rounds above the ratio (score, distance / |median|, spread
/ |median|, the replica's optimizer step and the round's median one, the verifier step): where honest replicas look like
averaging poisoners, and when.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from sentinel.protocol.aggregation import contribution_scores
from sentinel.sim.swarm import Simulation
from sentinel.sim.table import TableConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("attack")
    ap.add_argument("direction", choices=["forward", "backward", "both"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=6, help="rounds above the ratio listed per stage")
    args = ap.parse_args()
    records: dict[int, list[tuple[float, float, float, int, int, int]]] = defaultdict(list)
    original = Simulation._screen_contributions  # handed to the replicas when they are built

    def recording(sim: Simulation, stage: int, step: int, names: list[str], vectors: list[torch.Tensor]) -> None:
        scores = contribution_scores(vectors, sim.screen_config.averaging_outlier_floor)
        stacked = torch.stack([v.reshape(-1) for v in vectors])
        centre = stacked.median(0).values
        dist = (stacked - centre).norm(dim=1)
        norm = float(centre.norm())
        versions = sorted(sim.workers[n].runner.version for n in names)
        for name, score, d in zip(names[1:], scores[1:], dist[1:], strict=True):
            w = sim.workers[name]
            if not w.malicious:
                records[stage].append((score, float(d) / norm, float(dist.median()) / norm, w.runner.version,
                                       versions[len(versions) // 2], step))
        original(sim, stage, step, names, vectors)

    Simulation._screen_contributions = recording
    sim = Simulation(TableConfig().sim(attack=args.attack, direction=args.direction, seed=args.seed))
    ratio = sim.screen_config.averaging_outlier_ratio
    report = sim.run()
    print(f"{args.attack}/{args.direction} seed {args.seed}: honest bans {report['honest_banned']}, "
          f"val {report['val_loss_final']:.4f}")
    for stage in sorted(records):
        rows = records[stage]
        scores = sorted(r[0] for r in rows)
        above = [r for r in rows if r[0] > ratio]
        print(f"stage {stage:2d}: {len(rows)} honest contributions, score median {scores[len(scores) // 2]:.2f} "
              f"p99 {scores[int(0.99 * len(scores))]:.2f} max {scores[-1]:.2f}, above {ratio:g}: {len(above)}")
        for score, rel, spread, version, median_version, step in above[: args.show]:
            print(f"    score {score:.2f} distance/|median| {rel:.4f} spread/|median| {spread:.4f} "
                  f"optimizer step {version} (round's median {median_version}) verifier step {step}")


if __name__ == "__main__":
    main()
