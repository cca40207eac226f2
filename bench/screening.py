"""Screening throughput benchmark: MB/s of fp32 tensor per core, and where the time goes.

    python bench/screening.py [--json out.json] [--repeats N]

For each tensor size it times ``compute_stats`` (the passes over the tensor), ``screen_stats``
(distances to the cross-replica reference, fence check, EMA/window update) and the whole
``BoundaryScreen.screen``, on a single thread (``torch.set_num_threads(1)``), against a boundary
warmed up by four replicas so every distance and fence is live. Structured as small functions
plus ``main()`` so that other measurements (e.g. swarm tokens/s with screening on vs off) can be
added next to :func:`bench_throughput`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentinel.verifier.config import ScreeningConfig  # noqa: E402
from sentinel.verifier.screen import BoundaryScreen  # noqa: E402
from sentinel.verifier.stats import compute_stats  # noqa: E402

SIZES: tuple[tuple[int, ...], ...] = ((8, 64, 128), (32, 256, 512), (16, 1024, 1024))
WORKERS = 4


def _time(fn, repeats: int) -> float:
    """Median seconds per call over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _honest_pool(shape: tuple[int, ...], gen: torch.Generator, n: int = 5) -> list[torch.Tensor]:
    """A few honest-looking activations: one shared batch-mean direction plus fresh noise."""
    direction = torch.randn(shape[-1], generator=gen)
    return [torch.randn(shape, generator=gen) + direction for _ in range(n)]


def _warm_screen(config: ScreeningConfig, pool: list[torch.Tensor]) -> BoundaryScreen:
    screen = BoundaryScreen(config, "forward")
    for i in range(config.min_history + 4 * WORKERS):
        x = pool[i % len(pool)] * (1 + 0.02 * ((i * 5) % 7 - 3))
        screen.screen(f"w{i % WORKERS}", x)
    if not screen.calibrated:
        raise RuntimeError("benchmark boundary did not calibrate; check min_history/min_workers")
    return screen


def bench_throughput(sizes=SIZES, repeats: int = 20) -> list[dict[str, Any]]:
    """Per size: ms and MB/s for compute_stats, screen_stats and the full screen()."""
    torch.set_num_threads(1)
    config = ScreeningConfig()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in sizes:
        pool = _honest_pool(shape, gen)
        screen = _warm_screen(config, pool)
        x = pool[0] * 1.01
        mb = x.numel() * 4 / 1e6
        n = max(3, min(repeats, int(2000 / mb)))  # keep big tensors from dominating the run time
        stats = compute_stats(x, config)
        t_stats = _time(lambda: compute_stats(x, config), n)  # noqa: B023
        t_judge = _time(lambda: screen.screen_stats("w1", stats), n)  # noqa: B023
        t_full = _time(lambda: screen.screen("w2", x), n)  # noqa: B023
        if screen.counters.flagged:
            raise RuntimeError("benchmark tensors were flagged: the timing would measure the wrong path")
        rows.append({
            "shape": list(shape),
            "mb": round(mb, 3),
            "compute_stats_ms": round(t_stats * 1e3, 3),
            "screen_stats_ms": round(t_judge * 1e3, 3),
            "screen_ms": round(t_full * 1e3, 3),
            "compute_stats_mb_s": round(mb / t_stats, 1),
            "screen_mb_s": round(mb / t_full, 1),
            "stats_share": round(t_stats / (t_stats + t_judge), 3),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'shape':>16} {'MB':>8} {'stats ms':>9} {'judge ms':>9} {'screen ms':>10} {'stats MB/s':>11} {'screen MB/s':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{shape:>16} {r['mb']:>8.2f} {r['compute_stats_ms']:>9.3f} {r['screen_stats_ms']:>9.3f} "
            f"{r['screen_ms']:>10.3f} {r['compute_stats_mb_s']:>11.0f} {r['screen_mb_s']:>12.0f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per size (small tensors)")
    args = parser.parse_args(argv)
    rows = bench_throughput(repeats=args.repeats)
    print_table(rows)
    result = {
        "benchmark": "screening_throughput",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": 1,
        "target_mb_s_per_core": 2000,
        "throughput": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
