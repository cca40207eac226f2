"""What a verifier-announcement flood buys in an open committee, and what it costs to count.

    python bench/committee_capture.py [--honest 3 10 30 100] [--trials 20] [--candidates 10000]

Open mode (no ``trusted_verifiers`` in the manifest) elects the committee by rendezvous hashing
over every announced verifier (``sentinel.verifier.committee``). Peer ids cost nothing, so an
attacker can generate keys until it holds the ``committee_size`` heaviest weights, announce
them, and own every seat: each new key beats all N honest candidates with probability 1/(N+1).
This script measures that grinding on this machine with real Ed25519 identities (keys tried and
seconds, per number of honest candidates), checks that the pinned committee of trusted mode is
unchanged by the same Sybil keys, and times one election over a flood of ``--candidates``
announcements (what every verifier pays per refresh once the records are in the DHT).
"""

from __future__ import annotations

import argparse
import statistics
import time

from sentinel.protocol.identity import Identity
from sentinel.verifier.bans import BanBook
from sentinel.verifier.committee import _weight, elect_committee

RUN = "capture-bench"


def grind(honest: list[str], seats: int, epoch: int = 0) -> tuple[list[str], int]:
    """Generate keys until ``seats`` of them outweigh every honest candidate; (keys, tried)."""
    bar = max(_weight(RUN, epoch, p) for p in honest)
    sybils: list[str] = []
    tried = 0
    while len(sybils) < seats:
        peer = Identity.generate().peer_id
        tried += 1
        if _weight(RUN, epoch, peer) > bar:
            sybils.append(peer)
    return sybils, tried


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--honest", type=int, nargs="+", default=[3, 10, 30, 100])
    ap.add_argument("--seats", type=int, default=3, help="committee_size")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10_000, help="flood size for the election timing")
    args = ap.parse_args()
    print(f"| honest candidates | keys tried to own {args.seats}/{args.seats} seats (median, max) | seconds (median) "
          f"| seats owned, open mode | seats owned, trusted mode |")
    print("|---|---|---|---|---|")
    for n in args.honest:
        tried, secs, open_owned, pinned_owned = [], [], [], []
        for _ in range(args.trials):
            honest = [Identity.generate().peer_id for _ in range(n)]
            t0 = time.perf_counter()
            sybils, k = grind(honest, args.seats)
            secs.append(time.perf_counter() - t0)
            tried.append(k)
            everyone = honest + sybils
            open_owned.append(len(set(elect_committee(RUN, 0, everyone, args.seats)) & set(sybils)))
            book = BanBook(RUN, honest[0], args.seats, trusted=honest[: args.seats])
            pinned_owned.append(len(set(book.elect(everyone)) & set(sybils)))
        print(f"| {n} | {statistics.median(tried):.0f}, {max(tried)} "
              f"| {statistics.median(secs):.4f} | {min(open_owned)}-{max(open_owned)} "
              f"| {min(pinned_owned)}-{max(pinned_owned)} |")
    flood = [Identity.generate().peer_id for _ in range(args.candidates)]
    t0 = time.perf_counter()
    elect_committee(RUN, 0, flood, args.seats)
    print(f"\none election over {args.candidates} announced candidates: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
