"""Candidacy stamps: the work that makes a flood of verifier announcements cost its size.

In open mode (no ``trusted_verifiers`` in the manifest) the committee is elected from whoever
announces a verifier record, and peer ids cost nothing. Without a price, an attacker generates
keys until its own hold the heaviest rendezvous weights and owns every seat within a fraction of a
second (BENCHMARKS.md, "Committee capture"). A stamp puts a price on each candidacy, in the style
of S/Kademlia's crypto puzzles and hashcash:

- a stamp for ``(run, peer)`` is a nonce whose BLAKE2b digest with the run id and the peer id has
  at least ``bits`` leading zero bits; finding one takes ``2**bits`` hashes on average, checking
  it one hash;
- only stamped candidates are elected, and the election weight hashes the stamp too
  (:func:`sentinel.protocol.committee.elect_committee`), so every *draw* of a weight costs a new
  stamp: grinding for heavy weights is no longer one hash per key but ``2**bits`` per try.

This rate-limits, it does not prevent: owning the committee against N honest candidates still
takes about ``seats * (N + 1)`` stamps, i.e. that many times the work one honest verifier does
once per run. A swarm that cannot afford to lose its committee pins it (trusted mode).
Pure hashing, no network imports: the verifier and the worker check stamps the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

PERSON = b"sentinel-stamp"
MAX_NONCE = 2**63 - 1


def _prefix(run_id: str, peer: str) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=32, person=PERSON)
    for part in (run_id.encode(), peer.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h


def _leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def stamp_ok(run_id: str, peer: str, nonce: Any, bits: int) -> bool:
    """True iff ``nonce`` is a valid stamp of ``bits`` for ``peer`` in ``run_id``.

    Anything that is not a plain int in ``[0, 2**63)`` is invalid, never an exception: the nonce
    comes from a DHT record anyone can write.
    """
    if bits <= 0:
        return True
    if isinstance(nonce, bool) or not isinstance(nonce, int) or not 0 <= nonce <= MAX_NONCE:
        return False
    h = _prefix(run_id, peer)
    h.update(nonce.to_bytes(8, "big"))
    return _leading_zero_bits(h.digest()) >= bits


def solve_stamp(run_id: str, peer: str, bits: int, start: int = 0) -> int:
    """The first valid nonce at or after ``start`` (``2**bits`` hashes expected; ~0.3 us each here)."""
    if bits <= 0:
        return start
    if bits > 64:
        raise ValueError(f"stamp bits must be <= 64, got {bits}")
    base = _prefix(run_id, peer)
    shift = 256 - bits  # digest < 2**shift  <=>  at least ``bits`` leading zeros
    bound = 1 << shift
    nonce = start
    while nonce <= MAX_NONCE:
        h = base.copy()
        h.update(nonce.to_bytes(8, "big"))
        if int.from_bytes(h.digest(), "big") < bound:
            return nonce
        nonce += 1
    raise ValueError("no stamp found below 2**63")  # unreachable in practice (p ~ 0)


def stamped_candidates(run_id: str, records: dict[str, Any], bits: int,
                       states: tuple[str, ...] = ("ONLINE", "JOINING")) -> tuple[dict[str, int], list[str]]:
    """Split verifier records into ``({peer: stamp}, [refused peers])``.

    A record counts as a candidate when it is for this run, in one of ``states``, and carries a
    valid stamp (any stamp is valid when ``bits`` is 0). Records in other states are neither.
    """
    admitted: dict[str, int] = {}
    refused: list[str] = []
    for peer, value in records.items():
        if not isinstance(value, dict) or value.get("run") != run_id or value.get("state") not in states:
            continue
        nonce = value.get("stamp", 0 if bits <= 0 else None)
        if stamp_ok(run_id, peer, nonce, bits):
            admitted[peer] = int(nonce) if isinstance(nonce, int) else 0
        else:
            refused.append(peer)
    return admitted, refused
