"""Small-RPC latency between two real p2pd daemons: uvloop against asyncio's default loop.

    python bench/rpc_latency.py [--calls 300] [--rounds 3] [--json out.json]

Each round runs one child process per loop kind, alternating (asyncio, uvloop, asyncio, ...), so
both see the same machine load. A child starts two runtimes (each its own p2pd, joined through
a DHT), serves the worker's ``status`` RPC behind the dispatcher's checks, and times ``--calls``
sequential signed status requests from the other: a request and a reply of a few hundred bytes,
what a hop costs beyond its tensors. Reported: median and 90th percentile per kind over all
rounds, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median, quantiles

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ("asyncio", "uvloop")


async def child(calls: int) -> list[float]:
    from sentinel.net.runtime import NetworkConfig, SwarmRuntime
    from sentinel.protocol import rpc as wire
    from sentinel.protocol.checks import MessageChecker
    from sentinel.protocol.signing import sign_message
    from sentinel.run.manifest import RunManifest

    manifest = RunManifest(run_id="bench-rpc")
    server = await SwarmRuntime.create(NetworkConfig(startup_timeout=120))
    client = await SwarmRuntime.create(NetworkConfig(initial_peers=(await server.visible_maddrs())[:1],
                                                     startup_timeout=120))
    try:
        async def status(msg, remote):
            return sign_message(wire.reply(msg, "status_result", {}, state="ONLINE"), server.identity)

        for name, handler in wire.checked_handlers({wire.STATUS: status}, checker=MessageChecker(manifest.run_id),
                                                   manifest=manifest, stage=lambda: 0).items():
            await server.serve(name, handler)
        out = []
        for i in range(calls + 20):  # the first 20 warm the streams up
            req = sign_message(wire.request(manifest.run_id, 0, 0, 0, "status", {}), client.identity)
            t0 = time.perf_counter()
            await client.call(server.peer_id, wire.STATUS, req, timeout=30)
            if i >= 20:
                out.append(time.perf_counter() - t0)
        return out
    finally:
        await client.shutdown()
        await server.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        from sentinel.net.loop import run

        print(json.dumps(run(child(a.calls), use_uvloop=a.child == "uvloop")))
        return
    from sentinel.net.loop import loop_name

    if loop_name() != "uvloop":
        raise SystemExit("uvloop is not installed here: nothing to compare")
    seconds: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(a.rounds):
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--calls", str(a.calls)],
                                 capture_output=True, text=True, check=True, timeout=600)
            seconds[kind] += json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}/{a.rounds} {kind}: median {1e3 * median(seconds[kind]):.2f} ms so far", flush=True)
    result = {"calls_per_round": a.calls, "rounds": a.rounds, "machine": platform.platform(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    for kind in KINDS:
        s = seconds[kind]
        result[kind] = {"median_ms": round(1e3 * median(s), 3), "p90_ms": round(1e3 * quantiles(s, n=10)[-1], 3)}
        print(f"{kind:8s} median {result[kind]['median_ms']:.2f} ms  p90 {result[kind]['p90_ms']:.2f} ms")
    result["uvloop_over_asyncio_median"] = round(result["uvloop"]["median_ms"] / result["asyncio"]["median_ms"], 3)
    print(f"uvloop / asyncio median latency: {result['uvloop_over_asyncio_median']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
