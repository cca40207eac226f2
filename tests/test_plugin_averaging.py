"""A plain plugin attack (no Sentinel base class) on a live worker's averaging path, over real
P2P: the worker answers ``params`` requests with no handler error, honestly when the plugin has
no ``average`` method (``examples/my_attack.py:Dampen``) and with the plugin's poison when it has."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import psutil
import torch

from sentinel.attacks.loader import load_attack
from sentinel.metrics import METRICS
from sentinel.net.runtime import NetworkConfig, SwarmRuntime
from sentinel.net.view import fetch_params
from sentinel.protocol import rpc as wire
from sentinel.protocol.checks import MessageChecker
from sentinel.run.manifest import RunManifest
from sentinel.worker.node import WorkerNode
from tests.conftest import assert_all_gone
from tests.test_butterfly import Runner

REPO = Path(__file__).resolve().parents[1]
NUMEL = 5_000


async def _fetch_from_attacker(spec: str) -> tuple[torch.Tensor, list, list]:
    runtimes: list[SwarmRuntime] = []
    try:
        runtimes.append(await SwarmRuntime.create(NetworkConfig(startup_timeout=120)))
        maddr = (await runtimes[0].visible_maddrs())[0]
        runtimes.append(await SwarmRuntime.create(NetworkConfig(initial_peers=[maddr], startup_timeout=120)))
        worker_rt, asker = runtimes
        manifest = RunManifest(run_id="plugin-averaging")
        node = WorkerNode(worker_rt, manifest, attack=load_attack(spec))
        node.stage, node.max_step = 1, 3
        node.runner = Runner(torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)))
        for name, handler in node.handlers().items():
            await worker_rt.serve(name, handler)
        got, failed = await fetch_params(asker, MessageChecker(manifest.run_id), manifest.run_id, 3, 1,
                                         [worker_rt.peer_id], numel=NUMEL, timeout=60)
        return node.runner.flat, got, failed
    finally:
        for rt in runtimes:
            await rt.shutdown()


def _handler_errors() -> float:
    return METRICS.get("sentinel_handler_errors_total", handler=wire.PARAMS)


def test_a_plain_plugin_attack_serves_its_averaging_requests(caplog, tmp_path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    errors = _handler_errors()
    with caplog.at_level(logging.INFO):
        honest, got, failed = asyncio.run(_fetch_from_attacker(f"{REPO / 'examples' / 'my_attack.py'}:Dampen"))
    assert failed == [] and len(got) == 1, failed
    # Dampen defines no average: its contribution to averaging is its true parameters
    assert torch.equal(got[0][1].tensors["params"], honest)
    assert _handler_errors() == errors
    assert not [r for r in caplog.records if "handler" in r.getMessage() and "failed" in r.getMessage()]

    plugin = tmp_path / "poison.py"
    plugin.write_text("class Zero:\n    def average(self, params, ctx):\n        return 0 * params\n")
    _, got, failed = asyncio.run(_fetch_from_attacker(f"{plugin}:Zero"))
    assert failed == [] and torch.equal(got[0][1].tensors["params"], torch.zeros(NUMEL))
    assert _handler_errors() == errors
    assert_all_gone({p.pid for p in psutil.Process().children(recursive=True)} - before)
