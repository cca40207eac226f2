"""The swarm as the monitor shows it: DHT records in, one JSON-able state dict out.

Why a separate module with a pure core: the records arrive from untrusted peers (signed and
schema-checked by the DHT validator, but with any values their owners chose), nodes come and go,
and a DHT lookup can fail for a beat. All of that is decided here on plain data, so it is tested
without a network:

- :class:`SwarmRecords` is one poll of the DHT (stage claims, verifier records, progress records,
  ban votes); :func:`poll_records` fills it from a :class:`~sentinel.net.runtime.SwarmRuntime`.
- :class:`SwarmMemory` remembers what was seen and when. A record disappears from the DHT when its
  owner stops re-announcing it (it crashed or was cut off), so absence alone says "stale", while an
  explicit OFFLINE says "left". The memory keeps a vanished node for ``forget_after_s`` and marks
  it STALE (or OFFLINE if that was its last word), and keeps the loss history of verifiers that
  already finished, so the curve outlives the run's last progress record.
- :func:`build_state` turns memory + records into the dict served on ``/api/state``;
  :func:`swarm_gauges` turns that dict into the swarm-level Prometheus series of ``/metrics``.

Display states of a worker: ONLINE, JOINING, OFFLINE (said so itself), STALE (its record expired
or is older than ``stale_after_s``), BANNED (a committee quorum banned it; overrides the rest).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sentinel.protocol.keys import ban_key, progress_key, stage_key, verifiers_key

__all__ = [
    "WORKER_STATES",
    "VERIFIER_STATES",
    "SwarmRecords",
    "SwarmMemory",
    "poll_records",
    "build_state",
    "swarm_gauges",
]

WORKER_STATES = ("ONLINE", "JOINING", "OFFLINE", "STALE", "BANNED")
VERIFIER_STATES = ("ONLINE", "JOINING", "DONE", "OFFLINE", "STALE")
MAX_CURVE_POINTS = 2000  # per curve sent to the page; longer histories are thinned evenly
MAX_BAN_TARGETS = 32  # ban-vote keys read per poll (each is one DHT lookup)
MAX_HISTORY = 20000  # loss points remembered per verifier


class RecordSource(Protocol):
    """What the collector needs from a node runtime (a fake in tests)."""

    async def get(self, key: str) -> dict[str, dict[str, Any]]: ...


@dataclass
class SwarmRecords:
    """One poll of the DHT: owner peer id -> payload, as the record validator accepted them."""

    claims: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    verifiers: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    ban_votes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # target -> voter -> vote


# -- small validators: records are signed by their owner, but the owner may be hostile -----------
def _num(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def _int(value: Any, default: int = 0) -> int:
    v = _num(value)
    return int(v) if v is not None else default


def _str_list(value: Any, limit: int = 256) -> list[str]:
    if not isinstance(value, (list, tuple)):
        return []
    return [v for v in value[:limit] if isinstance(v, str)]


def _points(value: Any) -> list[tuple[int, float]]:
    """[[step, loss], ...] -> [(step, loss)], dropping anything malformed or non-finite."""
    out = []
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                step, loss = _num(item[0]), _num(item[1])
                if step is not None and loss is not None and step >= 0:
                    out.append((int(step), loss))
    return out


def short_id(peer: str) -> str:
    """Peer ids all start with the same multihash prefix; their tail tells them apart."""
    return peer[-6:]


# -- polling -------------------------------------------------------------------------------------
async def poll_records(source: RecordSource, run: str, num_stages: int,
                       known_targets: Iterable[str] = ()) -> SwarmRecords:
    """Read every key the monitor shows, concurrently. A failed lookup reads as no records."""
    claim_keys = [stage_key(run, s) for s in range(num_stages)]
    found = await asyncio.gather(*(source.get(k) for k in claim_keys),
                                 source.get(verifiers_key(run)), source.get(progress_key(run)))
    claims = {s: {p: v for p, v in recs.items() if v.get("stage") == s and v.get("run") == run}
              for s, recs in enumerate(found[:num_stages])}
    verifiers = {p: v for p, v in found[num_stages].items() if v.get("run") == run}
    progress = {p: v for p, v in found[num_stages + 1].items() if v.get("run") == run}
    targets: set[str] = set(known_targets)
    for v in verifiers.values():
        targets |= set(_str_list(v.get("accusations"))) | set(_str_list(v.get("banned")))
    for p in progress.values():
        targets |= {b["peer"] for b in p.get("banned", []) if isinstance(b, dict) and isinstance(b.get("peer"), str)}
    targets_sorted = sorted(targets)[:MAX_BAN_TARGETS]
    votes = await asyncio.gather(*(source.get(ban_key(run, t)) for t in targets_sorted))
    ban_votes = {t: {voter: vote for voter, vote in v.items() if vote.get("target") == t and vote.get("run") == run}
                 for t, v in zip(targets_sorted, votes, strict=True)}
    return SwarmRecords(claims=claims, verifiers=verifiers, progress=progress,
                        ban_votes={t: v for t, v in ban_votes.items() if v})


# -- memory --------------------------------------------------------------------------------------
@dataclass
class Seen:
    """The last record of one node and when it was first and last present in the DHT."""

    payload: dict[str, Any]
    first_seen: float
    last_seen: float


@dataclass
class Ban:
    """A ban as the monitor shows it, merged over every verifier that reported it."""

    peer: str
    stage: int
    step: int
    votes: set[str] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)
    effective: bool = False
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class SwarmMemory:
    """What the monitor has seen so far; :meth:`observe` folds in one poll."""

    stale_after_s: float = 6.0  # absent for longer than this (a few polls) -> STALE, not a lookup hiccup
    forget_after_s: float = 600.0  # a node gone for this long leaves the page
    workers: dict[tuple[int, str], Seen] = field(default_factory=dict)
    verifiers: dict[str, Seen] = field(default_factory=dict)
    progress: dict[str, Seen] = field(default_factory=dict)
    train_loss: dict[str, dict[int, float]] = field(default_factory=dict)  # verifier -> step -> loss
    val_loss: dict[str, dict[int, float]] = field(default_factory=dict)
    bans: dict[str, Ban] = field(default_factory=dict)
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> summary of the votes
    committee: list[str] = field(default_factory=list)
    polls: int = 0

    def observe(self, records: SwarmRecords, now: float) -> None:
        self.polls += 1
        for stage, claims in records.claims.items():
            for peer, payload in claims.items():
                self._seen(self.workers, (stage, peer), payload, now)
        for peer, payload in records.verifiers.items():
            self._seen(self.verifiers, peer, payload, now)
        committee_at: tuple[int, list[str]] | None = None
        for peer, payload in records.progress.items():
            self._seen(self.progress, peer, payload, now)
            for name, points in (("train_loss", self.train_loss), ("val_loss", self.val_loss)):
                hist = points.setdefault(peer, {})
                hist.update(_points(payload.get(name)))
                while len(hist) > MAX_HISTORY:
                    hist.pop(min(hist))
            committee = _str_list(payload.get("committee"), 64)
            step = _int(payload.get("step"))
            if committee and (committee_at is None or step >= committee_at[0]):
                committee_at = (step, committee)
            for b in payload.get("banned", []) if isinstance(payload.get("banned"), list) else []:
                if isinstance(b, dict) and isinstance(b.get("peer"), str):
                    self._ban(b["peer"], _int(b.get("stage"), -1), _int(b.get("step")), now,
                              votes=_str_list(b.get("votes"), 64), reasons=_str_list(b.get("reasons"), 64),
                              effective=True)
        if committee_at is not None:
            self.committee = committee_at[1]
        for peer, payload in records.verifiers.items():
            for target in _str_list(payload.get("banned")):
                self._ban(target, -1, _int(payload.get("step")), now, votes=[], reasons=[], effective=True)
            for target in _str_list(payload.get("accusations")):
                self._ban(target, -1, _int(payload.get("step")), now, votes=[peer], reasons=[], effective=False)
        for target, votes in records.ban_votes.items():
            self.evidence[target] = _evidence_summary(votes)
            for voter, vote in votes.items():
                ev = self.evidence[target]
                self._ban(target, _int(vote.get("stage"), -1), _int(vote.get("step")), now, votes=[voter],
                          reasons=ev["reasons"], effective=False)
        self._forget(now)

    @staticmethod
    def _seen(table: dict, key: Any, payload: dict[str, Any], now: float) -> None:
        cur = table.get(key)
        if cur is None:
            table[key] = Seen(payload, now, now)
        else:
            cur.payload, cur.last_seen = payload, now

    def _ban(self, peer: str, stage: int, step: int, now: float, votes: list[str], reasons: list[str],
             effective: bool) -> None:
        ban = self.bans.get(peer)
        if ban is None:
            ban = self.bans[peer] = Ban(peer=peer, stage=stage, step=step, first_seen=now)
        ban.last_seen = now
        if stage >= 0 and (ban.stage < 0 or effective):
            ban.stage = stage
        if effective and not ban.effective:
            ban.effective, ban.step = True, step
        elif not ban.effective and step and (not ban.step or step < ban.step):
            ban.step = step
        ban.votes |= set(votes)
        ban.reasons |= set(reasons)

    def _forget(self, now: float) -> None:
        for table in (self.workers, self.verifiers, self.progress):
            for key in [k for k, s in table.items() if now - s.last_seen > self.forget_after_s]:
                del table[key]
        # An accusation that never reached a quorum and is no longer repeated is dropped; an
        # effective ban stays for the life of the monitor (it is the swarm's history).
        for peer in [p for p, b in self.bans.items() if not b.effective and now - b.last_seen > self.forget_after_s]:
            del self.bans[peer]
            self.evidence.pop(peer, None)

    def is_present(self, seen: Seen, now: float) -> bool:
        return now - seen.last_seen <= self.stale_after_s


def _evidence_summary(votes: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """What a maintainer needs to judge a ban at a glance, from the voters' signed evidence."""
    reasons: set[str] = set()
    directions: set[str] = set()
    steps: list[int] = []
    worst: dict[str, float] = {}  # distance name -> max(distance / fence) over the evidence
    items = 0
    for vote in votes.values():
        if isinstance(vote.get("direction"), str):
            directions.add(vote["direction"])
        evidence = vote.get("evidence")
        for ev in evidence if isinstance(evidence, list) else []:
            if not isinstance(ev, dict):
                continue
            items += 1
            reasons |= set(_str_list(ev.get("reasons"), 16))
            if _num(ev.get("step")) is not None:
                steps.append(_int(ev.get("step")))
            dist, fence = ev.get("distances"), ev.get("fences")
            if isinstance(dist, dict) and isinstance(fence, dict):
                for name, d in dist.items():
                    d, f = _num(d), _num(fence.get(name))
                    if isinstance(name, str) and d is not None and f is not None and f > 0:
                        worst[name] = max(worst.get(name, 0.0), d / f)
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    return {"voters": len(votes), "flagged_messages": items, "reasons": sorted(reasons)[:16],
            "directions": sorted(directions), "steps": [min(steps), max(steps)] if steps else [],
            "worst_ratio": [{"distance": n, "ratio": round(r, 3)} for n, r in top]}


