"""Command-line arguments and process plumbing every node entry point shares."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

EXIT_USAGE = 2
EXIT_NETWORK = 3


def add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (hivemind-style)")
    g.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                   help="multiaddrs of bootstrap peers, e.g. /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW...")
    g.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR",
                   help="where to listen (default: %(default)s)")
    g.add_argument("--announce-maddrs", nargs="*", default=None, metavar="MADDR",
                   help="addresses other peers should dial (behind NAT / port forwarding)")
    g.add_argument("--identity-path", default=None,
                   help="Ed25519 identity file (libp2p format), created on first run with mode 0600; "
                        "keeps the same peer id across restarts")
    g.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for p2pd (default 60)")
    g.add_argument("--heartbeat", type=float, default=3.0, help="DHT re-announce period, seconds")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def network_config(args: argparse.Namespace) -> Any:
    from sentinel.net.runtime import NetworkConfig

    return NetworkConfig(initial_peers=list(args.initial_peers), host_maddrs=list(args.host_maddrs),
                         announce_maddrs=args.announce_maddrs, identity_path=args.identity_path,
                         startup_timeout=args.startup_timeout, heartbeat_s=args.heartbeat,
                         record_ttl_s=max(5 * args.heartbeat, 10.0))


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
