"""The bootstrap peer: a DHT peer with a stable identity that publishes the signed run manifest.

Maintainers run it; everyone else passes its multiaddr as ``--initial-peers``. The manifest is a
DHT record under a fixed key in the bootstrap's own subkey, signed by its identity, so nodes that
bootstrapped through it accept exactly that manifest and nothing another peer writes.

It also serves the swarm monitor (:mod:`sentinel.bootstrap.monitor`): the bootstrap is the one
peer every maintainer already runs and knows the address of, and it sees the whole DHT.
"""

from __future__ import annotations

import logging
from typing import Any

from sentinel.bootstrap.monitor import SwarmMonitor
from sentinel.net.runtime import SwarmRuntime
from sentinel.protocol.keys import MANIFEST_KEY
from sentinel.run.manifest import RunManifest

logger = logging.getLogger(__name__)

class BootstrapPeer:
    def __init__(self, runtime: SwarmRuntime, manifest: RunManifest):
        self.runtime = runtime
        self.manifest = manifest
        self.monitor: SwarmMonitor | None = None

    def _manifest_record(self) -> dict[str, Any]:
        return self.runtime.record_value("manifest", MANIFEST_KEY, self.manifest.run_id,
                                         manifest=self.manifest.to_dict(), fingerprint=self.manifest.fingerprint())

    async def start(self) -> list[str]:
        self.runtime.announce(MANIFEST_KEY, self._manifest_record)
        await self.runtime.announce_now()
        return await self.runtime.visible_maddrs()

    async def start_monitor(self, host: str = "127.0.0.1", port: int = 0, interval_s: float = 2.0) -> str:
        """Serve the monitor on ``host:port`` (0 = a free port); returns its URL.

        Raises :class:`sentinel.net.http.HTTPPortError` if the port cannot be bound.
        """
        self.monitor = SwarmMonitor(self.runtime, self.manifest.run_id, self.manifest.num_stages, host=host,
                                    port=port, interval_s=interval_s,
                                    info={"bootstrap": self.runtime.peer_id,
                                          "fingerprint": self.manifest.fingerprint()})
        return await self.monitor.start()

    async def shutdown(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        await self.runtime.shutdown()
