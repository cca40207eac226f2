"""`sentinel-node`: join a run as a worker or a verifier.

    sentinel-node join --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW... [--role worker|verifier]

Heavy imports (torch, hivemind) happen only after the arguments are parsed, so `--help` and
flag errors answer instantly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from typing import Any

from sentinel.net.args import (
    EXIT_NETWORK,
    EXIT_USAGE,
    add_network_args,
    install_stop_signals,
    network_config,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentinel-node", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("join", help="join a run as a worker or verifier",
                       description="Join a Sentinel run through its bootstrap peer(s).")
    add_network_args(j)
    j.add_argument("--role", choices=["worker", "verifier"], default="worker")
    j.add_argument("--stage", default="auto", help="worker: 'auto' (least-served stage) or a stage index")
    j.add_argument("--trusted-signers", nargs="*", default=None, metavar="PEER_ID",
                   help="peer ids whose run manifest to accept (default: the peers in --initial-peers)")
    j.add_argument("--attack", default=None,
                   help="testing only: make this worker malicious, e.g. 'sign_flip', 'gaussian,sigma=1', "
                        "or 'path/to/file.py:MyAttack'")
    j.add_argument("--attack-direction", choices=["forward", "backward", "both"], default=None)
    j.add_argument("--attack-start", type=int, default=None, help="first step at which the attack is active")
    j.add_argument("--steps", type=int, default=0, help="verifier: training steps to drive, then exit (0 = forever)")
    j.add_argument("--data", default=None, help="verifier: UTF-8 text corpus path (default: the manifest's)")
    j.add_argument("--data-shard", default="0/1", help="verifier: data shard 'K/N'")
    j.add_argument("--no-screening", action="store_true", help="verifier: drive the pipeline without screening")
    j.add_argument("--frame", default=None, metavar="PEER_ID",
                   help="testing only: a byzantine verifier that votes to ban this honest worker")
    j.add_argument("--report", default=None, help="write a JSON report here on exit")
    j.add_argument("--progress", default=None, help="verifier: keep a JSON progress file here")
    j.add_argument("--journal", default=None, metavar="PATH",
                   help="verifier: record every completed step here and, restarted, resume after the last one")
    j.add_argument("--metrics-port", type=int, default=0,
                   help="serve this node's Prometheus /metrics on this port (default 0: off)")
    j.add_argument("--metrics-host", default="127.0.0.1", help="where /metrics listens (default: %(default)s)")
    j.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="worker: where the stage computes (default auto: a CUDA GPU if torch sees one)")
    j.add_argument("--throughput", default="auto", metavar="auto|TOKENS_PER_S",
                   help="worker: training tokens/s announced for stage choice; 'auto' measures it once "
                        "(about 2 s) and caches it per device and model (default: %(default)s)")
    j.add_argument("--throughput-cache", default=None, metavar="PATH",
                   help="where 'auto' caches its measurement (default: ~/.cache/sentinel/throughput.json)")
    j.add_argument("--checkpoint-dir", default=None, metavar="PATH",
                   help="worker: save the stage here (atomically) and resume from it on restart; with "
                        "--stage auto a restarted worker goes back to the stage it saved (default: no checkpoints)")
    j.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="worker: optimizer steps between checkpoints (default %(default)s; also saved on exit)")
    j.add_argument("--status-every", type=float, default=30.0, metavar="SECONDS",
                   help="print a one-line status this often (default %(default)s; 0 = never); with "
                        "--metrics-port it is also served at /status for `sentinel-node status`")
    st = sub.add_parser("status", help="print a running node's one-line status (it needs --metrics-port)",
                        description="Ask a node running on this machine for its status, through the "
                                    "/status endpoint beside its /metrics.")
    st.add_argument("--metrics-port", type=int, required=True, help="the --metrics-port the node was started with")
    st.add_argument("--metrics-host", default="127.0.0.1", help="where the node serves it (default: %(default)s)")
    st.add_argument("--json", action="store_true", help="print the whole status object as JSON")
    return p


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"sentinel-node: error: --data-shard must look like K/N, got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise SystemExit(f"sentinel-node: error: --data-shard {text}: need 0 <= K < N")
    return k, n


def _status(args: argparse.Namespace) -> int:
    import json

    from sentinel.net.status import fetch_status, format_status

    if not 1 <= args.metrics_port <= 65535:
        print(f"sentinel-node: error: --metrics-port {args.metrics_port}: need 1..65535", file=sys.stderr)
        return EXIT_USAGE
    host = f"[{args.metrics_host}]" if ":" in args.metrics_host else args.metrics_host
    try:
        status = fetch_status(f"http://{host}:{args.metrics_port}/status")
    except OSError as e:
        print(f"sentinel-node: error: {e}", file=sys.stderr)
        return EXIT_NETWORK
    print(json.dumps(status, indent=2) if args.json else status.get("line") or format_status(status))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return _status(args)
    if args.command == "join":
        if args.throughput != "auto":
            try:
                value = float(args.throughput)
            except ValueError:
                value = float("nan")
            if not (value > 0 and value < float("inf")):
                print(f"sentinel-node: error: --throughput {args.throughput!r}: 'auto' or tokens/s > 0",
                      file=sys.stderr)
                return EXIT_USAGE
        if args.checkpoint_every < 1:
            print(f"sentinel-node: error: --checkpoint-every {args.checkpoint_every}: need >= 1 optimizer step",
                  file=sys.stderr)
            return EXIT_USAGE
        if not args.status_every >= 0:
            print(f"sentinel-node: error: --status-every {args.status_every}: need seconds >= 0 (0 = never)",
                  file=sys.stderr)
            return EXIT_USAGE
        if args.stage != "auto":
            try:
                int(args.stage)
            except ValueError:
                print(f"sentinel-node: error: --stage must be 'auto' or an integer, got {args.stage!r}", file=sys.stderr)
                return EXIT_USAGE
        args.shard = _parse_shard(args.data_shard)
        if not 0 <= args.metrics_port <= 65535:
            print(f"sentinel-node: error: --metrics-port {args.metrics_port}: need 0..65535 (0 = off)", file=sys.stderr)
            return EXIT_USAGE
        if not args.initial_peers:
            print("sentinel-node: error: --initial-peers is required to join a run "
                  "(the bootstrap peer prints it when it starts)", file=sys.stderr)
            return EXIT_USAGE
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("hivemind").setLevel(logging.WARNING)
        from sentinel.net.loop import run

        return run(_join(args))
    return EXIT_USAGE


async def _join(args: argparse.Namespace) -> int:
    from sentinel.net.http import HTTPPortError, start_metrics_server

    try:
        metrics = start_metrics_server(args.metrics_port, args.metrics_host)
    except HTTPPortError as e:
        print(f"sentinel-node: error: {e.strerror}", file=sys.stderr)
        return EXIT_NETWORK
    if metrics is not None:
        print(f"metrics: {metrics.url}", flush=True)
    try:
        return await _join_swarm(args, metrics)
    finally:
        if metrics is not None:
            metrics.close()


async def _join_swarm(args: argparse.Namespace, metrics: Any = None) -> int:
    import torch

    from sentinel.net.runtime import BootstrapUnreachableError, SwarmRuntime, peer_id_of_maddr
    from sentinel.net.view import fetch_manifest
    from sentinel.protocol.errors import IdentityError

    torch.set_num_threads(1)
    log = logging.getLogger("sentinel-node")
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        trusted = args.trusted_signers or [peer_id_of_maddr(m) for m in args.initial_peers]
        runtime = await SwarmRuntime.create(network_config(args))
    except (BootstrapUnreachableError, IdentityError, ValueError) as e:
        print(f"sentinel-node: error: {e}", file=sys.stderr)
        return EXIT_NETWORK
    except Exception as e:  # noqa: BLE001 - p2pd start failures
        print(f"sentinel-node: error: cannot start networking: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_NETWORK
    node = board = None
    try:
        manifest = await fetch_manifest(runtime, trusted)
        log.info("joined run %s as %s (peer %s)", manifest.run_id, args.role, runtime.peer_id)
        if args.role == "worker":
            node = await _start_worker(args, runtime, manifest)
            board = _status_board(args, runtime, node, metrics)
            await stop.wait()
            return 0
        node = await _start_verifier(args, runtime, manifest)
        board = _status_board(args, runtime, node, metrics)
        train = asyncio.create_task(node.train() if args.steps > 0 else asyncio.Event().wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({train, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if train.done():
            train.result()
        else:
            train.cancel()
        return 0
    except (TimeoutError, ValueError) as e:
        print(f"sentinel-node: error: {e}", file=sys.stderr)
        return EXIT_NETWORK
    finally:
        if board is not None:
            await board.stop()
        if node is not None:
            _write_node_report(args, node)
            await node.shutdown()
        else:
            await runtime.shutdown()


async def _start_worker(args: argparse.Namespace, runtime: Any, manifest: Any) -> Any:
    from sentinel.worker.node import WorkerNode

    attack = None
    if args.attack:
        from sentinel.attacks.loader import load_attack

        attack = load_attack(args.attack, directions=args.attack_direction)
        if args.attack_start is not None and hasattr(attack, "start_step"):
            attack.start_step = args.attack_start
    from pathlib import Path

    from sentinel.worker.device import cached_throughput, resolve_device

    device = resolve_device(args.device)  # DeviceError is a ValueError: a clear exit 3 in _join_swarm
    if args.throughput == "auto":
        cache = Path(args.throughput_cache) if args.throughput_cache else None
        throughput, hit = cached_throughput(manifest, device, cache)
        print(f"throughput: {throughput:.0f} tokens/s on {device} ({'cached' if hit else 'measured'})", flush=True)
    else:
        throughput = float(args.throughput)
    stage = None if args.stage == "auto" else int(args.stage)
    node = WorkerNode(runtime, manifest, stage=stage, attack=attack, attack_seed=_stable_seed(runtime.peer_id),
                      device=device, throughput=throughput, checkpoint_dir=args.checkpoint_dir,
                      checkpoint_every=args.checkpoint_every)
    await node.start()
    print(f"worker {runtime.peer_id} ONLINE on stage {node.stage}", flush=True)
    return node


async def _start_verifier(args: argparse.Namespace, runtime: Any, manifest: Any) -> Any:
    from sentinel.model.corpus import load_corpus
    from sentinel.verifier.node import VerifierNode

    corpus = load_corpus(args.data or manifest.corpus)
    node = VerifierNode(runtime, manifest, corpus, steps=args.steps, report_path=args.report,
                        progress_path=args.progress, data_shard=args.shard, screening=not args.no_screening,
                        frame_target=args.frame, journal_path=args.journal)
    await node.start()
    await node.wait_for_pipeline()
    print(f"verifier {runtime.peer_id} ONLINE", flush=True)
    return node


def _status_board(args: argparse.Namespace, runtime: Any, node: Any, metrics: Any) -> Any:
    """Start the node's one-line status (printed every ``--status-every`` s, served at /status)."""
    from sentinel.net.status import StatusBoard

    async def swarm_view() -> dict[str, Any]:
        view: dict[str, Any] = {"peers": len(await runtime.p2p.list_peers())}
        if args.role == "worker":
            from sentinel.net.status import strikes_against
            from sentinel.protocol.keys import verifiers_key

            records = await runtime.get(verifiers_key(node.run))
            view["strikes"] = strikes_against(runtime.peer_id, records)
            view["banned"] = runtime.peer_id in await node.banned_peers()
        return view

    board = StatusBoard(node.status, swarm_view, print_s=args.status_every)
    board.start()
    if metrics is not None:
        metrics.add_route("/status", board.response)
        print(f"status: {metrics.base_url}/status (or: sentinel-node status --metrics-port {metrics.port})",
              flush=True)
    return board


def _stable_seed(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _write_node_report(args: argparse.Namespace, node: Any) -> None:
    if not args.report or args.role == "verifier":
        return  # the verifier writes its own full report when training ends
    from sentinel.metrics import METRICS
    from sentinel.verifier.node import write_json

    with contextlib.suppress(Exception):
        write_json(args.report, {"role": "worker", "peer": node.runtime.peer_id, **node.status(),
                                 "attack": args.attack, "averaging": {**node.averaging_log.summary(),
                                                                "butterfly": dict(node.butterfly.stats)},
                                 "params": node.params_summary(),
                                 "metrics": METRICS.snapshot()})


if __name__ == "__main__":
    sys.exit(main())
