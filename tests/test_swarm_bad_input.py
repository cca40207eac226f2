"""Hostile input against real worker processes: each case is rejected with its specific error, and
the worker keeps serving. The client here is a real peer with its own p2pd, talking over streams."""

from __future__ import annotations

import asyncio
import struct
import time

import msgpack
import pytest
import torch

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from sentinel.net.runtime import NetworkConfig, PeerCallError, SwarmRuntime
from sentinel.net.view import fetch_manifest, read_stage_claims
from sentinel.protocol import rpc as wire
from sentinel.protocol.codec import Message, encode, read_message
from sentinel.protocol.identity import Identity
from sentinel.protocol.keys import stage_key, verifiers_key
from sentinel.protocol.records import make_value
from sentinel.protocol.signing import sign_message
from sentinel.protocol.stamps import solve_stamp
from sentinel.run.manifest import RunManifest
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm


async def _wait_online(client: SwarmRuntime, run: str, stages: int, timeout: float = 180.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        claims = await read_stage_claims(client, run, stages)
        online = {s: next((p for p, v in c.items() if v.get("state") == "ONLINE"), None) for s, c in claims.items()}
        if all(online.values()):
            return online
        await asyncio.sleep(0.5)
    raise TimeoutError("workers did not come ONLINE")


async def _raw_exchange(client: SwarmRuntime, peer: str, handler: str, frame: bytes) -> Message:
    from hivemind.p2p import PeerID

    _, reader, writer = await client.p2p.call_binary_stream_handler(PeerID.from_base58(peer), handler)
    try:
        writer.write(frame)
        await writer.drain()
        return await asyncio.wait_for(read_message(reader), 30)
    finally:
        writer.close()


async def _scenario(maddr: str, bootstrap_id: str) -> dict[str, str]:
    client = await SwarmRuntime.create(NetworkConfig(initial_peers=[maddr]))
    try:
        manifest: RunManifest = await fetch_manifest(client, [bootstrap_id])
        run = manifest.run_id
        key = verifiers_key(run)
        # first an open-mode candidacy without its proof of work: workers must refuse it by name
        await client.store(key, make_value("verifier", key, run, state="ONLINE", step=0))
        workers = await _wait_online(client, run, manifest.num_stages)
        w0, w1 = workers[0], workers[1]
        b, t, d = manifest.training.micro_batch_size, manifest.model.seq_len, manifest.model.d_model
        step = {"n": 1}

        def req(stage: int, tensors: dict, identity: Identity = client.identity, **extra) -> Message:
            step["n"] += 1
            msg = wire.request(run, step["n"], 0, stage, "forward", tensors, mode="eval", **extra)
            return sign_message(msg, identity)

        ids = torch.randint(0, 256, (b, t))
        hidden = torch.randn(b, t, d)

        async def reason_of(peer: str, msg: Message) -> str:
            try:
                await client.call(peer, wire.FORWARD, msg, timeout=60)
            except PeerCallError as e:
                return e.reason
            return "accepted"

        async def still_serving() -> None:
            resp = await client.call(w0, wire.FORWARD, req(0, {"x": ids}), timeout=60)
            assert resp.tensors["y"].shape == (b, t, d)

        out: dict[str, str] = {}

        async def wait_until(reason: str, record: dict) -> None:
            """Re-store ``record`` until a request is answered with ``reason`` ("accepted" = served):
            the worker learns of verifier records through the DHT, so wait for it, don't race it."""
            deadline = time.monotonic() + 180
            while True:
                got = await reason_of(w0, req(0, {"x": ids}))
                if got == reason:
                    return
                if got not in ("unknown_verifier", "unstamped_verifier") or time.monotonic() > deadline:
                    raise AssertionError(f"waiting for {reason!r}, got {got!r}")
                await client.store(key, record)
                await asyncio.sleep(0.5)

        await wait_until("unstamped_verifier", make_value("verifier", key, run, state="ONLINE", step=0))
        out["unstamped_verifier"] = "unstamped_verifier"
        stamp = solve_stamp(run, client.peer_id, manifest.verifier_stamp_bits)
        await wait_until("accepted", make_value("verifier", key, run, state="ONLINE", step=0, stamp=stamp))

        forged = req(0, {"x": ids})
        forged.header["signature"] = Identity.generate().sign(forged.header["digest"])
        out["forged_signature"] = await reason_of(w0, forged)
        await still_serving()

        out["wrong_sender"] = await reason_of(w0, req(0, {"x": ids}, identity=Identity.generate()))
        await still_serving()

        once = req(0, {"x": ids})
        assert await reason_of(w0, once) == "accepted"
        out["replayed"] = await reason_of(w0, once)
        await still_serving()

        out["wrong_shape"] = await reason_of(w0, req(0, {"x": torch.randint(0, 256, (b, t + 1))}))
        out["wrong_dtype"] = await reason_of(w0, req(0, {"x": ids.to(torch.int32)}))
        nan = hidden.clone()
        nan[1, 2, 3] = float("nan")
        out["non_finite"] = await reason_of(w1, req(1, {"x": nan, "targets": ids}))
        await still_serving()

        # a header that declares a 2**40-element tensor: refused before a byte of payload is read
        header = msgpack.packb({"run": run, "tensors": [["x", "float32", [2**20, 2**20], 4 * 2**40]]})
        resp = await _raw_exchange(client, w0, wire.FORWARD, b"SNT1" + struct.pack(">I", len(header)) + header)
        out["oversized"] = resp.header.get("reason")
        garbage = b"\xc1\xff\x00not msgpack"
        resp = await _raw_exchange(client, w0, wire.FORWARD, b"SNT1" + struct.pack(">I", len(garbage)) + garbage)
        out["malformed"] = resp.header.get("reason")
        valid = b"".join(bytes(p) for p in encode(req(0, {"x": ids})))
        resp = await _raw_exchange(client, w0, wire.FORWARD, valid)
        assert resp.header.get("direction") == "forward_result"
        await still_serving()

        # a stage claim written under the worker's subkey by someone else is refused by every DHT node
        skey = stage_key(run, 0)
        forged_claim = make_value("stage_claim", skey, run, stage=0, state="OFFLINE", throughput=0.0, step=0,
                                  version="0")
        from hivemind.utils import get_dht_time

        ok = await client.dht.store(skey, forged_claim, get_dht_time() + 30, subkey=w0)
        out["dht_claim_under_other_subkey"] = "accepted" if ok else "rejected"
        claims = await read_stage_claims(client, run, manifest.num_stages)
        assert claims[0][w0]["state"] == "ONLINE", claims[0]
        await still_serving()
        return out
    finally:
        await client.shutdown()


def test_bad_input_rejected_and_worker_keeps_serving(tmp_path):
    cfg = SwarmConfig(stages=2, replicas=1, verifiers=0, malicious=0)
    swarm = LocalSwarm(cfg, tmp_path)
    try:
        swarm.start()
        out = asyncio.run(_scenario(swarm.maddr, swarm.bootstrap.peer_id))
        assert all(w.alive for w in swarm.workers), "a worker died on hostile input"
    finally:
        swarm.stop()
    assert out == {
        "forged_signature": "forged_signature",
        "wrong_sender": "wrong_sender",
        "replayed": "replayed",
        "wrong_shape": "wrong_shape",
        "wrong_dtype": "wrong_dtype",
        "non_finite": "non_finite",
        "oversized": "oversized",
        "malformed": "malformed",
        "dht_claim_under_other_subkey": "rejected",
        "unstamped_verifier": "unstamped_verifier",
    }
    assert_all_gone(swarm.all_pids())
