"""`sentinel-bootstrap`: start the bootstrap peer of a run and print the address volunteers join.

    sentinel-bootstrap --identity-path bootstrap.id --host-maddrs /ip4/0.0.0.0/tcp/31337 --config run.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from sentinel.node.cli import EXIT_NETWORK, EXIT_USAGE, add_network_args, install_stop_signals, network_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentinel-bootstrap", description=__doc__.split("\n\n")[0])
    add_network_args(p)
    p.add_argument("--config", default=None, help="YAML run manifest (model, stages, optimizer, corpus, ...)")
    p.add_argument("--run-id", default=None, help="override the manifest's run_id")
    p.add_argument("--num-stages", type=int, default=None, help="override the manifest's num_stages")
    p.add_argument("--new-swarm", action="store_true",
                   help="start a new swarm (no --initial-peers); otherwise join the given peers as one more bootstrap")
    p.add_argument("--maddr-file", default=None, help="also write the visible multiaddrs to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.new_swarm and not args.initial_peers:
        print("sentinel-bootstrap: error: pass --new-swarm to start a new swarm, or --initial-peers to join one",
              file=sys.stderr)
        return EXIT_USAGE
    from sentinel.bootstrap.manifest import ManifestError, RunManifest, load_manifest_file

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
    return asyncio.run(_serve(args, manifest))


async def _serve(args: argparse.Namespace, manifest) -> int:
    from sentinel.bootstrap.peer import BootstrapPeer
    from sentinel.node.runtime import BootstrapUnreachableError, SwarmRuntime
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
        if args.maddr_file:
            tmp = Path(args.maddr_file + ".tmp")
            tmp.write_text("\n".join(maddrs) + "\n")
            tmp.replace(args.maddr_file)
        print(f"run {manifest.run_id} ({manifest.num_stages} stages) — join with:", flush=True)
        for m in maddrs:
            print(f"  sentinel-node join --initial-peers {m}", flush=True)
        await stop.wait()
        return 0
    finally:
        await peer.shutdown()


if __name__ == "__main__":
    sys.exit(main())
