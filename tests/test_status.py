"""The volunteer's status line (sentinel.net.status) and `sentinel-node status` without a node."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest

from sentinel.net.http import MetricsServer
from sentinel.net.status import StatusBoard, fetch_status, format_status, strikes_against
from sentinel.verifier.strikes import StrikeLedger


def test_worker_line_says_stage_state_step_speed_strikes_ban_and_peers() -> None:
    line = format_status({"role": "worker", "stage": 2, "state": "ONLINE", "step": 41, "tokens_per_s": 812.4,
                          "strikes": 1, "banned": False, "peers": 6})
    assert line == "status: worker stage 2 ONLINE | step 41 | 812 tok/s | strikes 1 | not banned | 6 peers"
    assert "BANNED" in format_status({"role": "worker", "stage": 0, "state": "ONLINE", "banned": True})


def test_verifier_line_and_unknown_fields_left_out() -> None:
    assert format_status({"role": "verifier", "state": "ONLINE", "step": 3, "banned": 2}) == \
        "status: verifier ONLINE | step 3 | 2 banned"
    assert format_status({}) == "status: ? ? | step 0"


def test_strikes_against_takes_the_worst_report_and_ignores_junk() -> None:
    records = {"v1": {"strikes": {"me": 2, "other": 4}}, "v2": {"strikes": {"me": 3}},
               "v3": {"strikes": {"me": "9"}}, "v4": {"strikes": ["me"]}, "v5": "junk", "v6": {"strikes": {"me": True}}}
    assert strikes_against("me", records) == 3
    assert strikes_against("nobody", records) == 0


def test_ledger_publishes_live_strikes_only() -> None:
    ledger = StrikeLedger(strike_limit=3, forgive_after=100)
    ledger.record("a", True)
    ledger.record("b", True)
    ledger.record("b", True)
    for _ in range(3):
        ledger.record("c", True)  # banned: not "struck" any more
    assert ledger.struck() == {"b": 2, "a": 1}
    assert ledger.struck(limit=1) == {"b": 2}


def test_board_measures_tokens_per_second_and_survives_a_failing_swarm_view() -> None:
    tokens = {"n": 0}

    def own() -> dict:
        return {"role": "worker", "stage": 1, "state": "ONLINE", "step": 5, "tokens": tokens["n"]}

    async def broken() -> dict:
        raise ConnectionError("DHT down")

    async def go() -> tuple[dict, dict]:
        board = StatusBoard(own, broken, print_s=0)
        assert board.response()[0] == 503
        first = await board.refresh()
        tokens["n"] = 1000
        await asyncio.sleep(0.2)
        return first, await board.refresh()

    first, second = asyncio.run(go())
    assert first["tokens_per_s"] is None
    assert 1000 / 1.0 < second["tokens_per_s"] < 1000 / 0.2 + 1  # 1000 tokens in ~0.2 s
    assert "strikes" not in second and second["line"].startswith("status: worker stage 1 ONLINE")


def test_board_prints_on_its_timer_and_serves_json() -> None:
    lines: list[str] = []

    async def view() -> dict:
        return {"peers": 3, "strikes": 0, "banned": False}

    async def go() -> StatusBoard:
        board = StatusBoard(lambda: {"role": "worker", "stage": 0, "state": "ONLINE", "step": 1, "tokens": 0},
                            view, print_s=0.05, refresh_s=0.05, out=lines.append)
        board.start()
        deadline = asyncio.get_running_loop().time() + 30
        while len(lines) < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        await board.stop()
        return board

    board = asyncio.run(go())
    assert all(line.endswith("| 3 peers") for line in lines)
    code, ctype, body = board.response()
    assert code == 200 and ctype == "application/json" and json.loads(body)["peers"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_status_from_a_served_board_and_clear_errors() -> None:
    server = MetricsServer(port=0)
    try:
        with pytest.raises(OSError, match="HTTP 404"):
            fetch_status(f"{server.base_url}/status")  # no node behind it yet
        board = StatusBoard(lambda: {"role": "verifier", "state": "ONLINE", "step": 2, "banned": 0}, print_s=0)
        server.add_route("/status", board.response)
        asyncio.run(board.refresh())
        assert fetch_status(f"{server.base_url}/status")["line"] == "status: verifier ONLINE | step 2 | 0 banned"
        with pytest.raises(OSError, match="did not answer JSON"):
            fetch_status(f"{server.base_url}/metrics")
    finally:
        server.close()
    with pytest.raises(OSError, match="no node answers"):
        fetch_status(f"http://127.0.0.1:{_free_port()}/status", timeout=5)


@pytest.mark.parametrize(("argv", "code", "fragment"), [
    (["status", "--metrics-port", "PORT"], 3, "no node answers"),
    (["status", "--metrics-port", "0"], 2, "need 1..65535"),
    (["join", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--status-every", "-1"], 2, "--status-every"),
])
def test_cli_errors(argv: list[str], code: int, fragment: str) -> None:
    argv = [a.replace("PORT", str(_free_port())) for a in argv]
    r = subprocess.run([sys.executable, "-m", "sentinel.cli.node", *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == code and fragment in r.stderr, r.stderr
