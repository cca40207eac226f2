"""Aggregation cost: one averaging round's reduction with mean, trimmed-mean and CenteredClip.

    python bench/averaging.py [--json out.json] [--repeats N]

For the same group (n replicas' flat parameter vectors, one thread) it times each rule and
reports CenteredClip's and trimmed-mean's time as a multiple of the plain mean's, measured in
the same run. Sizes: one stage of the default model (3 stages), one stage of a ~100M-parameter
model split 16 ways (6.3M), and 25M. The network part of a round (fetching the replicas'
parameters over P2P streams) is the same for every rule and is not timed here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentinel.model.stages import build_stage  # noqa: E402
from sentinel.protocol.aggregation import aggregate  # noqa: E402
from sentinel.run.manifest import RunManifest  # noqa: E402

RULES = ("mean", "trimmed-mean", "centered-clip")


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--replicas", type=int, nargs="+", default=[3, 8])
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    m = RunManifest()
    stage_params = sum(q.numel() for q in build_stage(m.model, 1, m.num_stages).parameters())
    sizes = [stage_params, 6_300_000, 25_000_000]
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'params':>10} {'n':>3} " + " ".join(f"{r:>16}" for r in RULES) + "   cc/mean  trim/mean")
    for size in sizes:
        for n in a.replicas:
            vectors = [torch.randn(size, generator=gen) for _ in range(n)]
            t = {r: _median_time(lambda r=r, v=vectors: aggregate(v, r), a.repeats) for r in RULES}
            row = {"params": size, "replicas": n, "seconds": t, "cc_over_mean": t["centered-clip"] / t["mean"],
                   "trimmed_over_mean": t["trimmed-mean"] / t["mean"]}
            rows.append(row)
            print(f"{size:>10} {n:>3} " + " ".join(f"{t[r] * 1e3:>13.1f} ms" for r in RULES)
                  + f"   {row['cc_over_mean']:>6.1f}x  {row['trimmed_over_mean']:>6.1f}x", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "machine": platform.platform(), "torch": torch.__version__},
                                     indent=1))


if __name__ == "__main__":
    main()
