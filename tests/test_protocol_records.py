"""DHT records: owner signatures, key binding and schemas, on their own and inside real hivemind DHT nodes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.utils import MSGPackSerializer, get_dht_time

from sentinel.metrics import METRICS
from sentinel.protocol.errors import InvalidRecordError, UnknownRecordError
from sentinel.protocol.identity import Identity
from sentinel.protocol.records import (
    SCHEMAS,
    SentinelRecordValidator,
    make_value,
    record_key,
    register_schema,
)

RUN = "run-records"
OWNER, OTHER = Identity.generate(), Identity.generate()

GOOD: dict[str, dict[str, Any]] = {
    "manifest": {"manifest": {"stages": 4, "model": {"d": 64}}},
    "stage_claim": {"stage": 1, "state": "ONLINE", "throughput": 12.5, "step": 3, "version": "0.1.0"},
    "verifier": {"state": "JOINING", "step": 0},
    "status": {"role": "worker", "state": "ONLINE", "stage": 1, "note": "ok"},
    "ema_summary": {"step": 7, "summary": {"0/forward": {"norm": 1.0}}},
    "ban_vote": {
        "target": OTHER.peer_id,
        "stage": 1,
        "direction": "forward",
        "step": 9,
        "evidence": [b"d" * 32],
    },
    "progress": {"step": 4, "micro_batches": 16},
}


def _record(payload: dict, owner: str, key: str | None = None, expiration: float = 1e9) -> DHTRecord:
    """Build the record exactly as DHTNode.store does before calling sign_value."""
    key = key if key is not None else payload["key"]
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(owner),
        MSGPackSerializer.dumps(payload),
        expiration,
    )


def _signed(payload: dict, identity: Identity = OWNER, **kwargs: Any) -> DHTRecord:
    record = _record(payload, identity.peer_id, **kwargs)
    return dataclasses.replace(record, value=SentinelRecordValidator(identity).sign_value(record))


def _claim(**fields: Any) -> dict:
    key = record_key(RUN, "stage", 1)
    return make_value("stage_claim", key, RUN, **{**GOOD["stage_claim"], **fields})


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_every_kind_round_trips(kind: str) -> None:
    payload = make_value(kind, record_key(RUN, kind), RUN, **GOOD[kind])
    record = _signed(payload)
    validator = SentinelRecordValidator(None, RUN)
    assert validator.validate(record)
    assert MSGPackSerializer.loads(validator.strip_value(record)) == payload


def test_record_key_and_make_value() -> None:
    assert record_key("r1", "stage", 3) == "sentinel/r1/stage/3"
    value = make_value("progress", "k", "r1", step=1, micro_batches=2, extra=(1, 2))
    assert value == {
        "kind": "progress",
        "key": "k",
        "run": "r1",
        "step": 1,
        "micro_batches": 2,
        "extra": [1, 2],
    }
    with pytest.raises(UnknownRecordError):
        make_value("nonsense", "k", "r1")
    with pytest.raises(InvalidRecordError):
        make_value("stage_claim", "k", "r1", stage=-1)


@pytest.mark.parametrize(
    "kind,bad",
    [
        ("manifest", {"manifest": "not a dict"}),
        ("stage_claim", {"state": "DANCING"}),
        ("stage_claim", {"throughput": -1.0}),
        ("stage_claim", {"throughput": float("nan")}),
        ("stage_claim", {"step": True}),
        ("stage_claim", {"version": 1}),
        ("verifier", {"step": "3"}),
        ("status", {"role": "king"}),
        ("status", {"note": "x" * 5000}),
        ("ema_summary", {"summary": [1, 2]}),
        ("ban_vote", {"target": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"}),
        ("ban_vote", {"evidence": "trust me"}),
        ("progress", {"micro_batches": None}),
    ],
)
def test_schema_violations_are_rejected(kind: str, bad: dict) -> None:
    payload = {"kind": kind, "key": record_key(RUN, kind), "run": RUN, **GOOD[kind], **bad}
    with pytest.raises(InvalidRecordError):
        SCHEMAS[kind](payload)
    assert not SentinelRecordValidator(None, RUN).validate(_signed(payload))


def test_unsigned_foreign_tampered_and_misbound_records_are_rejected() -> None:
    validator = SentinelRecordValidator(OWNER, RUN)
    payload = _claim()
    before = METRICS.get("sentinel_rejected_records_total", reason="forged_signature")

    # another peer's subkey: sign_value refuses to sign, and the unsigned value fails everywhere
    foreign = _record(payload, OTHER.peer_id)
    assert validator.sign_value(foreign) == foreign.value
    assert not validator.validate(foreign)
    # signed by OWNER but claiming OTHER's subkey (a forged signature)
    good = _signed(payload)
    assert validator.validate(good)
    assert not validator.validate(dataclasses.replace(good, subkey=foreign.subkey))
    # value tampered after signing
    inner, signature = msgpack.unpackb(good.value)
    tampered_inner = MSGPackSerializer.dumps({**payload, "throughput": 1e9})
    assert not validator.validate(dataclasses.replace(good, value=msgpack.packb([tampered_inner, signature])))
    # expiration extended, or the record moved under another DHT key
    assert not validator.validate(dataclasses.replace(good, expiration_time=good.expiration_time + 1))
    assert not validator.validate(
        dataclasses.replace(good, key=DHTID.generate(source="elsewhere").to_bytes())
    )
    assert METRICS.get("sentinel_rejected_records_total", reason="forged_signature") >= before + 4
    # signed correctly, but for a key other than the one it is stored under
    misbound = _signed(payload, key=record_key(RUN, "stage", 2))
    assert not validator.validate(misbound)
    assert METRICS.get("sentinel_rejected_records_total", reason="wrong_key") >= 1


def test_wrong_run_unknown_kind_oversized_and_garbage() -> None:
    validator = SentinelRecordValidator(None, RUN, max_value_bytes=4096)
    assert not validator.validate(_signed({**_claim(), "run": "other"}))
    assert SentinelRecordValidator(None, None).validate(_signed({**_claim(), "run": "other"}))
    assert not validator.validate(_signed({**_claim(), "kind": "mystery"}))
    assert not validator.validate(_signed({**_claim(), "pad": "x" * 5000}))
    assert not validator.validate(_signed({"key": _claim()["key"]}))  # no kind
    good = _signed(_claim())
    for value in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("x"), good.value[:-1]):
        assert not validator.validate(dataclasses.replace(good, value=value))
    for subkey in (MSGPackSerializer.dumps(None), b"", b"\xc1", MSGPackSerializer.dumps("QmNotEd25519")):
        assert not validator.validate(dataclasses.replace(good, subkey=subkey))


def test_register_schema_extends_kinds() -> None:
    def _hello(value: dict) -> None:
        if not isinstance(value.get("greeting"), str):
            raise InvalidRecordError("hello record needs a greeting")

    register_schema("hello_test", _hello)
    try:
        key = record_key(RUN, "hello")
        assert SentinelRecordValidator(None, RUN).validate(
            _signed(make_value("hello_test", key, RUN, greeting="hi"))
        )
        assert not SentinelRecordValidator(None, RUN).validate(
            _signed({"kind": "hello_test", "key": key, "run": RUN})
        )
    finally:
        SCHEMAS.pop("hello_test")


def test_validators_merge() -> None:
    assert SentinelRecordValidator(OWNER).merge_with(SentinelRecordValidator(OTHER))
    assert SentinelRecordValidator(OWNER).priority > 0


def test_two_real_dht_nodes_enforce_ownership(tmp_path: Path) -> None:
    id1 = Identity.load_or_create(tmp_path / "one.key")
    id2 = Identity.load_or_create(tmp_path / "two.key")
    key = record_key(RUN, "stage", 0)
    claim = make_value(
        "stage_claim", key, RUN, stage=0, state="ONLINE", throughput=3.5, step=1, version="0.1.0"
    )

    async def main() -> None:
        p2p1 = p2p2 = node1 = node2 = None
        try:
            p2p1 = await P2P.create(
                identity_path=str(tmp_path / "one.key"),
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                startup_timeout=60,
            )
            node1 = await DHTNode.create(p2p=p2p1, record_validator=SentinelRecordValidator(id1, RUN))
            maddrs = [str(m) for m in await p2p1.get_visible_maddrs()]
            p2p2 = await P2P.create(
                identity_path=str(tmp_path / "two.key"),
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                initial_peers=maddrs,
                check_if_identity_free=False,  # hivemind's check only parses RSA identities
                startup_timeout=60,
            )
            node2 = await DHTNode.create(
                p2p=p2p2, initial_peers=maddrs, record_validator=SentinelRecordValidator(id2, RUN)
            )
            assert p2p1.peer_id.to_base58() == id1.peer_id and p2p2.peer_id.to_base58() == id2.peer_id
            expiration = get_dht_time() + 60

            # honest claim under one's own subkey: visible from the other node, payload intact
            assert await node1.store(key, claim, expiration, subkey=id1.peer_id)
            found = await node2.get(key, latest=True)
            assert found is not None and set(found.value) == {id1.peer_id}
            assert found.value[id1.peer_id].value == claim

            # a claim written under ANOTHER peer's subkey is refused everywhere
            other_key = record_key(RUN, "stage", 5)
            forged = make_value("stage_claim", other_key, RUN, **GOOD["stage_claim"])
            assert not await node1.store(other_key, forged, expiration, subkey=id2.peer_id)
            assert await node2.get(other_key, latest=True) is None
            assert await node1.get(other_key, latest=True) is None

            # a tampered value pushed straight to the other node's RPC is refused
            validator = SentinelRecordValidator(id1, RUN)
            tamper_key = record_key(RUN, "stage", 7)
            honest = _record(make_value("stage_claim", tamper_key, RUN, **GOOD["stage_claim"]), id1.peer_id)
            honest = dataclasses.replace(honest, expiration_time=expiration)
            signed = validator.sign_value(honest)
            inner, signature = msgpack.unpackb(signed)
            tampered = msgpack.packb([inner.replace(b"ONLINE", b"OFFLINE"[:6]), signature])
            key_id = DHTID.generate(source=tamper_key)
            assert await node1.protocol.call_store(
                p2p2.peer_id, [key_id], [tampered], expiration, [id1.peer_id]
            ) == [False]
            assert await node2.get(tamper_key, latest=True) is None

            # unknown kind is refused even when correctly signed by its owner
            odd_key = record_key(RUN, "odd")
            assert not await node2.store(
                odd_key, {"kind": "mystery", "key": odd_key, "run": RUN}, expiration, subkey=id2.peer_id
            )
            assert await node1.get(odd_key, latest=True) is None

            # control: the untampered signed bytes are accepted by the same RPC path
            assert await node1.protocol.call_store(
                p2p2.peer_id, [key_id], [signed], expiration, [id1.peer_id]
            ) == [True]
        finally:
            for node in (node2, node1):
                if node is not None:
                    await node.shutdown()
            for p2p in (p2p2, p2p1):
                if p2p is not None:
                    await p2p.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
