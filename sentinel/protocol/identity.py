"""Node identity: one Ed25519 key that is both the libp2p identity and the message-signing key.

Because the libp2p PeerID of an Ed25519 key *embeds* the public key (identity multihash), any peer
can verify a signature knowing only the sender's PeerID: no key directory, no extra round trip.
And because p2pd is started with the same key (``-id`` file), a peer cannot claim a PeerID on the
transport and sign with another key.

File format: the libp2p ``PrivateKey`` protobuf that p2pd reads with ``-id``::

    field 1 (varint) KeyType = 1 (Ed25519)
    field 2 (bytes)  Data    = 32-byte seed || 32-byte public key

Encoded by hand (two fields) so that this module imports neither protobuf nor hivemind: the CLI
imports it and ``import hivemind`` costs seconds.

Gotcha for callers of ``hivemind.P2P.create(identity_path=..., initial_peers=[...])``: hivemind's
``PeerID.from_identity`` only understands RSA keys, and its default ``check_if_identity_free=True``
calls it before starting the daemon when bootstrap peers are given. Pass
``check_if_identity_free=False`` with Sentinel identities.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sentinel.protocol.errors import IdentityError, WrongSenderError

__all__ = ["Identity", "public_key_from_peer_id", "verify_signature", "peer_id_from_public_key"]

_KEY_TYPE_ED25519 = 1
# PublicKey protobuf header: field 1 varint = 1 (Ed25519), field 2 length-delimited, 32 bytes.
_PUBLIC_KEY_PROTO_PREFIX = b"\x08\x01\x12\x20"
# Identity multihash: code 0x00, length 0x24 (= 36 bytes of PublicKey protobuf).
_PEER_ID_PREFIX = b"\x00\x24" + _PUBLIC_KEY_PROTO_PREFIX
_PEER_ID_LEN = len(_PEER_ID_PREFIX) + 32
_MAX_IDENTITY_FILE_BYTES = 4096


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _encode_private_key(seed: bytes, public: bytes) -> bytes:
    data = seed + public
    return bytes([0x08, _KEY_TYPE_ED25519, 0x12, len(data)]) + data


def _decode_private_key(blob: bytes) -> tuple[int, bytes]:
    """Parse a libp2p PrivateKey protobuf into (key_type, data); tolerant of field order."""
    key_type, data, pos = None, None, 0
    while pos < len(blob):
        tag, pos = _read_varint(blob, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(blob, pos)
            if field == 1:
                key_type = value
        elif wire_type == 2:
            length, pos = _read_varint(blob, pos)
            if pos + length > len(blob):
                raise ValueError("truncated bytes field")
            if field == 2:
                data = blob[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    if key_type is None or data is None:
        raise ValueError("missing key type or key data")
    return key_type, data


def peer_id_from_public_key(public_key_bytes: bytes) -> bytes:
    """Binary libp2p PeerID (identity multihash) of a raw 32-byte Ed25519 public key."""
    if len(public_key_bytes) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _PEER_ID_PREFIX + public_key_bytes


class Identity:
    """An Ed25519 key pair with its libp2p PeerID. Create with generate(), load() or load_or_create()."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self._public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id_bytes = peer_id_from_public_key(self._public_bytes)
        self._peer_id = base58.b58encode(self._peer_id_bytes).decode("ascii")

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, blob: bytes) -> Identity:
        """Parse the contents of a libp2p Ed25519 identity file (raises IdentityError)."""
        try:
            key_type, data = _decode_private_key(blob)
        except ValueError as e:
            raise IdentityError(f"not a libp2p private key file ({e})") from None
        if key_type != _KEY_TYPE_ED25519:
            raise IdentityError(
                f"identity key type is {key_type}, Sentinel needs an Ed25519 key (type 1); "
                "hivemind's default identities are RSA: delete the file to let Sentinel generate one"
            )
        # go-libp2p writes seed||pub (64 bytes); very old versions appended the public key twice.
        if len(data) not in (64, 96) or (len(data) == 96 and data[64:] != data[32:64]):
            raise IdentityError(f"Ed25519 key data has {len(data)} bytes, expected 64 (seed + public key)")
        identity = cls(Ed25519PrivateKey.from_private_bytes(data[:32]))
        if identity.public_key_bytes != data[32:64]:
            raise IdentityError("identity file is corrupt: its public key does not match its private key")
        return identity

    def to_bytes(self) -> bytes:
        """The libp2p PrivateKey protobuf (what p2pd reads with -id). Secret: handle with care."""
        seed = self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return _encode_private_key(seed, self._public_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                blob = f.read(_MAX_IDENTITY_FILE_BYTES + 1)
        except FileNotFoundError:
            raise IdentityError(f"identity file {path} does not exist") from None
        except PermissionError:
            raise IdentityError(
                f"identity file {path} is not readable by this user: fix with `chmod 600 {path}` "
                "(as its owner), or point --identity-path to a new file"
            ) from None
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror or e}") from None
        if len(blob) > _MAX_IDENTITY_FILE_BYTES:
            raise IdentityError(f"identity file {path} is too large to be a libp2p private key")
        try:
            return cls.from_bytes(blob)
        except IdentityError as e:
            raise IdentityError(f"identity file {path}: {e}") from None

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at ``path``, or create it (mode 0o600) on first run. Parent dirs are not created.

        Creation is exclusive (hard link of a complete temp file): two processes starting at once
        with the same path end up with the same identity instead of the last writer winning.
        """
        if os.path.lexists(path):
            return cls.load(path)
        identity = cls.generate()
        if not identity._write(Path(path), overwrite=False):
            return cls.load(path)  # somebody created it between our check and our write
        return identity

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> None:
        """Write the key atomically with mode 0o600 (temp file + rename: a crash leaves no half key)."""
        if not self._write(Path(path), overwrite=overwrite):
            raise IdentityError(f"identity file {path} already exists; refusing to overwrite it")

    def _write(self, path: Path, *, overwrite: bool) -> bool:
        """Write via a complete temp file; returns False if ``path`` exists and overwrite is off."""
        directory = path.parent
        if not directory.is_dir():
            raise IdentityError(f"cannot save identity to {path}: directory {directory} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)  # mkstemp uses 0o600
        except OSError as e:
            raise IdentityError(f"cannot save identity to {path}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            if overwrite:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # atomic and exclusive: fails if path exists
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise IdentityError(f"cannot save identity to {path}: {e.strerror or e}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    @property
    def peer_id(self) -> str:
        """base58btc PeerID, starts with '12D3KooW'; equals the p2pd daemon's PeerID."""
        return self._peer_id

    @property
    def peer_id_bytes(self) -> bytes:
        return self._peer_id_bytes

    @property
    def public_key_bytes(self) -> bytes:
        return self._public_bytes

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of ``data`` (sign digests, not bulk payloads)."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self._peer_id})"


