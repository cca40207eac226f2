"""The monitor's state core on plain records, and its HTTP server against a fake DHT.

No p2pd here: :func:`poll_records` reads through anything with an async ``get(key)``, so a dict
stands in for the DHT and every state transition (stale, OFFLINE, banned, forgotten) is driven by
an explicit clock.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from sentinel.bootstrap.monitor import SwarmMonitor
from sentinel.bootstrap.swarm_state import SwarmMemory, SwarmRecords, build_state, poll_records
from sentinel.net.http import HTTPPortError
from sentinel.protocol.keys import ban_key, progress_key, stage_key, verifiers_key

RUN = "test-run"
W = [f"12D3KooWorker{i:02d}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{i:02d}" for i in range(6)]
V = [f"12D3KooWVerifier{i:02d}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{i:02d}" for i in range(3)]


def claim(stage: int, state: str = "ONLINE", step: int = 5) -> dict[str, Any]:
    return {"kind": "stage_claim", "run": RUN, "stage": stage, "state": state, "throughput": 1.0, "step": step,
            "version": "0.1.0", "optimizer_steps": step}


def verifier(state: str = "ONLINE", step: int = 5, accusations=(), banned=()) -> dict[str, Any]:
    return {"kind": "verifier", "run": RUN, "state": state, "step": step, "version": "0.1.0",
            "accusations": list(accusations), "banned": list(banned)}


def progress(step: int, train, val=(), banned=(), committee=(), flags=None, rates=None, tokens=1000,
             tps=100.0, state: str = "ONLINE") -> dict[str, Any]:
    return {"kind": "progress", "run": RUN, "step": step, "micro_batches": 2 * step, "state": state,
            "tokens": tokens, "tokens_per_s": tps, "train_loss": [list(p) for p in train],
            "val_loss": [list(p) for p in val], "flags": flags or {}, "flag_rates": rates or {},
            "banned": list(banned), "committee": list(committee)}


def records(claims=None, verifiers=None, prog=None, votes=None) -> SwarmRecords:
    return SwarmRecords(claims=claims or {}, verifiers=verifiers or {}, progress=prog or {}, ban_votes=votes or {})


def state_of(memory: SwarmMemory, now: float, stages: int = 2) -> dict[str, Any]:
    return build_state(memory, now, run=RUN, num_stages=stages)


def cells(state: dict[str, Any]) -> dict[str, str]:
    return {c["peer"]: c["state"] for st in state["stages"] for c in st["workers"]}


# -- state core ---------------------------------------------------------------------------------
def test_grid_counts_and_states():
    mem = SwarmMemory()
    mem.observe(records(claims={0: {W[0]: claim(0), W[1]: claim(0, "JOINING")}, 1: {W[2]: claim(1)}}), now=100.0)
    s = state_of(mem, 100.0)
    assert [len(st["workers"]) for st in s["stages"]] == [2, 1]
    assert cells(s) == {W[0]: "ONLINE", W[1]: "JOINING", W[2]: "ONLINE"}
    assert s["stages"][0]["online"] == 1 and s["replicas"] == 2
    assert s["counts"]["workers"]["ONLINE"] == 2 and s["counts"]["workers"]["JOINING"] == 1
    json.dumps(s, allow_nan=False)  # the page's contract: strict JSON


def test_expired_record_turns_stale_then_is_forgotten():
    mem = SwarmMemory(stale_after_s=6.0, forget_after_s=60.0)
    mem.observe(records(claims={0: {W[0]: claim(0), W[1]: claim(0)}}), now=100.0)
    # W[1]'s record expired (its node died without a word); one missed poll is not yet "stale"
    mem.observe(records(claims={0: {W[0]: claim(0)}}), now=103.0)
    assert cells(state_of(mem, 103.0))[W[1]] == "ONLINE"
    mem.observe(records(claims={0: {W[0]: claim(0)}}), now=110.0)
    s = state_of(mem, 110.0)
    assert cells(s)[W[1]] == "STALE"
    stale = next(c for c in s["stages"][0]["workers"] if c["peer"] == W[1])
    assert stale["reported_state"] == "ONLINE" and stale["age_s"] == pytest.approx(10.0)
    mem.observe(records(claims={0: {W[0]: claim(0)}}), now=200.0)
    assert W[1] not in cells(state_of(mem, 200.0))


def test_offline_is_kept_as_offline_after_expiry():
    mem = SwarmMemory(stale_after_s=6.0)
    mem.observe(records(claims={0: {W[0]: claim(0, "OFFLINE")}}), now=100.0)
    assert cells(state_of(mem, 100.0))[W[0]] == "OFFLINE"
    mem.observe(records(), now=130.0)
    assert cells(state_of(mem, 130.0))[W[0]] == "OFFLINE"  # it said goodbye: not a silent failure


def test_a_failed_lookup_does_not_flicker_the_grid():
    mem = SwarmMemory(stale_after_s=6.0)
    mem.observe(records(claims={0: {W[0]: claim(0)}}), now=100.0)
    mem.observe(records(), now=102.0)  # the DHT answered nothing for one poll
    assert cells(state_of(mem, 102.0))[W[0]] == "ONLINE"


def test_ban_overrides_state_and_carries_evidence():
    mem = SwarmMemory()
    ban = {"peer": W[1], "stage": 0, "step": 19, "votes": [V[0], V[1]], "reasons": ["sign", "l2"]}
    vote = {"kind": "ban_vote", "run": RUN, "target": W[1], "stage": 0, "direction": "forward", "step": 17,
            "evidence": [{"step": 13, "stage": 0, "direction": "forward", "reasons": ["sign"],
                          "distances": {"sign": 0.9, "l2": 1.0}, "fences": {"sign": 0.3, "l2": 2.0}},
                         {"step": 15, "reasons": ["l2"], "distances": {"l2": 3.0}, "fences": {"l2": 1.5}}]}
    mem.observe(records(claims={0: {W[0]: claim(0), W[1]: claim(0)}},
                        verifiers={V[0]: verifier(accusations=[W[1]], banned=[W[1]]), V[1]: verifier()},
                        prog={V[0]: progress(20, [(20, 3.0)], banned=[ban], committee=[V[0], V[1]])},
                        votes={W[1]: {V[0]: vote}}), now=100.0)
    s = state_of(mem, 100.0)
    assert cells(s) == {W[0]: "ONLINE", W[1]: "BANNED"}
    assert s["counts"]["bans"] == 1 and s["counts"]["accused"] == 0
    (b,) = s["bans"]
    assert (b["peer"], b["stage"], b["step"], b["effective"]) == (W[1], 0, 19, True)
    assert b["votes"] == sorted([V[0], V[1]]) and b["reasons"] == ["l2", "sign"]
    ev = b["evidence"]
    assert ev["flagged_messages"] == 2 and ev["steps"] == [13, 15] and ev["directions"] == ["forward"]
    assert ev["worst_ratio"][0] == {"distance": "sign", "ratio": 3.0}
    assert [c["peer"] for c in s["committee"]] == [V[0], V[1]]
    assert [v["in_committee"] for v in s["verifiers"]] == [True, True]


def test_accusation_without_quorum_is_pending_and_expires():
    mem = SwarmMemory(forget_after_s=60.0)
    mem.observe(records(claims={1: {W[2]: claim(1)}}, verifiers={V[0]: verifier(accusations=[W[2]])}), now=100.0)
    s = state_of(mem, 100.0)
    assert cells(s)[W[2]] == "ONLINE"
    (b,) = s["bans"]
    assert not b["effective"] and b["votes"] == [V[0]] and b["stage"] == 1
    assert s["counts"]["accused"] == 1
    mem.observe(records(claims={1: {W[2]: claim(1)}}, verifiers={V[0]: verifier()}), now=200.0)
    assert state_of(mem, 200.0)["bans"] == []


def test_losses_merge_across_verifiers_and_outlive_their_records():
    mem = SwarmMemory(stale_after_s=6.0)
    mem.observe(records(prog={V[0]: progress(2, [(1, 4.0), (2, 3.0)], val=[(0, 5.0)], tokens=100, tps=10.0),
                              V[1]: progress(2, [(1, 5.0), (2, 4.0)], tokens=200, tps=20.0)}), now=100.0)
    s = state_of(mem, 100.0)
    assert s["progress"]["train_loss"] == [[1, 4.5], [2, 3.5]]
    assert s["progress"]["val_loss"] == [[0, 5.0]]
    assert s["progress"]["latest_train_loss"] == 3.5 and s["progress"]["latest_val_loss"] == 5.0
    assert s["progress"]["tokens"] == 300 and s["progress"]["tokens_per_s"] == 30.0
    assert s["progress"]["step"] == 2
    # the records keep only a recent window; the monitor keeps the history
    mem.observe(records(prog={V[0]: progress(3, [(3, 2.0)], tokens=150, tps=10.0, state="DONE")}), now=110.0)
    s = state_of(mem, 110.0)
    assert [p[0] for p in s["progress"]["train_loss"]] == [1, 2, 3]
    by_peer = {v["peer"]: v["state"] for v in s["verifiers"]}
    assert by_peer == {V[0]: "DONE", V[1]: "STALE"}
    assert s["progress"]["tokens_per_s"] == 0.0  # nobody is training any more


def test_flags_per_boundary():
    mem = SwarmMemory()
    mem.observe(records(prog={
        V[0]: progress(5, [], flags={"stage1/forward": 3}, rates={"stage1/forward": 0.1, "stage0/forward": 0.0}),
        V[1]: progress(5, [], flags={"stage1/forward": 1, "stage1/backward": 2}, rates={"stage1/forward": 0.3}),
    }), now=100.0)
    b = {(x["stage"], x["direction"]): x for x in state_of(mem, 100.0)["boundaries"]}
    assert len(b) == 4
    assert b[(1, "forward")] == {"stage": 1, "direction": "forward", "flags": 4, "rate": pytest.approx(0.2)}
    assert b[(1, "backward")]["flags"] == 2 and b[(0, "backward")] == {"stage": 0, "direction": "backward",
                                                                        "flags": 0, "rate": 0.0}


def test_hostile_values_are_dropped_not_crashing():
    mem = SwarmMemory()
    bad = progress(5, [(1, float("nan")), ("x", 1.0), [2], (3, 2.5)], val="nope", tps=float("inf"))
    bad["banned"] = ["not-a-dict", {"peer": 7}]
    bad["committee"] = "everyone"
    liar = {**verifier(), "accusations": "all", "banned": [1, None]}
    mem.observe(records(prog={V[0]: bad}, verifiers={V[1]: liar}), now=100.0)
    s = state_of(mem, 100.0)
    assert s["progress"]["train_loss"] == [[3, 2.5]] and s["progress"]["val_loss"] == []
    assert s["bans"] == [] and s["committee"] == []
    json.dumps(s, allow_nan=False)


def test_long_curves_are_thinned_keeping_the_last_point():
    mem = SwarmMemory()
    mem.observe(records(prog={V[0]: progress(5000, [(i, 10.0 - i / 1000) for i in range(5001)])}), now=100.0)
    curve = state_of(mem, 100.0)["progress"]["train_loss"]
    assert len(curve) <= 2001 and curve[0][0] == 0 and curve[-1][0] == 5000


class FakeDHT:
    """Stands in for SwarmRuntime.get: key -> {owner: payload}."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, Any]]] = {}
        self.gets = 0

    async def get(self, key: str) -> dict[str, dict[str, Any]]:
        self.gets += 1
        return dict(self.data.get(key, {}))


