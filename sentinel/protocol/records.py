"""Signed, schema-checked DHT records, enforced by a validator that every DHT node runs.

Conventions (what makes "each peer writes only its own subkey" hold):

- every Sentinel record is stored under a DHT key built by :func:`record_key` with **subkey = the
  owner's PeerID** (base58) and a dict value made by :func:`make_value`, holding at least
  ``kind`` (selects the schema) and ``key`` (the plain-text DHT key, which binds the value to the
  key: a signed record cannot be replayed under another key);
- :meth:`SentinelRecordValidator.sign_value` signs only records whose subkey is the local PeerID;
  anything else leaves unsigned and is refused by every node, the writer included;
- :meth:`SentinelRecordValidator.validate` accepts a record only with a valid Ed25519 signature by
  the key embedded in the subkey's PeerID over
  ``BLAKE2b-256(tag || len-prefixed key, subkey, value || expiration as big-endian float64)``
  (the expiration is signed so that nobody can extend the life of a stale claim), a matching key
  binding, the right run and a passing schema.

Signed value on the wire: ``msgpack([inner_value_bytes, signature])``; ``strip_value`` returns
``inner_value_bytes`` (what hivemind's serializer produced from the dict).

Gotchas: hivemind drops a whole dictionary answer from a peer if any one subkey fails validation;
records expire, so owners re-announce on a heartbeat; a store made before the node has peers is
only kept locally.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Callable
from typing import Any

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from sentinel.metrics import METRICS
from sentinel.protocol.errors import InvalidRecordError, ProtocolError, UnknownRecordError
from sentinel.protocol.identity import Identity, public_key_from_peer_id

__all__ = [
    "SCHEMAS",
    "STATES",
    "ROLES",
    "register_schema",
    "record_key",
    "make_value",
    "SentinelRecordValidator",
]

logger = logging.getLogger(__name__)

STATES = frozenset({"JOINING", "ONLINE", "OFFLINE"})
ROLES = frozenset({"worker", "verifier", "bootstrap"})
_SIGNATURE_TAG = b"sentinel-dht-record-v1"
_MAX_STATUS_FIELD_BYTES = 4096

Schema = Callable[[dict], None]
SCHEMAS: dict[str, Schema] = {}


def register_schema(kind: str, fn: Schema) -> Schema:
    """Register (or replace) the schema of a record kind; ``fn`` raises InvalidRecordError."""
    SCHEMAS[kind] = fn
    return fn


def _field(value: dict, name: str, typ: type | tuple[type, ...]) -> Any:
    item = value.get(name)
    ok = isinstance(item, typ) and not (isinstance(item, bool) and typ in (int, float, (int, float)))
    if not ok:
        raise InvalidRecordError(
            f"{value.get('kind')} record: field {name!r} must be {typ}, got {item!r:.60}"
        )
    return item


def _nonneg_int(value: dict, name: str) -> int:
    item = _field(value, name, int)
    if item < 0:
        raise InvalidRecordError(f"{value.get('kind')} record: field {name!r} must be >= 0")
    return item


def _state(value: dict) -> None:
    if value.get("state") not in STATES:
        raise InvalidRecordError(f"{value.get('kind')} record: state must be one of {sorted(STATES)}")


def _manifest(value: dict) -> None:
    _field(value, "run", str)
    _field(value, "manifest", dict)


def _stage_claim(value: dict) -> None:
    _field(value, "run", str)
    _nonneg_int(value, "stage")
    _state(value)
    throughput = _field(value, "throughput", (int, float))
    if not (math.isfinite(throughput) and throughput >= 0):
        raise InvalidRecordError("stage_claim record: throughput must be a finite number >= 0")
    _nonneg_int(value, "step")
    _field(value, "version", str)


def _verifier(value: dict) -> None:
    _field(value, "run", str)
    _state(value)
    _nonneg_int(value, "step")
    if "stamp" in value and not 0 <= _nonneg_int(value, "stamp") < 2**63:
        # whether the stamp is *valid* depends on the manifest's bits: checked where candidates are
        # counted (sentinel.protocol.stamps); here only that it is a proof-of-work nonce at all
        raise InvalidRecordError("verifier record: field 'stamp' must be < 2**63")


def _status(value: dict) -> None:
    _field(value, "run", str)
    if value.get("role") not in ROLES:
        raise InvalidRecordError(f"status record: role must be one of {sorted(ROLES)}")
    _state(value)
    for name, item in value.items():
        if len(msgpack.packb(item, use_bin_type=True)) > _MAX_STATUS_FIELD_BYTES:
            raise InvalidRecordError(f"status record: field {name!r} exceeds {_MAX_STATUS_FIELD_BYTES} bytes")


def _ema_summary(value: dict) -> None:
    _field(value, "run", str)
    _nonneg_int(value, "step")
    _field(value, "summary", dict)


def _ban_vote(value: dict) -> None:
    _field(value, "run", str)
    target = _field(value, "target", str)
    try:
        public_key_from_peer_id(target)
    except ProtocolError:
        raise InvalidRecordError("ban_vote record: target must be an Ed25519 peer id") from None
    _nonneg_int(value, "stage")
    _field(value, "direction", str)
    _nonneg_int(value, "step")
    _field(value, "evidence", (list, dict))


def _progress(value: dict) -> None:
    _field(value, "run", str)
    _nonneg_int(value, "step")
    _nonneg_int(value, "micro_batches")


for _kind, _fn in {
    "manifest": _manifest,
    "stage_claim": _stage_claim,
    "verifier": _verifier,
    "status": _status,
    "ema_summary": _ema_summary,
    "ban_vote": _ban_vote,
    "progress": _progress,
}.items():
    register_schema(_kind, _fn)


def record_key(run_id: str, *parts: object) -> str:
    """Plain-text DHT key, e.g. ``record_key(run, "stage", 3) == "sentinel/<run>/stage/3"``."""
    return "/".join(["sentinel", str(run_id), *(str(p) for p in parts)])


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively: hivemind's serializer would turn tuples into an ext type."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def make_value(kind: str, key: str, run: str, **fields: Any) -> dict:
    """Record payload ``{"kind", "key", "run", **fields}``, checked locally against its schema.

    Checking here turns a bug on our side into an exception at the call site instead of a store
    that every peer silently refuses.
    """
    value = _plain({**fields, "kind": kind, "key": key, "run": run})
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise UnknownRecordError(f"no schema registered for record kind {kind!r}")
    schema(value)
    return value


def _decode_subkey(subkey: bytes) -> str | None:
    try:
        peer_id = msgpack.unpackb(subkey, raw=False)
    except Exception:
        return None
    return peer_id if isinstance(peer_id, str) else None


def _signed_digest(record: DHTRecord, inner: bytes) -> bytes:
    h = hashlib.blake2b(_SIGNATURE_TAG, digest_size=32)
    for part in (record.key, record.subkey, inner):
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    h.update(struct.pack(">d", record.expiration_time))
    return h.digest()


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class SentinelRecordValidator(RecordValidatorBase):
    """Owner signatures + key binding + per-kind schema for every Sentinel DHT record.

    ``identity`` may be None for a read-only node (it can validate but never sign). With ``run_id``
    set, records of other runs are refused. ``validate`` never raises: hivemind calls it on
    untrusted input inside its RPC handlers.
    """

    def __init__(self, identity: Identity | None, run_id: str | None = None, max_value_bytes: int = 1 << 20):
        self.identity = identity
        self.run_id = run_id
        self.max_value_bytes = max_value_bytes

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.identity is None or _decode_subkey(record.subkey) != self.identity.peer_id:
            return record.value  # not ours to sign: it will be refused everywhere, by design
        signature = self.identity.sign(_signed_digest(record, record.value))
        return msgpack.packb([record.value, signature], use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        try:
            self._validate(record)
        except _Reject as e:
            self._reject(e.reason, str(e), record)
            return False
        except ProtocolError as e:
            self._reject(e.reason, str(e), record)
            return False
        except Exception as e:  # a validator must never crash the DHT on hostile input
            self._reject("malformed", f"{type(e).__name__}: {e}", record)
            return False
        return True

    def _reject(self, reason: str, detail: str, record: DHTRecord) -> None:
        METRICS.inc("sentinel_rejected_records_total", reason=reason)
        logger.debug("rejected DHT record (%s): %s; subkey=%r", reason, detail, record.subkey[:64])

    def _validate(self, record: DHTRecord) -> None:
        if len(record.value) > self.max_value_bytes + 128:
            raise _Reject("oversized", f"value of {len(record.value)} bytes > {self.max_value_bytes}")
        peer_id = _decode_subkey(record.subkey)
        if peer_id is None:
            raise _Reject("wrong_sender", "subkey is not an owner peer id")
        public_key = public_key_from_peer_id(peer_id)  # WrongSenderError for non-Ed25519 ids
        try:
            signed = msgpack.unpackb(record.value, raw=False)
        except Exception:
            raise _Reject("unsigned", "value is not a signed Sentinel record") from None
        if not (isinstance(signed, list) and len(signed) == 2 and all(isinstance(x, bytes) for x in signed)):
            raise _Reject("unsigned", "value is not a signed Sentinel record")
        inner, signature = signed
        if len(inner) > self.max_value_bytes:
            raise _Reject("oversized", f"value of {len(inner)} bytes > {self.max_value_bytes}")
        try:
            public_key.verify(signature, _signed_digest(record, inner))
        except Exception:
            raise _Reject("forged_signature", f"signature is not by the subkey owner {peer_id}") from None
        value = msgpack.unpackb(inner, raw=False)
        if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
            raise _Reject("malformed", "record value must be a dict with a 'kind'")
        key = value.get("key")
        if not isinstance(key, str) or DHTID.generate(source=key).to_bytes() != record.key:
            raise _Reject("wrong_key", "record's 'key' field does not match the DHT key it is stored under")
        if self.run_id is not None and value.get("run") != self.run_id:
            raise _Reject("wrong_run", f"record is for run {value.get('run')!r:.60}, not {self.run_id!r}")
        schema = SCHEMAS.get(value["kind"])
        if schema is None:
            raise UnknownRecordError(f"unknown record kind {value['kind']!r:.60}")
        schema(value)

    def strip_value(self, record: DHTRecord) -> bytes:
        try:
            signed = msgpack.unpackb(record.value, raw=False)
        except Exception:
            return record.value
        if isinstance(signed, list) and len(signed) == 2 and isinstance(signed[0], bytes):
            return signed[0]
        return record.value

    @property
    def priority(self) -> int:
        return 10  # validated first, before any validator that deserialises the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # Two Sentinel validators in one DHT would only repeat the same checks: keep the first.
        return isinstance(other, SentinelRecordValidator)
