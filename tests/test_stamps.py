"""Candidacy stamps (``sentinel.protocol.stamps``): the proof of work an open-mode verifier
announcement must carry, and why grinding keys for election weight no longer comes free."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.protocol.committee import _weight, elect_committee
from sentinel.protocol.stamps import _leading_zero_bits, _prefix, solve_stamp, stamp_ok, stamped_candidates

RUN = "stamp-test"


def _digest(run: str, peer: str, nonce: int) -> bytes:
    h = _prefix(run, peer)
    h.update(nonce.to_bytes(8, "big"))
    return h.digest()


@settings(max_examples=40, deadline=None)
@given(peer=st.text(min_size=1, max_size=60), bits=st.integers(0, 12), start=st.integers(0, 2**40))
def test_a_solved_stamp_is_the_first_valid_nonce_and_has_its_bits(peer: str, bits: int, start: int) -> None:
    nonce = solve_stamp(RUN, peer, bits, start=start)
    assert nonce >= start and stamp_ok(RUN, peer, nonce, bits)
    if bits:
        assert _leading_zero_bits(_digest(RUN, peer, nonce)) >= bits
        # the search returns the FIRST one: every nonce it skipped really was invalid
        assert not any(stamp_ok(RUN, peer, n, bits) for n in range(start, min(nonce, start + 2000)))


def test_a_stamp_is_bound_to_its_peer_and_run() -> None:
    """A stamp found for one peer (or one run) is checked against the digest of another: over 200
    stamps of 16 bits, the chance that a transplanted one happens to be valid is 200 * 2**-16."""
    moved = 0
    for i in range(200):
        nonce = solve_stamp(RUN, f"peer-{i}", 16)
        moved += stamp_ok(RUN, f"peer-{i + 1}", nonce, 16) + stamp_ok("other-run", f"peer-{i}", nonce, 16)
    assert moved <= 1


@pytest.mark.parametrize("nonce", [None, "7", 7.0, True, -1, 2**63, 2**70, [1], {"n": 1}])
def test_anything_but_a_nonce_is_an_invalid_stamp_not_an_exception(nonce) -> None:
    assert stamp_ok(RUN, "peer", nonce, 4) is False


def test_leading_zero_bits_counts_from_the_top() -> None:
    assert _leading_zero_bits(b"\xff" + bytes(31)) == 0
    assert _leading_zero_bits(b"\x01" + bytes(31)) == 7
    assert _leading_zero_bits(bytes(2) + b"\x10" + bytes(29)) == 19
    assert _leading_zero_bits(bytes(32)) == 256


def test_candidates_are_split_by_stamp_run_and_state() -> None:
    good = solve_stamp(RUN, "good", 10)
    bad = next(n for n in range(10_000) if not stamp_ok(RUN, "bad", n, 10))
    records = {
        "good": {"run": RUN, "state": "ONLINE", "stamp": good},
        "bad": {"run": RUN, "state": "ONLINE", "stamp": bad},
        "none": {"run": RUN, "state": "JOINING"},
        "gone": {"run": RUN, "state": "OFFLINE", "stamp": good},
        "elsewhere": {"run": "other", "state": "ONLINE"},
        "junk": "not a record",
    }
    admitted, refused = stamped_candidates(RUN, records, 10)
    assert admitted == {"good": good} and sorted(refused) == ["bad", "none"]
    admitted, refused = stamped_candidates(RUN, records, 0)  # stamps off: every live candidacy counts
    assert sorted(admitted) == ["bad", "good", "none"] and refused == []


def test_keys_ground_for_free_weights_win_no_more_than_their_share_once_the_weight_hashes_the_stamp() -> None:
    """Why the election weight includes the stamp. Without it, an attacker grinds keys at one
    hash each until three outweigh every honest candidate, THEN pays for three stamps, and owns
    the committee. With it, the stamp re-draws the weight, so those ground keys are ordinary
    draws: over 300 elections (3 honest vs the 3 ground keys, 8-bit stamps) they own every seat
    without stamps in the weight and about half of them with stamps in it."""
    rng = random.Random(1234)
    owned_free = owned_stamped = 0
    trials = 300
    for _ in range(trials):
        honest = [f"h{rng.getrandbits(64):x}" for _ in range(3)]
        stamps = {p: solve_stamp(RUN, p, 8) for p in honest}
        bar = max(_weight(RUN, 0, p) for p in honest)
        sybils: list[str] = []
        while len(sybils) < 3:
            p = f"s{rng.getrandbits(64):x}"
            if _weight(RUN, 0, p) > bar:
                sybils.append(p)
        owned_free += len(set(elect_committee(RUN, 0, honest + sybils, 3)) & set(sybils))
        stamps |= {p: solve_stamp(RUN, p, 8) for p in sybils}
        owned_stamped += len(set(elect_committee(RUN, 0, stamps, 3)) & set(sybils))
    assert owned_free == 3 * trials
    share = owned_stamped / (3 * trials)
    assert 0.35 < share < 0.65, share  # 3 of 6 equally likely candidates: 0.5 (sd ~0.02 over 900 seats)


def test_the_election_weight_depends_on_the_stamp() -> None:
    weights = {_weight(RUN, 0, "peer", s) for s in range(50)}
    assert len(weights) == 50
    ranked = elect_committee(RUN, 0, {"a": 1, "b": 2, "c": 3}, 3)
    expected = sorted("abc", key=lambda p: _weight(RUN, 0, p, {"a": 1, "b": 2, "c": 3}[p]), reverse=True)
    assert ranked == expected
