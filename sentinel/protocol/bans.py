"""Committee membership and ban votes over the DHT (the network side of bans).

- Verifier candidates announce themselves (``verifiers`` key, own subkey, signed). The committee
  is elected deterministically from the stamped announcements (rendezvous hashing of run, epoch,
  peer id and the candidate's proof-of-work stamp) unless the manifest pins it (trusted mode).
- A verifier whose own strike ledger bans a worker publishes a signed ``ban_vote`` record under
  ``ban/<worker>`` carrying the evidence: the worker-signed digests and signatures of the flagged
  messages, the flagged tensors' statistics and the fences used.
- Other members re-score that evidence against their OWN reference and fences; they endorse
  (vote too) only if it is anomalous to them as well and they have seen the worker flagged
  themselves. A ban takes effect with a strict majority of the committee's configured seats
  (not of the members that happen to be online), so a malicious minority can neither ban an
  honest worker, even once the honest members have left, nor, by withholding votes, shield an
  attacker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sentinel.protocol.committee import ban_quorum, configured_seats, elect_committee

logger = logging.getLogger(__name__)

MAX_EVIDENCE = 4  # flagged messages carried per vote


def committee_bans(verifier_records: dict[str, Any], seats: int, trusted: list[str] | None = None) -> set[str]:
    """Workers listed as banned by a strict majority of ``seats`` distinct verifiers
    (:func:`~sentinel.protocol.committee.configured_seats`).

    What a *worker* uses to leave banned replicas out of its stage's averaging: each verifier's
    signed record lists the bans effective in its own view (already committee-quorum decisions),
    and requiring a majority of the configured seats to agree means a byzantine minority of
    verifiers cannot cut an honest worker out of averaging. Records of verifiers that went
    offline still count (a ban does not lapse when the verifiers that decided it leave). In
    trusted mode only the pinned verifiers' records count.
    """
    counts: dict[str, int] = {}
    allowed = set(trusted) if trusted else None
    for peer, value in verifier_records.items():
        if allowed is not None and peer not in allowed:
            continue
        listed = value.get("banned") if isinstance(value, dict) else None
        if not isinstance(listed, list):
            continue
        for target in {t for t in listed if isinstance(t, str)}:
            counts[target] = counts.get(target, 0) + 1
    return {t for t, c in counts.items() if 2 * c > max(1, seats)}


@dataclass
class BanRecord:
    peer: str
    stage: int
    step: int
    votes: list[str]
    reasons: list[str] = field(default_factory=list)


@dataclass
class BanBook:
    """What this verifier knows and has said about bans."""

    run: str
    peer_id: str
    committee_size: int
    trusted: list[str] = field(default_factory=list)
    committee: list[str] = field(default_factory=list)
    my_votes: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> vote payload fields
    effective: dict[str, BanRecord] = field(default_factory=dict)
    accused: set[str] = field(default_factory=set)  # targets anyone in the committee voted against

    def elect(self, candidates: list[str] | dict[str, int], epoch: int = 0) -> list[str]:
        """Pinned committee in trusted mode, else the election over ``candidates`` (peer ids, or
        ``peer -> stamp`` for stamped candidacies, ``sentinel.protocol.stamps``)."""
        if self.trusted:
            self.committee = list(self.trusted)
        else:
            self.committee = elect_committee(self.run, epoch, candidates, self.committee_size)
        return self.committee

    @property
    def seats(self) -> int:
        """The committee's configured size (the pinned list in trusted mode): a majority is
        always counted over at least this many seats, however many members are online."""
        return configured_seats(self.committee_size, self.trusted)

    def vote(self, target: str, stage: int, direction: str, step: int, evidence: list[dict[str, Any]]) -> None:
        self.my_votes[target] = {"target": target, "stage": stage, "direction": direction, "step": step,
                                 "evidence": evidence[-MAX_EVIDENCE:]}

    def tally(self, target: str, votes: dict[str, dict[str, Any]], step: int) -> BanRecord | None:
        """Record a ban once a committee majority's signed votes for ``target`` are in."""
        yes = {v: True for v, p in votes.items() if p.get("target") == target and p.get("run") == self.run}
        if target in self.effective:
            return self.effective[target]
        if not self.committee or not ban_quorum(yes, self.committee, self.seats):
            return None
        voters = sorted(v for v in yes if v in self.committee)
        first = next(iter(votes.values()))
        rec = BanRecord(peer=target, stage=int(first.get("stage", -1)), step=step, votes=voters,
                        reasons=sorted({r for p in votes.values() for e in p.get("evidence", [])
                                        for r in e.get("reasons", [])}))
        self.effective[target] = rec
        logger.info("ban of %s effective at step %d with votes of %s", target[-8:], step, [v[-6:] for v in voters])
        return rec
