"""Committee election and ban quorum: pure decisions on plain data (no DHT, no clocks).

Election is rendezvous (highest-random-weight) hashing: every candidate gets the weight
``BLAKE2b(run_id, epoch, peer, stamp)`` and the ``size`` heaviest form the committee. The stamp
is the candidate's proof of work (``sentinel.protocol.stamps``): hashing it into the weight means
a new draw of the weight costs a new stamp, so grinding keys for heavy weights is priced. Every verifier that
sees the same candidate set computes the same committee with no coordination; the input order
does not matter; a candidate leaving changes the committee only if it was a member (it is
replaced by the next heaviest), and a new epoch reshuffles it. Fields are length-prefixed so
("ab", "c") and ("a", "bc") cannot collide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def _weight(run_id: str, epoch: int, peer: str, stamp: int = 0) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"sentinel-cmte")
    for part in (run_id.encode(), str(int(epoch)).encode(), peer.encode(), str(int(stamp)).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def elect_committee(run_id: str, epoch: int, candidates: Sequence[str] | Mapping[str, int],
                    size: int) -> list[str]:
    """The ``size`` candidates with the highest rendezvous weight, heaviest first.

    ``candidates`` is a sequence of peer ids (stamp 0 each) or a mapping ``peer -> stamp``.
    """
    if size < 0:
        raise ValueError(f"committee size must be >= 0, got {size}")
    stamps = dict(candidates) if isinstance(candidates, Mapping) else dict.fromkeys(candidates, 0)
    ranked = sorted(stamps, key=lambda p: (_weight(run_id, epoch, p, stamps[p]), p), reverse=True)
    return ranked[:size]


def configured_seats(committee_size: int, trusted: Sequence[str] = ()) -> int:
    """Seats of the committee a ban majority is counted over: the pinned list in trusted mode,
    else the manifest's ``committee_size`` (however many members happen to be online)."""
    return len(trusted) if trusted else committee_size


def ban_quorum(votes: Mapping[str, bool], committee: Sequence[str], seats: int = 0) -> bool:
    """True iff a strict majority OF THE COMMITTEE voted to ban (non-members' votes ignored).

    Abstentions count against: a minority of malicious members can neither ban an honest worker
    nor, by staying silent, block a ban the honest majority agrees on. ``seats`` is the size
    the committee is configured to have: the majority is counted over ``max(seats,
    len(committee))``, so a committee that shrank because honest members went offline (or were
    never there) does not let the remaining minority pass for a majority: otherwise, once two
    honest verifiers finish their run, a byzantine third is the whole committee it can still see
    and bans an honest worker with its own vote.
    """
    members = set(committee)
    if not members:
        return False
    yes = sum(1 for m in members if votes.get(m) is True)
    return 2 * yes > max(len(members), seats)
