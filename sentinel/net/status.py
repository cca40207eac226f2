"""What a volunteer sees: a one-line status on a timer, and ``sentinel-node status`` to ask for it.

A running node keeps a :class:`StatusBoard`: every ``refresh_s`` it gathers the node's own
counters and what the swarm says about it (strikes the verifiers hold against it, whether the
committee banned it, how many peers it is connected to), and every ``print_s`` it prints

    status: worker stage 1 ONLINE | step 42 | 812 tok/s | strikes 0 | not banned | 6 peers

With ``--metrics-port`` the same snapshot is served as JSON at ``/status`` beside ``/metrics``,
which is what ``sentinel-node status --metrics-port PORT`` reads (no P2P client, no signatures:
it is the volunteer's own machine asking its own node).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["StatusBoard", "fetch_status", "format_status", "strikes_against"]

logger = logging.getLogger(__name__)


def format_status(s: Mapping[str, Any]) -> str:
    """The one line a volunteer reads. Unknown fields are left out, never guessed."""
    role = s.get("role", "?")
    head = f"{role} stage {s['stage']}" if role == "worker" and "stage" in s else str(role)
    parts = [f"{head} {s.get('state', '?')}", f"step {s.get('step', 0)}"]
    if s.get("tokens_per_s") is not None:
        parts.append(f"{s['tokens_per_s']:.0f} tok/s")
    if role == "worker":
        if s.get("strikes") is not None:
            parts.append(f"strikes {s['strikes']}")
        if s.get("banned") is not None:
            parts.append("BANNED" if s["banned"] else "not banned")
    elif isinstance(s.get("banned"), int) and not isinstance(s.get("banned"), bool):
        parts.append(f"{s['banned']} banned")  # a verifier: workers its committee has banned
    if s.get("peers") is not None:
        parts.append(f"{s['peers']} peers")
    return "status: " + " | ".join(parts)


def strikes_against(peer: str, verifier_records: Mapping[str, Any]) -> int:
    """The most strikes any verifier reports against ``peer`` (their records carry ``strikes``)."""
    worst = 0
    for rec in verifier_records.values():
        strikes = rec.get("strikes") if isinstance(rec, Mapping) else None
        if isinstance(strikes, Mapping):
            n = strikes.get(peer)
            if isinstance(n, int) and not isinstance(n, bool) and n > worst:
                worst = n
    return worst


class StatusBoard:
    """Refreshes a status snapshot and prints it on a timer.

    Args:
        own: the node's own counters (``node.status()``: role, stage, state, step, tokens, ...).
        swarm: an async callable returning what the swarm says about this node (``strikes``,
            ``banned``, ``peers``); failures are logged and leave those fields unknown.
        print_s: seconds between printed lines (0 = never print, only serve ``/status``).
        refresh_s: seconds between snapshots (also the tokens/s averaging window).
        out: where lines go (default ``print``).
    """

    def __init__(self, own: Callable[[], dict[str, Any]], swarm: Callable[[], Any] | None = None,
                 print_s: float = 30.0, refresh_s: float = 5.0, out: Callable[[str], None] | None = None) -> None:
        self.own, self.swarm = own, swarm
        self.print_s, self.refresh_s = float(print_s), float(refresh_s)
        self.out = out or (lambda line: print(line, flush=True))
        self.snapshot: dict[str, Any] = {}
        self._last_tokens: tuple[float, int] | None = None
        self._task: asyncio.Task | None = None

    async def refresh(self) -> dict[str, Any]:
        s = dict(self.own())
        now = time.monotonic()
        tokens = int(s.get("tokens", 0))
        if self._last_tokens is not None and now > self._last_tokens[0]:
            s["tokens_per_s"] = max(0, tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
        else:
            s["tokens_per_s"] = self.snapshot.get("tokens_per_s")
        self._last_tokens = (now, tokens)
        if self.swarm is not None:
            try:
                s.update(await self.swarm())
            except Exception as e:  # noqa: BLE001 - a DHT hiccup must not stop the status line
                logger.debug("status: cannot read the swarm's view: %s", e)
        s["line"] = format_status(s)
        s["time"] = time.time()
        self.snapshot = s  # replaced whole: the HTTP thread reads it without a lock
        return s

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        last_print = time.monotonic()
        while True:
            await self.refresh()
            if self.print_s > 0 and time.monotonic() - last_print >= self.print_s:
                self.out(self.snapshot["line"])
                last_print = time.monotonic()
            await asyncio.sleep(min(self.refresh_s, self.print_s) if self.print_s > 0 else self.refresh_s)

    def response(self) -> tuple[int, str, bytes]:
        """``/status`` for the node's HTTP server (runs in its thread: reads the snapshot only)."""
        snap = self.snapshot
        if not snap:
            return 503, "application/json", b'{"error": "starting"}\n'
        return 200, "application/json", (json.dumps(snap) + "\n").encode()


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET a node's ``/status``; raises ``OSError`` with a message saying what to check."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a local URL the user gave
            body = r.read()
    except urllib.error.HTTPError as e:
        raise OSError(f"{url} answered HTTP {e.code}; is it a sentinel node's metrics port?") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"no node answers at {url} ({reason}); start it with --metrics-port and pass that port") \
            from None
    try:
        data = json.loads(body)
    except ValueError:
        raise OSError(f"{url} did not answer JSON; is it a sentinel node's metrics port?") from None
    if not isinstance(data, dict):
        raise OSError(f"{url} answered {type(data).__name__}, not a status object")
    return data
