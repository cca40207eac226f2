"""Fuzzing the inputs a node takes from strangers: wire frames, signed messages, DHT records, manifests.

Property: no input crashes (only the documented error types escape, and validators return False
instead of raising), and no input that is invalid by construction is accepted. CI runs a few
hundred examples per target; the drill (``python bench/drills.py fuzz``) runs 25,000 per target
(100,000 in all) through the same functions with ``SENTINEL_FUZZ_EXAMPLES`` and writes the
counts it saw to ``SENTINEL_FUZZ_REPORT``.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
from collections import Counter
from typing import Any

import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.protocol import rpc as wire
from sentinel.protocol.checks import MessageChecker, TensorSpec
from sentinel.protocol.codec import Message, decode, encode
from sentinel.protocol.errors import ProtocolError
from sentinel.protocol.identity import Identity
from sentinel.protocol.records import SCHEMAS, SentinelRecordValidator, make_value, record_key
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import ManifestError, RunManifest

EXAMPLES = int(os.environ.get("SENTINEL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RUN = "fuzz-run"
ALICE, MALLORY = Identity.generate(), Identity.generate()
SPEC = {"x": TensorSpec("float32", (2, 4, 8))}

#: target -> Counter of outcomes ("tried", "rejected:<reason>", "accepted"); written at exit if asked
COUNTS: dict[str, Counter] = {}


def _count(target: str, outcome: str) -> None:
    c = COUNTS.setdefault(target, Counter())
    c["tried"] += 1
    c[outcome] += 1


@atexit.register
def _write_report() -> None:
    path = os.environ.get("SENTINEL_FUZZ_REPORT")
    if path and COUNTS:
        with open(path, "w") as f:
            json.dump({t: dict(c) for t, c in COUNTS.items()}, f, indent=1)


def _valid(step: int = 3, tensor: torch.Tensor | None = None, identity: Identity = ALICE) -> Message:
    x = tensor if tensor is not None else torch.randn(2, 4, 8)
    return sign_message(wire.request(RUN, step, 0, 1, "forward", {"x": x}), identity)


def _frame(msg: Message) -> bytes:
    return b"".join(bytes(p) for p in encode(msg))


def _receive(frame: bytes, checker: MessageChecker) -> Message:
    """What a worker does with a frame from a peer it believes is ALICE."""
    msg = decode(frame)
    checker.check(msg, expected_sender=ALICE.peer_id, expected=SPEC)
    return msg


# -- 1. frames: every mutation of a valid signed frame is rejected --------------------------------


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
def test_mutated_frames_are_rejected(data: st.DataObject, kind: str) -> None:
    frame = _frame(_valid())
    checker = MessageChecker(RUN)
    pos = data.draw(st.integers(0, len(frame) - 1))
    if kind == "flip":
        bad = bytearray(frame)
        bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        bad = frame[:pos]
    elif kind == "insert":
        bad = frame[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + frame[pos:]
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        bad = frame[:pos] + chunk + frame[pos + len(chunk):]
        if bytes(bad) == frame:
            return
    try:
        _receive(bytes(bad), checker)
    except ProtocolError as e:
        _count("frames", f"rejected:{e.reason}")
        return
    _count("frames", "accepted")
    pytest.fail(f"a {kind} mutation at byte {pos} of a signed frame was accepted")


# -- 2. well-formed but hostile messages ------------------------------------------------------------


@FUZZ
@given(kind=st.sampled_from(["other_key", "wrong_run", "replay", "stale", "nan", "inf", "shape", "dtype",
                             "extra_tensor", "negative_step"]),
       step=st.integers(0, 10**6), value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_hostile_messages_are_rejected(kind: str, step: int, value: float) -> None:
    checker = MessageChecker(RUN)
    x = torch.full((2, 4, 8), value)
    if kind == "other_key":  # Mallory signs, claiming nothing: the worker expects Alice
        msg = _valid(step, x, MALLORY)
    elif kind == "wrong_run":
        msg = sign_message(wire.request("another-run", step, 0, 1, "forward", {"x": x}), ALICE)
    elif kind == "replay":
        msg = _valid(step, x)
        _receive(_frame(msg), checker)  # the original is fine once
    elif kind == "stale":
        _receive(_frame(_valid(step + 1000, x)), checker)
        msg = _valid(step, x)
    elif kind in ("nan", "inf"):
        x = x.clone()
        x[1, 2, 3] = math.nan if kind == "nan" else -math.inf
        msg = _valid(step, x)
    elif kind == "shape":
        msg = _valid(step, torch.full((2, 4, 9), value))
    elif kind == "dtype":
        msg = sign_message(wire.request(RUN, step, 0, 1, "forward", {"x": x.half()}), ALICE)
    elif kind == "extra_tensor":
        msg = sign_message(wire.request(RUN, step, 0, 1, "forward", {"x": x, "y": x}), ALICE)
    else:
        msg = _valid(step, x)
        msg = sign_message(Message({**msg.header, "step": -1 - step}, msg.tensors), ALICE)
    try:
        _receive(_frame(msg), checker)
    except ProtocolError as e:
        _count("messages", f"rejected:{e.reason}")
        return
    _count("messages", "accepted")
    pytest.fail(f"a {kind} message was accepted")


# -- 3. DHT records: validators never raise; forged, misbound and foreign records never pass -------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=12))
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _record(payload: Any, owner: str, key: str, expiration: float = 1e9) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(owner),
                     MSGPackSerializer.dumps(payload), expiration)


def _signed(record: DHTRecord, identity: Identity) -> DHTRecord:
    return dataclasses.replace(record, value=SentinelRecordValidator(identity).sign_value(record))


@FUZZ
@given(kind=st.sampled_from(sorted(SCHEMAS)), fields=st.dictionaries(st.text(max_size=10), _value, max_size=6),
       attack=st.sampled_from(["fields", "forged", "misbound", "foreign_run", "garbage", "unsigned"]),
       garbage=st.binary(max_size=200))
def test_dht_records_never_crash_and_invalid_ones_never_pass(kind: str, fields: dict, attack: str,
                                                             garbage: bytes) -> None:
    validator = SentinelRecordValidator(None, RUN)
    key = record_key(RUN, kind)
    payload = {**fields, "kind": kind, "key": key, "run": RUN}
    if attack == "fields":  # validly signed, arbitrary content: the schema decides, nothing may raise
        record = _signed(_record(payload, ALICE.peer_id, key), ALICE)
    elif attack == "forged":  # Mallory signs a record stored under Alice's subkey
        record = _record(payload, ALICE.peer_id, key)
        record = dataclasses.replace(record, value=SentinelRecordValidator(MALLORY).sign_value(
            _record(payload, MALLORY.peer_id, key)))
    elif attack == "misbound":  # signed, but stored under another DHT key than it names
        record = _signed(_record(payload, ALICE.peer_id, key + "/elsewhere"), ALICE)
    elif attack == "foreign_run":
        other = {**payload, "run": "another-run"}
        record = _signed(_record(other, ALICE.peer_id, key), ALICE)
    elif attack == "garbage":
        record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(ALICE.peer_id),
                           garbage, 1e9)
    else:
        record = _record(payload, ALICE.peer_id, key)  # never signed
    ok = validator.validate(record)  # must not raise, whatever the input
    assert isinstance(ok, bool)
    if attack != "fields":
        _count("records", "accepted" if ok else "rejected")
        assert not ok, f"a {attack} record was accepted"
        return
    if ok:  # accepted: it must be exactly what the schema allows for its kind
        SCHEMAS[kind](payload)
    _count("records", "accepted" if ok else "rejected")


def test_a_valid_record_passes_the_same_validator() -> None:  # the control: rejections are not blanket
    payload = make_value("verifier", record_key(RUN, "verifiers"), RUN, state="ONLINE", step=3)
    assert SentinelRecordValidator(None, RUN).validate(_signed(_record(payload, ALICE.peer_id, payload["key"]),
                                                                ALICE))


# -- 4. manifests: any mapping is a manifest or a ManifestError ------------------------------------

_sections = {
    "model": st.dictionaries(st.sampled_from(["vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff",
                                              "norm_eps", "bogus"]), _scalar, max_size=4),
    "optimizer": st.dictionaries(st.sampled_from(["lr", "beta1", "weight_decay", "grad_clip", "bogus"]), _scalar,
                                 max_size=3),
    "training": st.dictionaries(st.sampled_from(["micro_batch_size", "micro_batches_per_step", "averaging",
                                                 "average_every", "bogus"]), _scalar, max_size=3),
}


@FUZZ
@given(top=st.dictionaries(st.sampled_from(["run_id", "num_stages", "seed", "committee_size", "corpus",
                                            "verifier_stamp_bits", "bogus"]),
                           _scalar, max_size=4),
       sections=st.fixed_dictionaries({}, optional={k: st.one_of(v, _value) for k, v in _sections.items()}))
def test_any_manifest_is_parsed_or_refused_clearly(top: dict, sections: dict) -> None:
    try:
        m = RunManifest.from_dict({**top, **sections})
    except ManifestError as e:
        assert str(e)
        _count("manifests", "rejected")
        return
    m.validate()  # what was accepted is consistent
    _count("manifests", "accepted")