# -- the state dict --------------------------------------------------------------------------------
def _merge_curve(histories: Mapping[str, Mapping[int, float]]) -> list[list[float]]:
    """Mean over verifiers per step (each drives its own micro-batches of the same step)."""
    by_step: dict[int, list[float]] = {}
    for hist in histories.values():
        for step, loss in hist.items():
            by_step.setdefault(step, []).append(loss)
    curve = [[step, round(sum(v) / len(v), 4)] for step, v in sorted(by_step.items())]
    if len(curve) > MAX_CURVE_POINTS:
        stride = math.ceil(len(curve) / MAX_CURVE_POINTS)
        curve = curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else [])
    return curve


def build_state(memory: SwarmMemory, now: float, *, run: str, num_stages: int,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able state served on ``/api/state`` (field names are the page's contract)."""
    banned = {p for p, b in memory.bans.items() if b.effective}
    stages: list[dict[str, Any]] = []
    worker_counts = {state: 0 for state in WORKER_STATES}
    for s in range(num_stages):
        cells = []
        for (stage, peer), seen in sorted(memory.workers.items(), key=lambda kv: (kv[1].first_seen, kv[0][1])):
            if stage != s:
                continue
            reported = seen.payload.get("state")
            present = memory.is_present(seen, now)
            if peer in banned:
                state = "BANNED"
            elif not present:
                state = "OFFLINE" if reported == "OFFLINE" else "STALE"
            else:
                state = reported if reported in ("ONLINE", "JOINING", "OFFLINE") else "STALE"
            worker_counts[state] += 1
            cells.append({
                "peer": peer, "short": short_id(peer), "state": state, "reported_state": reported,
                "step": _int(seen.payload.get("step")), "throughput": _num(seen.payload.get("throughput"), 0.0),
                "optimizer_steps": _int(seen.payload.get("optimizer_steps")),
                "version": str(seen.payload.get("version", ""))[:32],
                "age_s": round(now - seen.last_seen, 1),
            })
        stages.append({"stage": s, "workers": cells,
                       "online": sum(c["state"] == "ONLINE" for c in cells)})

    committee = list(memory.committee)
    verifiers = []
    verifier_counts = {state: 0 for state in VERIFIER_STATES}
    for peer in sorted(set(memory.verifiers) | set(memory.progress)):
        rec, prog = memory.verifiers.get(peer), memory.progress.get(peer)
        latest = max((s for s in (rec, prog) if s is not None), key=lambda s: s.last_seen)
        present = memory.is_present(latest, now)
        reported = (rec.payload.get("state") if rec else None) or (prog.payload.get("state") if prog else None)
        if prog is not None and prog.payload.get("state") == "DONE":
            reported = "DONE"
        if not present:
            state = reported if reported in ("OFFLINE", "DONE") else "STALE"
        else:
            state = reported if reported in VERIFIER_STATES else "STALE"
        verifier_counts[state] += 1
        p = prog.payload if prog else {}
        train = memory.train_loss.get(peer, {})
        verifiers.append({
            "peer": peer, "short": short_id(peer), "state": state, "in_committee": peer in committee,
            "step": max(_int((rec.payload if rec else {}).get("step")), _int(p.get("step"))),
            "tokens": _int(p.get("tokens")), "tokens_per_s": _num(p.get("tokens_per_s"), 0.0),
            "train_loss": train[max(train)] if train else None,
            "accusations": len(_str_list((rec.payload if rec else {}).get("accusations"))),
            "age_s": round(now - latest.last_seen, 1),
        })

    live_progress = [s.payload for p, s in memory.progress.items() if memory.is_present(s, now)]
    flags: dict[str, dict[str, float]] = {}
    for p in live_progress or [s.payload for s in memory.progress.values()]:
        counts = p.get("flags") if isinstance(p.get("flags"), dict) else {}
        rates = p.get("flag_rates") if isinstance(p.get("flag_rates"), dict) else {}
        for boundary in set(counts) | set(rates):
            if not isinstance(boundary, str):
                continue
            f = flags.setdefault(boundary, {"count": 0, "rate_sum": 0.0, "reporters": 0})
            f["count"] += _int(counts.get(boundary))
            rate = _num(rates.get(boundary))
            if rate is not None:
                f["rate_sum"] += rate
                f["reporters"] += 1
    boundaries = []
    for s in range(num_stages):
        for direction in ("forward", "backward"):
            f = flags.get(f"stage{s}/{direction}", {"count": 0, "rate_sum": 0.0, "reporters": 0})
            boundaries.append({"stage": s, "direction": direction, "flags": int(f["count"]),
                               "rate": round(f["rate_sum"] / f["reporters"], 5) if f["reporters"] else 0.0})

    train_curve = _merge_curve(memory.train_loss)
    val_curve = _merge_curve(memory.val_loss)
    bans = []
    for peer, b in sorted(memory.bans.items(), key=lambda kv: (not kv[1].effective, kv[1].step, kv[0])):
        stage = b.stage
        if stage < 0:
            stage = next((st for (st, p) in memory.workers if p == peer), -1)
        bans.append({"peer": peer, "short": short_id(peer), "stage": stage, "step": b.step,
                     "effective": b.effective, "votes": sorted(b.votes), "reasons": sorted(b.reasons),
                     "evidence": memory.evidence.get(peer)})
    tokens = sum(_int(s.payload.get("tokens")) for s in memory.progress.values())
    return {
        "run": run,
        "num_stages": num_stages,
        "generated_at": time.time(),
        "seq": memory.polls,
        "stages": stages,
        "replicas": max((len(s["workers"]) for s in stages), default=0),
        "verifiers": verifiers,
        "committee": [{"peer": p, "short": short_id(p)} for p in committee],
        "bans": bans,
        "boundaries": boundaries,
        "progress": {
            "step": max((v["step"] for v in verifiers), default=0),
            "tokens": tokens,
            "tokens_per_s": round(sum(_num(p.get("tokens_per_s"), 0.0) for p in live_progress
                                      if p.get("state") == "ONLINE"), 1),
            "train_loss": train_curve,
            "val_loss": val_curve,
            "latest_train_loss": train_curve[-1][1] if train_curve else None,
            "latest_val_loss": val_curve[-1][1] if val_curve else None,
        },
        "counts": {"workers": worker_counts, "verifiers": verifier_counts,
                   "committee": len(committee), "bans": sum(b["effective"] for b in bans),
                   "accused": sum(not b["effective"] for b in bans)},
        **(dict(extra) if extra else {}),
    }


# -- swarm-level Prometheus series ---------------------------------------------------------------
Gauge = tuple[str, str, list[tuple[dict[str, str], float]]]  # name, help, [(labels, value)]


def swarm_gauges(state: Mapping[str, Any]) -> list[Gauge]:
    """The swarm-level series of the bootstrap's ``/metrics``, every one a gauge.

    Every (stage, state) pair is emitted, zeros included, so a dashboard's "no ONLINE worker on
    stage 2" alert sees a 0 rather than a missing series.
    """
    workers = [({"stage": str(st["stage"]), "state": state_name},
                float(sum(c["state"] == state_name for c in st["workers"])))
               for st in state["stages"] for state_name in WORKER_STATES]
    counts = state["counts"]
    prog = state["progress"]
    out: list[Gauge] = [
        ("sentinel_swarm_stages", "Pipeline stages of the run (from the manifest).",
         [({}, float(state["num_stages"]))]),
        ("sentinel_swarm_workers", "Workers per stage and display state (STALE: record expired; "
         "BANNED: banned by a committee quorum).", workers),
        ("sentinel_swarm_verifiers", "Verifiers per display state.",
         [({"state": k}, float(v)) for k, v in counts["verifiers"].items()]),
        ("sentinel_swarm_committee_size", "Verifiers in the current committee.", [({}, float(counts["committee"]))]),
        ("sentinel_swarm_bans", "Workers banned by a committee quorum.", [({}, float(counts["bans"]))]),
        ("sentinel_swarm_accused", "Workers with ban votes but no quorum yet.", [({}, float(counts["accused"]))]),
        ("sentinel_swarm_step", "Highest training step reported by a verifier.", [({}, float(prog["step"]))]),
        ("sentinel_swarm_tokens", "Training tokens processed, summed over verifiers.", [({}, float(prog["tokens"]))]),
        ("sentinel_swarm_tokens_per_second", "Training throughput, summed over live verifiers.",
         [({}, float(prog["tokens_per_s"]))]),
        ("sentinel_swarm_flags", "Flagged messages per boundary, summed over live verifiers.",
         [({"stage": str(b["stage"]), "direction": b["direction"]}, float(b["flags"])) for b in state["boundaries"]]),
        ("sentinel_swarm_flag_rate", "Fraction of screened messages flagged per boundary (mean over verifiers).",
         [({"stage": str(b["stage"]), "direction": b["direction"]}, float(b["rate"])) for b in state["boundaries"]]),
    ]
    if prog["latest_train_loss"] is not None:
        out.append(("sentinel_swarm_train_loss", "Latest training loss (mean over verifiers).",
                    [({}, float(prog["latest_train_loss"]))]))
    if prog["latest_val_loss"] is not None:
        out.append(("sentinel_swarm_val_loss", "Latest validation loss (mean over verifiers).",
                    [({}, float(prog["latest_val_loss"]))]))
    return out
