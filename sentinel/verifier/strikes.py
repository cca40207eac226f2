"""Strike counting with linear forgiveness: the local ban decision of one verifier.

+1 strike per flagged message; each clean message forgives ``strike_limit / forgive_after``
strikes, so any count below the limit is wiped out by ``forgive_after`` clean messages in a
row, and an honest worker's rare false positives never add up; ``strike_limit`` flags in a row
(or close together) ban. A ban here is this verifier's *vote*; the swarm-wide ban needs a
committee quorum (``committee.ban_quorum``). Counting is exact: strikes are kept as integer units
of ``1 / forgive_after`` so forgiveness has no float drift.

The honest-majority bound lives here too, so the live verifier and the simulator apply the
same rule: a ban that would leave a stage with fewer than a majority of its replicas is *held*
(:func:`majority_allows_ban`). The threat model caps attackers at ``(replicas - 1) // 2`` per
stage, so a ban beyond that is evidence of a verifier fault or of a stage-wide shift the screens
misread, never of one more attacker; banning would take the stage's honest replicas with it and
hand the stage to whoever is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sentinel.run.screening import ScreeningConfig


def majority_allows_ban(replicas: int, banned: int) -> bool:
    """May one more replica of a stage with ``replicas`` members, ``banned`` of them banned, go?"""
    return banned + 1 <= (replicas - 1) // 2


@dataclass
class StrikeState:
    """One worker's standing. ``banned_now`` is True only on the message that caused the ban."""

    strikes: float = 0.0
    banned: bool = False
    banned_now: bool = False
    held: bool = False  # at the strike limit, but the ban would break its stage's honest majority
    clean_streak: int = 0
    flags: int = 0
    messages: int = 0


class StrikeLedger:
    """Strikes of every worker seen by one verifier.

    ``may_ban(worker)``, when given, is asked before a ban: False *holds* it (the worker stays at
    the limit, ``held`` is set, and its next flag asks again), which is how callers apply
    :func:`majority_allows_ban` with their own view of stage membership.
    """

    def __init__(self, strike_limit: int = ScreeningConfig.strike_limit,
                 forgive_after: int = ScreeningConfig.forgive_after,
                 may_ban: Callable[[str], bool] | None = None) -> None:
        if strike_limit < 1 or forgive_after < 1:
            raise ValueError("strike_limit and forgive_after must be >= 1")
        self.strike_limit = strike_limit
        self.forgive_after = forgive_after
        self.may_ban = may_ban
        self._units: dict[str, int] = {}
        self._states: dict[str, StrikeState] = {}

    def record(self, worker: str, flagged: bool, proven: bool = False) -> StrikeState:
        """Count one screened message of ``worker``; returns a copy of its new state. A
        ``proven`` flag (an exact disagreement with its stage's majority: no honest replica
        makes one) takes the worker to the strike limit at once; the honest-majority hold
        still applies."""
        st = self._states.setdefault(worker, StrikeState())
        units = self._units.get(worker, 0)
        st.messages += 1
        st.banned_now = False
        if flagged:
            st.flags += 1
            st.clean_streak = 0
            if not st.banned:
                units += self.forgive_after
                if proven:
                    units = max(units, self.strike_limit * self.forgive_after)
        else:
            st.clean_streak += 1
            if not st.banned:
                units = max(0, units - self.strike_limit)
        limit = self.strike_limit * self.forgive_after
        if not st.banned and units >= limit and (flagged or not st.held):
            if self.may_ban is None or self.may_ban(worker):
                st.banned = True
                st.banned_now = True
                st.held = False
            else:
                st.held = True
                units = limit
        if st.held and units < limit:
            st.held = False
        self._units[worker] = units
        st.strikes = units / self.forgive_after
        return StrikeState(**vars(st))

    def probation(self, worker: str, flags: int = 1) -> StrikeState:
        """Raise ``worker`` to one strike short of a ban (never lower it, never ban by itself).

        For evidence that cannot be confirmed but is not noise either: most of a worker's
        messages, re-scored once a calibration ended, were over the fences. ``flags`` such
        sightings are counted; the next confirmed flag bans, and ``forgive_after`` clean messages
        forgive it like any other strikes.
        """
        st = self._states.setdefault(worker, StrikeState())
        st.flags += max(0, int(flags))
        if not st.banned:
            units = max(self._units.get(worker, 0), (self.strike_limit - 1) * self.forgive_after)
            self._units[worker] = units
            st.strikes = units / self.forgive_after
        return StrikeState(**vars(st))

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Every worker's standing (with its exact units), for a verifier's journal."""
        return {w: {**vars(st), "units": self._units.get(w, 0)} for w, st in self._states.items()}

    def restore(self, snapshot: dict[str, dict[str, object]]) -> None:
        """Load what :meth:`snapshot` wrote; malformed entries are skipped, not trusted."""
        fields = set(vars(StrikeState()))
        for worker, d in snapshot.items():
            try:
                st = StrikeState(**{k: v for k, v in d.items() if k in fields})
                units = int(d.get("units", 0))
            except (TypeError, ValueError, AttributeError):
                continue
            st.banned_now = False
            self._states[str(worker)] = st
            self._units[str(worker)] = max(0, units)

    def is_banned(self, worker: str) -> bool:
        st = self._states.get(worker)
        return st is not None and st.banned

    def state(self, worker: str) -> StrikeState:
        st = self._states.get(worker)
        return StrikeState(**vars(st)) if st is not None else StrikeState()

    def banned(self) -> list[str]:
        return sorted(w for w, st in self._states.items() if st.banned)

    def struck(self, limit: int = 64) -> dict[str, int]:
        """Workers with strikes now (not banned), most strikes first, at most ``limit``: what the
        verifier publishes so a volunteer's node can show its own strikes."""
        live = [(w, st.strikes) for w, st in self._states.items() if st.strikes > 0 and not st.banned]
        live.sort(key=lambda item: (-item[1], item[0]))
        return dict(live[:limit])
