"""Screening throughput benchmark: MB/s of fp32 tensor per core, and the swarm with screening on vs off.

    python bench/screening.py [--json out.json] [--repeats N] [--swarm-steps N]

For each tensor size it times ``compute_stats`` (the passes over the tensor), ``screen_stats``
(distances to the cross-replica reference, fence check, EMA/window update), the whole
``BoundaryScreen.screen``, and ``screen`` with the hop's source (the ``skip`` distance's extra
pass over the source), on a single thread (``torch.set_num_threads(1)``), against a boundary
warmed up by four replicas so every distance and fence is live.

With ``--swarm-steps N`` (> 0) it then runs the same clean local swarm twice in one invocation,
screening on and off, and reports both tokens/s and the ratio: the end-to-end overhead.
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

from sentinel.run.screening import ScreeningConfig  # noqa: E402
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


def _residual(x: torch.Tensor) -> torch.Tensor:
    """A stage output for input ``x``: the input plus a small update (as a residual block's)."""
    return x + 0.1 * torch.roll(x, 1, dims=-1)


def _warm_screen(config: ScreeningConfig, pool: list[torch.Tensor], with_source: bool = False) -> BoundaryScreen:
    screen = BoundaryScreen(config, "forward")
    for i in range(config.min_history + 4 * WORKERS):
        x = pool[i % len(pool)] * (1 + 0.02 * ((i * 5) % 7 - 3))
        if with_source:
            screen.screen(f"w{i % WORKERS}", _residual(x), x)
        else:
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
        src_screen = _warm_screen(config, pool, with_source=True)
        y = _residual(x)
        t_src = _time(lambda: src_screen.screen("w2", y, x), n)  # noqa: B023
        if screen.counters.flagged or src_screen.counters.flagged:
            raise RuntimeError("benchmark tensors were flagged: the timing would measure the wrong path")
        rows.append({
            "shape": list(shape),
            "mb": round(mb, 3),
            "compute_stats_ms": round(t_stats * 1e3, 3),
            "screen_stats_ms": round(t_judge * 1e3, 3),
            "screen_ms": round(t_full * 1e3, 3),
            "compute_stats_mb_s": round(mb / t_stats, 1),
            "screen_mb_s": round(mb / t_full, 1),
            "screen_with_source_ms": round(t_src * 1e3, 3),
            "screen_with_source_mb_s": round(mb / t_src, 1),
            "stats_share": round(t_stats / (t_stats + t_judge), 3),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'shape':>16} {'MB':>8} {'stats ms':>9} {'judge ms':>9} {'screen ms':>10} {'stats MB/s':>11} "
            f"{'screen MB/s':>12} {'+source MB/s':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{shape:>16} {r['mb']:>8.2f} {r['compute_stats_ms']:>9.3f} {r['screen_stats_ms']:>9.3f} "
            f"{r['screen_ms']:>10.3f} {r['compute_stats_mb_s']:>11.0f} {r['screen_mb_s']:>12.0f} "
            f"{r['screen_with_source_mb_s']:>13.0f}"
        )


def bench_swarm(steps: int, data: str | None) -> dict[str, Any]:
    """tokens/s of the same clean local swarm (3x3, 2 verifiers) with screening on, then off.

    Both runs are in this invocation, back to back, so the machine's load is as alike as it gets;
    the ratio is the end-to-end cost of screening (the verifiers' CPU time spent on it is
    reported too, from the screened run).
    """
    import tempfile

    from sentinel.cli.swarm import LocalSwarm, SwarmConfig

    out: dict[str, Any] = {"steps": steps, "stages": 3, "replicas": 3, "verifiers": 2, "data": data}
    for screening in (True, False):
        cfg = SwarmConfig(stages=3, replicas=3, verifiers=2, steps=steps, malicious=0, screening=screening,
                          data=data, eval_every=10_000)
        with tempfile.TemporaryDirectory(prefix="sentinel-bench-") as tmp:
            swarm = LocalSwarm(cfg, tmp)
            try:
                swarm.start()
                swarm.wait()
            finally:
                swarm.stop()
            r = swarm.report()
        key = "on" if screening else "off"
        out[key] = {"tokens_per_s": round(r["tokens_per_s"], 1), "train_seconds": round(r["train_seconds"], 1),
                    "screen_seconds": round(r["screen_seconds"], 2), "lost": r["micro_batches"]["lost"],
                    "banned": len(r["banned"])}
        print(f"swarm, screening {key}: {r['tokens_per_s']:.0f} tokens/s over {r['train_seconds']:.0f} s "
              f"(screening {r['screen_seconds']:.1f} s summed over verifiers)", flush=True)
    on, off = out["on"]["tokens_per_s"], out["off"]["tokens_per_s"]
    out["tokens_per_s_ratio_on_off"] = round(on / off, 3) if off else None
    out["screen_share_of_verifier_time"] = round(
        out["on"]["screen_seconds"] / (cfg.verifiers * out["on"]["train_seconds"]), 4) if out["on"]["train_seconds"] else None
    print(f"screening on/off tokens/s ratio: {out['tokens_per_s_ratio_on_off']}; "
          f"screening share of the verifiers' wall time: {out['screen_share_of_verifier_time']}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per size (small tensors)")
    parser.add_argument("--swarm-steps", type=int, default=60,
                        help="steps of each swarm run, screening on and off (0: skip the swarm part)")
    parser.add_argument("--data", default=None, help="corpus for the swarm runs (default: generated corpus)")
    args = parser.parse_args(argv)
    rows = bench_throughput(repeats=args.repeats)
    print_table(rows)
    swarm = bench_swarm(args.swarm_steps, args.data) if args.swarm_steps > 0 else None
    result = {
        "benchmark": "screening_throughput",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": 1,
        "target_mb_s_per_core": 2000,
        "throughput": rows,
        "swarm": swarm,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
