"""Identity: libp2p key file format, PeerID derivation, and agreement with a real p2pd daemon."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import base58
import pytest

from sentinel.protocol.errors import IdentityError, WrongSenderError
from sentinel.protocol.identity import Identity, public_key_from_peer_id, verify_signature


def test_generate_peer_id_embeds_public_key() -> None:
    identity = Identity.generate()
    assert identity.peer_id.startswith("12D3KooW")
    assert base58.b58decode(identity.peer_id) == identity.peer_id_bytes
    assert identity.peer_id_bytes == b"\x00\x24\x08\x01\x12\x20" + identity.public_key_bytes
    for form in (identity.peer_id, identity.peer_id_bytes):
        recovered = public_key_from_peer_id(form)
        assert recovered.public_bytes_raw() == identity.public_key_bytes


def test_sign_and_verify() -> None:
    a, b = Identity.generate(), Identity.generate()
    signature = a.sign(b"digest")
    assert len(signature) == 64
    assert verify_signature(a.peer_id, b"digest", signature)
    assert not verify_signature(a.peer_id, b"digesT", signature)
    assert not verify_signature(b.peer_id, b"digest", signature)
    assert not verify_signature(a.peer_id, b"digest", signature[:10])


@pytest.mark.parametrize(
    "peer_id",
    [
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # an RSA-style (sha256 multihash) peer id
        "not base58 0OIl",
        "",
        b"\x00\x24" + b"\x08\x00\x12\x20" + bytes(32),  # key type 0 (RSA)
        b"\x00\x24\x08\x01\x12\x20" + bytes(31),
    ],
)
def test_non_ed25519_peer_ids_are_wrong_sender(peer_id: str | bytes) -> None:
    with pytest.raises(WrongSenderError):
        public_key_from_peer_id(peer_id)
    with pytest.raises(WrongSenderError):
        verify_signature(peer_id, b"x", bytes(64))


def test_save_load_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    created = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == created.peer_id
    assert Identity.load(path).public_key_bytes == created.public_key_bytes
    blob = path.read_bytes()
    assert len(blob) == 68 and blob[:4] == b"\x08\x01\x12\x40"
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temp files left behind


def test_save_refuses_to_overwrite_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = Identity.generate()
    first.save(path, overwrite=False)
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path, overwrite=False)
    assert Identity.load(path).peer_id == first.peer_id
    second = Identity.generate()
    second.save(path)  # default: atomic replace
    assert Identity.load(path).peer_id == second.peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_file_matches_libp2p_protobuf_schema(tmp_path: Path) -> None:
    """Cross-check the hand-written encoding with libp2p's own protobuf definitions (shipped in hivemind)."""
    from hivemind.proto import crypto_pb2

    identity = Identity.generate()
    parsed = crypto_pb2.PrivateKey.FromString(identity.to_bytes())
    assert parsed.key_type == crypto_pb2.Ed25519 and parsed.data[32:] == identity.public_key_bytes
    public = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=identity.public_key_bytes)
    assert b"\x00\x24" + public.SerializeToString() == identity.peer_id_bytes
    # and a file written by protobuf (other field layout choices) loads back
    assert Identity.from_bytes(parsed.SerializeToString()).peer_id == identity.peer_id


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage that is not protobuf \xff\xff\xff",
        b"\x08\x00\x12\x04abcd",  # RSA key type
        b"\x08\x01\x12\x10" + bytes(16),  # wrong length
        b"\x08\x01\x12\x40" + bytes(64),  # public half does not match the seed
        b"\x08\x01\x12\x40" + bytes(10),  # truncated
    ],
)
def test_corrupt_identity_files(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(blob)
    with pytest.raises(IdentityError, match="bad.key"):
        Identity.load(path)
    with pytest.raises(IdentityError):
        Identity.load_or_create(path)  # never silently replaced
    assert path.read_bytes() == blob


def test_missing_directory_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load_or_create(tmp_path / "no" / "such" / "dir.key")
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "absent.key")
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(IdentityError, match="dir.key"):
        Identity.load_or_create(tmp_path / "dir.key")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_gives_actionable_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.key"
    Identity.generate().save(path)
    path.chmod(0)
    try:
        with pytest.raises(IdentityError, match="chmod 600"):
            Identity.load_or_create(path)
    finally:
        path.chmod(0o600)


def test_identity_module_does_not_import_hivemind_or_torch() -> None:
    code = "import sys, sentinel.protocol.identity; print('hivemind' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_p2pd_daemon_adopts_the_identity(tmp_path: Path) -> None:
    """The daemon started with our key file reports exactly our PeerID: PeerID == signing key."""
    from hivemind.p2p import P2P

    path = tmp_path / "p2p.key"
    identity = Identity.load_or_create(path)

    async def main() -> str:
        p2p = await P2P.create(
            identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=60
        )
        try:
            return p2p.peer_id.to_base58()
        finally:
            await p2p.shutdown()

    assert asyncio.run(main()) == identity.peer_id
