"""`sentinel-bootstrap`: start the bootstrap peer of a run and print the address volunteers join.

    sentinel-bootstrap --identity-path bootstrap.id --host-maddrs /ip4/0.0.0.0/tcp/31337 --config run.yaml

It also serves the swarm monitor (page, ``/api/state``, ``/metrics``) and prints its URL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from sentinel.net.args import EXIT_NETWORK, EXIT_USAGE, add_network_args, install_stop_signals, network_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentinel-bootstrap", description=__doc__.split("\n\n")[0])
    add_network_args(p)
    p.add_argument("--config", default=None, help="YAML run manifest (model, stages, optimizer, corpus, ...)")
    p.add_argument("--run-id", default=None, help="override the manifest's run_id")
    p.add_argument("--num-stages", type=int, default=None, help="override the manifest's num_stages")
    p.add_argument("--new-swarm", action="store_true",
                   help="start a new swarm (no --initial-peers); otherwise join the given peers as one more bootstrap")
    p.add_argument("--maddr-file", default=None, help="also write the visible multiaddrs to this file")
    g = p.add_argument_group("monitor (HTTP: / page, /api/state JSON, /metrics Prometheus)")
    g.add_argument("--monitor-host", default="127.0.0.1",
                   help="where the monitor listens (default: %(default)s; 0.0.0.0 exposes it to the network)")
    g.add_argument("--monitor-port", type=int, default=0, help="monitor port (default: 0 = any free port)")
    g.add_argument("--monitor-url-file", default=None, help="also write the monitor URL to this file")
    g.add_argument("--no-monitor", action="store_true", help="do not serve the monitor")
    return p


def _write_atomic(path: str, text: str) -> None:
    """Launchers poll these files: write a temporary file and rename, so they never read half."""
    tmp = Path(path + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.monitor_port <= 65535:
        print(f"sentinel-bootstrap: error: --monitor-port {args.monitor_port}: need 0..65535 (0 = any free port)",
              file=sys.stderr)
        return EXIT_USAGE
    if not args.new_swarm and not args.initial_peers:
        print("sentinel-bootstrap: error: pass --new-swarm to start a new swarm, or --initial-peers to join one",
              file=sys.stderr)
        return EXIT_USAGE
    from sentinel.run.manifest import ManifestError, RunManifest, load_manifest_file

    try:
        manifest = load_manifest_file(args.config) if args.config else RunManifest()
        overrides = {}
        if args.run_id:
            overrides["run_id"] = args.run_id
        if args.num_stages:
            overrides["num_stages"] = args.num_stages
        if overrides:
            manifest = RunManifest.from_dict({**manifest.to_dict(), **overrides})
    except ManifestError as e:
        print(f"sentinel-bootstrap: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    from sentinel.net.loop import run

    return run(_serve(args, manifest))


async def _serve(args: argparse.Namespace, manifest) -> int:
    from sentinel.bootstrap.peer import BootstrapPeer
    from sentinel.net.http import HTTPPortError
    from sentinel.net.runtime import BootstrapUnreachableError, SwarmRuntime
    from sentinel.protocol.errors import IdentityError

    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        runtime = await SwarmRuntime.create(network_config(args))
    except (BootstrapUnreachableError, IdentityError, ValueError, RuntimeError) as e:
        print(f"sentinel-bootstrap: error: {e}", file=sys.stderr)
        return EXIT_NETWORK
    peer = BootstrapPeer(runtime, manifest)
    try:
        maddrs = await peer.start()
        url = None
        if not args.no_monitor:  # before the address goes out: a taken port fails before anyone joins
            try:
                url = await peer.start_monitor(args.monitor_host, args.monitor_port)
            except HTTPPortError as e:
                print(f"sentinel-bootstrap: error: monitor: {e.strerror}", file=sys.stderr)
                return EXIT_NETWORK
            if args.monitor_url_file:
                _write_atomic(args.monitor_url_file, url + "\n")
        if args.maddr_file:
            _write_atomic(args.maddr_file, "\n".join(maddrs) + "\n")
        print(f"run {manifest.run_id} ({manifest.num_stages} stages) — join with:", flush=True)
        for m in maddrs:
            print(f"  sentinel-node join --initial-peers {m}", flush=True)
        if url:
            print(f"monitor: {url}", flush=True)
        await stop.wait()
        return 0
    finally:
        await peer.shutdown()


if __name__ == "__main__":
    sys.exit(main())
