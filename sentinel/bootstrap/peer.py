"""The bootstrap peer: a DHT peer with a stable identity that publishes the signed run manifest.

Maintainers run it; everyone else passes its multiaddr as ``--initial-peers``. The manifest is a
DHT record under a fixed key in the bootstrap's own subkey, signed by its identity, so nodes that
bootstrapped through it accept exactly that manifest and nothing another peer writes.
"""

from __future__ import annotations

import logging
from typing import Any

from sentinel.bootstrap.manifest import RunManifest
from sentinel.node.runtime import SwarmRuntime

logger = logging.getLogger(__name__)

MANIFEST_KEY = "sentinel/manifest"


class BootstrapPeer:
    def __init__(self, runtime: SwarmRuntime, manifest: RunManifest):
        self.runtime = runtime
        self.manifest = manifest

    def _manifest_record(self) -> dict[str, Any]:
        return self.runtime.record_value("manifest", MANIFEST_KEY, self.manifest.run_id,
                                         manifest=self.manifest.to_dict(), fingerprint=self.manifest.fingerprint())

    async def start(self) -> list[str]:
        self.runtime.announce(MANIFEST_KEY, self._manifest_record)
        await self.runtime.announce_now()
        return await self.runtime.visible_maddrs()

    async def shutdown(self) -> None:
        await self.runtime.shutdown()
