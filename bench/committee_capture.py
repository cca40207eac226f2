"""What a verifier-announcement flood buys in an open committee, with and without stamps.

    python bench/committee_capture.py [--honest 3 10 30 100] [--trials 20] [--grind-bits 12]
                                      [--stamp-bits 12 16 20 22 24] [--candidates 10000]

Open mode (no ``trusted_verifiers`` in the manifest) elects the committee by rendezvous hashing
over the announced verifiers (``sentinel.protocol.committee``). Peer ids cost nothing, so with
stamps off an attacker generates keys until its own hold the ``committee_size`` heaviest weights
and owns every seat: each new key beats all N honest candidates with probability 1/(N+1). With
stamps (``sentinel.protocol.stamps``) each candidacy carries a proof of work that is hashed into
its weight, so every draw of a weight costs one stamp.

This script measures, per number of honest candidates and with real Ed25519 identities:
1. the grind with stamps off (keys tried, seconds) and that the pinned committee of trusted mode
   is unchanged by the same keys;
2. the same grind with stamps on at ``--grind-bits`` (stamps solved, seconds), for real;
3. the time of one stamp at each of ``--stamp-bits`` (what one honest verifier pays once per
   run), and from it the projected capture cost at those bits: the number of draws a capture
   needs does not depend on the bits (each draw is an independent uniform weight either way),
   only the price of a draw does;
4. one election over a flood of ``--candidates`` announcements.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sentinel.protocol.bans import BanBook
from sentinel.protocol.committee import _weight, elect_committee
from sentinel.protocol.identity import Identity
from sentinel.protocol.stamps import solve_stamp

RUN = "capture-bench"


def grind(honest: dict[str, int], seats: int, bits: int) -> tuple[dict[str, int], int]:
    """Draw (key, stamp) pairs until ``seats`` outweigh every honest candidate; (sybils, draws)."""
    bar = max(_weight(RUN, 0, p, s) for p, s in honest.items())
    sybils: dict[str, int] = {}
    tried = 0
    while len(sybils) < seats:
        peer = Identity.generate().peer_id
        stamp = solve_stamp(RUN, peer, bits)
        tried += 1
        if _weight(RUN, 0, peer, stamp) > bar:
            sybils[peer] = stamp
    return sybils, tried


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--honest", type=int, nargs="+", default=[3, 10, 30, 100])
    ap.add_argument("--seats", type=int, default=3, help="committee_size")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--grind-bits", type=int, default=12, help="stamp bits of the real stamped grind")
    ap.add_argument("--stamp-bits", type=int, nargs="+", default=[12, 16, 20, 22, 24])
    ap.add_argument("--stamp-samples", type=int, default=10, help="stamps timed per bit level")
    ap.add_argument("--candidates", type=int, default=10_000, help="flood size for the election timing")
    args = ap.parse_args()

    print(f"| honest candidates | stamps off: keys to own {args.seats}/{args.seats} seats, median (max) | seconds, "
          f"median | seats owned, open / trusted mode | {args.grind_bits}-bit stamps: stamps to own "
          f"{args.seats}/{args.seats}, median (max) | seconds, median |")
    print("|---|---|---|---|---|---|")
    draws: dict[int, float] = {}
    for n in args.honest:
        tried, secs, open_owned, pinned_owned, s_tried, s_secs = [], [], [], [], [], []
        for _ in range(args.trials):
            honest = {Identity.generate().peer_id: 0 for _ in range(n)}
            t0 = time.perf_counter()
            sybils, k = grind(honest, args.seats, 0)
            secs.append(time.perf_counter() - t0)
            tried.append(k)
            everyone = list(honest) + list(sybils)
            open_owned.append(len(set(elect_committee(RUN, 0, everyone, args.seats)) & set(sybils)))
            trusted = list(honest)[: args.seats]
            book = BanBook(RUN, trusted[0], args.seats, trusted=trusted)
            pinned_owned.append(len(set(book.elect(everyone)) & set(sybils)))

            stamped = {p: solve_stamp(RUN, p, args.grind_bits) for p in honest}
            t0 = time.perf_counter()
            sybils, k = grind(stamped, args.seats, args.grind_bits)
            s_secs.append(time.perf_counter() - t0)
            s_tried.append(k)
            assert set(elect_committee(RUN, 0, stamped | sybils, args.seats)) == set(sybils)
        draws[n] = statistics.median(s_tried)
        print(f"| {n} | {statistics.median(tried):.0f} ({max(tried)}) | {statistics.median(secs):.4f} "
              f"| {min(open_owned)}-{max(open_owned)} / {min(pinned_owned)}-{max(pinned_owned)} "
              f"| {statistics.median(s_tried):.0f} ({max(s_tried)}) | {statistics.median(s_secs):.2f} |")

    print(f"\n| stamp bits | one stamp (an honest verifier's cost per run), mean s of {args.stamp_samples} | "
          + " | ".join(f"projected capture vs {n} honest" for n in args.honest) + " |")
    print("|---|---|" + "---|" * len(args.honest))
    for bits in args.stamp_bits:
        t0 = time.perf_counter()
        for i in range(args.stamp_samples):
            solve_stamp(RUN, f"timing-{bits}-{i}", bits)
        mean = (time.perf_counter() - t0) / args.stamp_samples
        cells = " | ".join(f"{draws[n] * mean:,.1f} s" for n in args.honest)
        print(f"| {bits} | {mean:.3f} | {cells} |")

    flood = {Identity.generate().peer_id: 0 for _ in range(args.candidates)}
    t0 = time.perf_counter()
    elect_committee(RUN, 0, flood, args.seats)
    print(f"\none election over {args.candidates} announced candidates: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
