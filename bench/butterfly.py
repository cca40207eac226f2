"""One averaging round over P2P between real processes: butterfly against gather.

    python bench/butterfly.py [--sizes 1000000 8000000 40000000] [--replicas 4] [--rounds 5] [--json out.json]

For each size, ``--replicas`` processes (each its own p2pd, joined through this process's DHT
node) hold a stage's flat parameters and run the same rounds twice: ``gather`` (every replica
fetches every other's whole parameters and reduces alone) and ``butterfly`` (each reduces its
parts from pushed slices, serves them, and audits a share of other reducers' answers). Rounds
start together on a shared clock; a round's time is its slowest replica's, and its traffic is
the tensor bytes every replica served over the round's slot (each transfer counted once, by its
server), divided by the replicas and by the stage's size: stage copies moved per replica. The
first round of each mode is a warm-up (and, for butterfly, where every reducer's first answer
is audited) and is reported apart. The rule is CenteredClip for both; audits at the run's
default share (``TrainingConfig.averaging_audit``). 40M parameters is 160 MB of float32, more
than one message (64 MiB by default): gather cannot move it at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("gather", "butterfly")


def _bytes() -> float:
    from sentinel.metrics import METRICS

    return sum(METRICS.snapshot().get("sentinel_bytes_total", {}).values())


async def child(a: argparse.Namespace) -> None:
    from sentinel.net.runtime import NetworkConfig, SwarmRuntime
    from sentinel.net.view import fetch_params
    from sentinel.protocol import rpc as wire
    from sentinel.protocol.aggregation import aggregate
    from sentinel.run.manifest import RunManifest, TrainingConfig
    from sentinel.worker.node import WorkerNode

    # a stage's flat parameters, as much of StageRunner as averaging touches
    from tests.test_butterfly import Runner

    torch.set_num_threads(1)
    d = Path(a.dir)
    runtime = await SwarmRuntime.create(NetworkConfig(initial_peers=[a.initial_peer], startup_timeout=120))
    manifest = RunManifest(run_id="bench-butterfly", training=TrainingConfig(averaging="centered-clip"))
    node = WorkerNode(runtime, manifest)
    node.stage, node.runner = 0, Runner(torch.randn(a.numel, generator=torch.Generator().manual_seed(a.index)))
    for name in (wire.PARAMS, wire.REDUCE, wire.REDUCE_AUDIT):
        await runtime.serve(name, node.handlers()[name])
    (d / f"peer-{a.index}").write_text(runtime.peer_id)
    while not (d / "start").exists():
        await asyncio.sleep(0.1)
    t0 = float((d / "start").read_text())
    peers = [(d / f"peer-{i}").read_text() for i in range(a.replicas) if i != a.index]

    async def replicas() -> list[str]:  # the group is fixed here; a worker reads it from the stage claims
        return [*peers, runtime.peer_id]

    node.butterfly.replicas = replicas
    out = []
    slot = 0
    for mode in MODES:
        for r in range(a.rounds):
            start = t0 + slot * a.slot_s
            slot += 1
            await asyncio.sleep(max(0.0, start - time.time()))
            b0, c0 = _bytes(), time.perf_counter()
            error = None
            try:
                if mode == "gather":
                    got, failed = await fetch_params(runtime, node.checker, node.run, 0, 0, peers, a.numel,
                                                     timeout=a.slot_s)
                    if failed:
                        raise RuntimeError(f"{len(failed)} replicas failed: {failed[0][1]}")
                    own = node.runner.flat_parameters()
                    await node._in_thread(aggregate, [own, *(m.tensors["params"] for _, m in got)], "centered-clip")
                else:
                    await node.butterfly.round(peers, timeout=a.slot_s)
            except Exception as e:  # noqa: BLE001 - recorded: gather cannot move a stage over one message
                error = f"{type(e).__name__}: {e}"[:300]
            seconds = time.perf_counter() - c0
            # traffic over the whole slot: this replica also serves the others' requests
            await asyncio.sleep(max(0.0, start + a.slot_s - 0.2 - time.time()))
            out.append({"mode": mode, "round": r, "seconds": seconds, "bytes": _bytes() - b0, "error": error})
    out_stats = dict(node.butterfly.stats)
    (d / f"result-{a.index}.json").write_text(json.dumps({"rounds": out, "butterfly": out_stats}))
    await runtime.shutdown()


async def _serve_dht() -> tuple:
    from sentinel.net.runtime import NetworkConfig, SwarmRuntime

    rt = await SwarmRuntime.create(NetworkConfig(startup_timeout=120))
    maddr = (await rt.visible_maddrs())[0]
    return rt, maddr


def run_size(numel: int, replicas: int, rounds: int, slot_s: float) -> dict:
    d = Path(tempfile.mkdtemp(prefix="bench-butterfly-"))
    loop = asyncio.new_event_loop()
    rt, maddr = loop.run_until_complete(_serve_dht())
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--dir", str(d), "--index", str(i),
                               "--initial-peer", maddr, "--numel", str(numel), "--replicas", str(replicas),
                               "--rounds", str(rounds), "--slot-s", str(slot_s)], start_new_session=True)
             for i in range(replicas)]
    try:
        deadline = time.time() + 300
        while not all((d / f"peer-{i}").exists() for i in range(replicas)):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("a replica did not start")
            loop.run_until_complete(asyncio.sleep(0.2))
        (d / "start").write_text(str(time.time() + 3.0))
        for p in procs:
            p.wait(timeout=3 + 2 * len(MODES) * rounds * slot_s + 120)
        results = [json.loads((d / f"result-{i}.json").read_text()) for i in range(replicas)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
        loop.run_until_complete(rt.shutdown())
        loop.close()
    row: dict = {"numel": numel, "replicas": replicas, "megabytes": numel * 4 / 1e6}
    for mode in MODES:
        per_round = []
        for r in range(rounds):
            this = [res["rounds"][[x["mode"] for x in res["rounds"]].index(mode) + r] for res in results]
            per_round.append({"seconds": max(x["seconds"] for x in this),
                              "bytes_per_replica": sum(x["bytes"] for x in this) / replicas,
                              "errors": [x["error"] for x in this if x["error"]]})
        steady = per_round[1:]
        ok = [x for x in steady if not x["errors"]]
        row[mode] = {"warmup": per_round[0], "rounds_ok": len(ok), "rounds": len(steady),
                     "seconds_median": median(x["seconds"] for x in ok) if ok else None,
                     "copies_per_replica": median(x["bytes_per_replica"] for x in ok) / (numel * 4) if ok else None,
                     "error": next((e for x in steady for e in x["errors"]), None)}
    row["butterfly_stats"] = {k: sum(r["butterfly"][k] for r in results) for k in results[0]["butterfly"]}
    g, b = row["gather"]["seconds_median"], row["butterfly"]["seconds_median"]
    row["gather_over_butterfly"] = g / b if g and b else None
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 8_000_000, 40_000_000])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="per mode, the first a warm-up")
    p.add_argument("--slot-s", type=float, default=0.0, help="seconds per round slot (0: by size)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--initial-peer", help=argparse.SUPPRESS)
    p.add_argument("--numel", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        asyncio.run(child(a))
        return
    rows = []
    print(f"{'params':>11} {'n':>2} {'gather s':>9} {'copies':>7} {'butterfly s':>12} {'copies':>7} {'g/b':>6}")
    for numel in a.sizes:
        slot = a.slot_s or max(6.0, numel * 4 * a.replicas / 25e6)
        row = run_size(numel, a.replicas, a.rounds, slot)
        rows.append(row)
        g, b = row["gather"], row["butterfly"]

        def f(x, fmt):
            return format(x, fmt) if x is not None else "fails"

        print(f"{numel:>11,} {a.replicas:>2} {f(g['seconds_median'], '9.2f')} {f(g['copies_per_replica'], '7.2f')} "
              f"{f(b['seconds_median'], '12.2f')} {f(b['copies_per_replica'], '7.2f')} "
              f"{f(row['gather_over_butterfly'], '6.2f')}", flush=True)
        if g["error"]:
            print(f"    gather: {g['error']}")
        if b["error"]:
            print(f"    butterfly: {b['error']}")
    meta = {"command": "python " + " ".join(["bench/butterfly.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count(), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