def test_poll_reads_every_key_and_follows_accusations():
    dht = FakeDHT()
    dht.data[stage_key(RUN, 0)] = {W[0]: claim(0), W[3]: claim(1)}  # W[3] claims stage 1 under stage 0's key
    dht.data[stage_key(RUN, 1)] = {W[1]: claim(1), W[4]: {**claim(1), "run": "other"}}
    dht.data[verifiers_key(RUN)] = {V[0]: verifier(accusations=[W[1]])}
    dht.data[progress_key(RUN)] = {V[0]: progress(1, [(1, 3.0)])}
    dht.data[ban_key(RUN, W[1])] = {V[0]: {"kind": "ban_vote", "run": RUN, "target": W[1], "stage": 1,
                                           "direction": "backward", "step": 1, "evidence": []},
                                    V[1]: {"kind": "ban_vote", "run": RUN, "target": W[2], "stage": 1,
                                           "direction": "backward", "step": 1, "evidence": []}}
    rec = asyncio.run(poll_records(dht, RUN, 2))
    assert rec.claims == {0: {W[0]: claim(0)}, 1: {W[1]: claim(1)}}
    assert set(rec.ban_votes) == {W[1]} and set(rec.ban_votes[W[1]]) == {V[0]}


# -- HTTP ------------------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_monitor_serves_page_state_and_static_files():
    dht = FakeDHT()
    dht.data[stage_key(RUN, 0)] = {W[0]: claim(0)}
    dht.data[stage_key(RUN, 1)] = {W[1]: claim(1, "JOINING")}
    dht.data[progress_key(RUN)] = {V[0]: progress(3, [(1, 4.0), (3, 3.25)], val=[(0, 5.0)])}

    async def scenario() -> None:
        mon = SwarmMonitor(dht, RUN, 2, port=0, interval_s=0.05, info={"bootstrap": "12D3KooWboot"})
        url = await mon.start()
        try:
            loop = asyncio.get_running_loop()
            status, ctype, body = await loop.run_in_executor(None, _get, url)
            assert status == 200 and ctype.startswith("text/html") and b"/static/monitor.js" in body
            for path, kind in (("static/monitor.js", "javascript"), ("static/monitor.css", "css")):
                status, ctype, body = await loop.run_in_executor(None, _get, url + path)
                assert status == 200 and kind in ctype and body
            status, ctype, body = await loop.run_in_executor(None, _get, url + "api/state")
            s = json.loads(body)
            assert status == 200 and ctype == "application/json"
            assert s["run"] == RUN and cells(s) == {W[0]: "ONLINE", W[1]: "JOINING"}
            assert s["progress"]["latest_train_loss"] == 3.25 and s["monitor"]["bootstrap"] == "12D3KooWboot"
            # the refresh task keeps polling: a change in the DHT shows up without a restart
            dht.data[stage_key(RUN, 1)] = {W[1]: claim(1)}
            for _ in range(200):
                if cells(mon.state).get(W[1]) == "ONLINE":
                    break
                await asyncio.sleep(0.05)
            status, _, body = await loop.run_in_executor(None, _get, url + "api/state")
            assert cells(json.loads(body))[W[1]] == "ONLINE"
            status, _, body = await loop.run_in_executor(None, _get, url + "nope")
            assert status == 404
            status, _, body = await loop.run_in_executor(None, _get, url + "healthz")
            assert status == 200 and body.startswith(b"ok")
        finally:
            await mon.stop()

    asyncio.run(scenario())


def test_monitor_port_taken_is_a_clear_error():
    async def scenario() -> None:
        first = SwarmMonitor(FakeDHT(), RUN, 1, port=0)
        url = await first.start()
        try:
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            with pytest.raises(HTTPPortError, match="port is taken.*--monitor-port"):
                await SwarmMonitor(FakeDHT(), RUN, 1, port=port).start()
        finally:
            await first.stop()

    asyncio.run(scenario())


def test_bootstrap_cli_rejects_a_bad_monitor_port(capsys):
    from sentinel.cli.bootstrap import main

    assert main(["--new-swarm", "--monitor-port", "70000"]) == 2
    assert "--monitor-port 70000" in capsys.readouterr().err