@functools.lru_cache(maxsize=8192)
def _public_key_cached(peer_id: str | bytes) -> Ed25519PublicKey:
    if isinstance(peer_id, str):
        try:
            raw = base58.b58decode(peer_id)
        except ValueError:
            raise WrongSenderError(f"sender {peer_id[:64]!r} is not a base58 peer id") from None
    else:
        raw = peer_id
    if len(raw) != _PEER_ID_LEN or not raw.startswith(_PEER_ID_PREFIX):
        raise WrongSenderError(
            f"sender {str(peer_id)[:64]!r} is not an Ed25519 libp2p peer id (must start with 12D3KooW)"
        )
    return Ed25519PublicKey.from_public_bytes(raw[len(_PEER_ID_PREFIX) :])


def public_key_from_peer_id(peer_id: str | bytes) -> Ed25519PublicKey:
    """Recover the Ed25519 public key embedded in a PeerID (base58 text or binary).

    Cached: verification on the hot path sees the same few senders over and over.
    Raises WrongSenderError for anything that is not an Ed25519 identity-multihash PeerID.
    """
    if not isinstance(peer_id, (str, bytes)):
        raise WrongSenderError(f"sender must be a peer id string, got {type(peer_id).__name__}")
    return _public_key_cached(peer_id)


def verify_signature(peer_id: str | bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is the key of ``peer_id`` signing ``data``.

    A malformed peer id is not "a wrong signature": it raises WrongSenderError.
    """
    key = public_key_from_peer_id(peer_id)
    try:
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True
