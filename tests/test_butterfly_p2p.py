"""Butterfly rounds over real P2P streams: three replicas, each with its own p2pd daemon joined
through a real DHT, one of them an honest contributor that lies as a reducer (``avg_reducer``).

The protocol's cases one by one are in ``test_butterfly.py``; this is the same code over the
network: pushes, answers, audits and pulls as stream calls between daemons, 8 parts a round.
"""

from __future__ import annotations

import asyncio

import psutil
import pytest
import torch

from sentinel.attacks.loader import load_attack
from sentinel.net.runtime import NetworkConfig, SwarmRuntime
from sentinel.protocol import rpc as wire
from sentinel.protocol.aggregation import centered_clip, partition
from sentinel.run.manifest import RunManifest, TrainingConfig
from sentinel.worker.node import WorkerNode
from tests.conftest import assert_all_gone
from tests.test_butterfly import Runner

pytestmark = pytest.mark.swarm

NUMEL, PART = 30_000, 4_000


async def _scenario(daemons: set[int]) -> tuple[list[torch.Tensor], list[WorkerNode], torch.Tensor]:
    runtimes: list[SwarmRuntime] = []
    try:
        runtimes.append(await SwarmRuntime.create(NetworkConfig(startup_timeout=120)))
        maddr = (await runtimes[0].visible_maddrs())[0]
        for _ in range(2):
            runtimes.append(await SwarmRuntime.create(NetworkConfig(initial_peers=[maddr], startup_timeout=120)))
        manifest = RunManifest(run_id="butterfly-p2p", training=TrainingConfig(  # parameter averaging: async
            sync="async", averaging="centered-clip", averaging_partition="butterfly", averaging_part_numel=PART,
            averaging_audit=0.0))
        g = torch.Generator().manual_seed(0)
        base = torch.randn(NUMEL, generator=g)
        ids = [rt.peer_id for rt in runtimes]
        nodes = []
        for i, rt in enumerate(runtimes):
            node = WorkerNode(rt, manifest, attack=load_attack("avg_reducer") if i == 2 else None)
            node.stage, node.max_step = 1, 5
            node.runner = Runner(base + 0.05 * torch.randn(NUMEL, generator=g))
            node._anchor = node.runner.flat - 0.01 * torch.randn(NUMEL, generator=g)

            async def replicas() -> list[str]:  # the stage claims a worker would read from the DHT
                return ids

            node.butterfly.replicas = replicas
            for name in (wire.PARAMS, wire.REDUCE, wire.REDUCE_AUDIT):
                await rt.serve(name, node.handlers()[name])
            nodes.append(node)
        daemons |= {p.pid for p in psutil.Process().children(recursive=True)}
        flats = torch.stack([n.runner.flat for n in nodes])
        expected = torch.cat([centered_clip(flats[:, lo:hi]) for lo, hi in partition(NUMEL, 3, PART)])
        results = await asyncio.wait_for(asyncio.gather(
            *(nodes[i].butterfly.round([p for p in ids if p != ids[i]], timeout=60) for i in (0, 1))), 300)
        return list(results), nodes, expected
    finally:
        for rt in runtimes:
            await rt.shutdown()


def test_a_butterfly_round_over_p2p_reduces_every_part_and_catches_a_lying_reducer():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    daemons: set[int] = set()
    results, nodes, expected = asyncio.run(_scenario(daemons))
    liar = nodes[2].runtime.peer_id
    for node, got in zip(nodes[:2], results, strict=True):
        assert liar in node.butterfly.distrusted, node.butterfly.stats
        assert node.butterfly.stats["lies_caught"] >= 1 and node.butterfly.stats["parts_pushed"] > 0
        assert torch.allclose(got, expected, atol=1e-5)  # the liar's parts recomputed honestly
    assert nodes[2].butterfly.stats["parts_served"] > 0
    assert len(daemons - before) >= 3  # a p2pd per replica
    assert_all_gone(daemons - before)
