"""The swarm monitor the bootstrap peer serves: ``/`` (page), ``/api/state`` (JSON), ``/metrics``.

How it fits together, and why:

- A task on the runtime's asyncio loop polls the DHT every ``interval_s`` (2 s), folds the
  records into a :class:`~sentinel.bootstrap.swarm_state.SwarmMemory` and builds the state dict.
  The DHT is only ever touched from its own loop, as hivemind requires.
- The finished state is encoded to JSON once and published by swapping one attribute (atomic
  under the GIL). HTTP requests are answered by a stdlib ``ThreadingHTTPServer`` in threads that
  only read that attribute, so a slow browser or a scraper never stalls the DHT, and a busy loop
  never stalls a scrape.
- The page is static (HTML + vanilla JS + CSS, no build step) and polls ``/api/state``.
- ``/metrics`` renders the swarm-level gauges (see :func:`swarm_gauges`) followed by this
  process's own :data:`~sentinel.metrics.METRICS`; every gauge is computed fresh, so a stage or
  state that disappears leaves no stale series behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from importlib import resources
from typing import Any

from sentinel.bootstrap.swarm_state import RecordSource, SwarmMemory, build_state, poll_records, swarm_gauges
from sentinel.metrics import METRICS
from sentinel.net.http import PROMETHEUS_CONTENT_TYPE, Response, RouteServer

__all__ = ["SwarmMonitor", "render_gauges"]

logger = logging.getLogger(__name__)

_STATIC = {
    "/": ("monitor.html", "text/html; charset=utf-8"),
    "/static/monitor.js": ("monitor.js", "text/javascript; charset=utf-8"),
    "/static/monitor.css": ("monitor.css", "text/css; charset=utf-8"),
}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_gauges(gauges: list[tuple[str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """Gauges with HELP lines in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for name, help_text, series in gauges:
        lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in series:
            label_text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {_format_value(value)}" if label_text
                         else f"{name} {_format_value(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _static(filename: str) -> bytes:
    return resources.files("sentinel.bootstrap").joinpath("static", filename).read_bytes()


class SwarmMonitor:
    """Collects the swarm state on the runtime's loop and serves it over HTTP from a thread."""

    def __init__(self, source: RecordSource, run: str, num_stages: int, host: str = "127.0.0.1", port: int = 0,
                 interval_s: float = 2.0, memory: SwarmMemory | None = None,
                 info: dict[str, Any] | None = None):
        self.source = source
        self.run = run
        self.num_stages = num_stages
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.memory = memory or SwarmMemory()
        self.info = dict(info or {})  # shown on the page as is: bootstrap peer id, manifest fingerprint, ...
        self.started_at = time.time()
        self.last_error: str | None = None
        self._snapshot: tuple[dict[str, Any], bytes] = ({}, b"")
        self._publish(build_state(self.memory, time.time(), run=run, num_stages=num_stages, extra=self._extra()))
        self._server: RouteServer | None = None
        self._task: asyncio.Task | None = None
        self._static = {path: (_static(name), ctype) for path, (name, ctype) in _STATIC.items()}

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind the HTTP port (HTTPPortError if taken), do a first poll, start refreshing. Returns the URL."""
        routes = {path: self._static_route(path) for path in self._static}
        routes.update({"/api/state": self._api_state, "/metrics": self._metrics, "/healthz": self._healthz})
        self._server = RouteServer(routes, self.host, self.port, flag="--monitor-port")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.refresh(), timeout=max(5.0, 3 * self.interval_s))
        self._task = asyncio.create_task(self._loop(), name="swarm-monitor")
        return self.url

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("monitor not started")
        return self._server.base_url + "/"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._server is not None:
            self._server.close()

    # -- collection (runs on the runtime's loop) -------------------------------------------------
    async def refresh(self) -> dict[str, Any]:
        """One poll of the DHT folded into the state; lookups that fail read as absent records."""
        records = await poll_records(self.source, self.run, self.num_stages, known_targets=self.memory.bans)
        now = time.time()
        self.memory.observe(records, now)
        state = build_state(self.memory, now, run=self.run, num_stages=self.num_stages, extra=self._extra())
        self._publish(state)
        return state

    def _publish(self, state: dict[str, Any]) -> None:
        # One attribute holds both, so a reader sees the old pair or the new one, never a mix.
        self._snapshot = (state, json.dumps(state, allow_nan=False).encode())

    def _extra(self) -> dict[str, Any]:
        return {"monitor": {**self.info, "interval_s": self.interval_s, "started_at": self.started_at,
                            "error": self.last_error},
                "bootstrap_metrics": METRICS.snapshot()}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.wait_for(self.refresh(), timeout=max(10.0, 5 * self.interval_s))
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the monitor keeps its last state and tries again
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                logger.warning("monitor refresh failed: %s", self.last_error)
                METRICS.inc("sentinel_monitor_refresh_failures_total")

    # -- HTTP (runs in the server's threads; reads only the published snapshot) ------------------
    @property
    def state(self) -> dict[str, Any]:
        return self._snapshot[0]

    def _static_route(self, path: str):
        def route() -> Response:
            body, ctype = self._static[path]
            return 200, ctype, body
        return route

    def _api_state(self) -> Response:
        return 200, "application/json", self._snapshot[1]

    def _healthz(self) -> Response:
        age = time.time() - self.state["generated_at"]
        ok = age < max(30.0, 10 * self.interval_s)
        return (200 if ok else 503), "text/plain; charset=utf-8", f"{'ok' if ok else 'stale'} {age:.1f}s\n".encode()

    def _metrics(self) -> Response:
        state = self.state
        age = [("sentinel_swarm_state_age_seconds", "Seconds since the monitor last rebuilt the swarm state.",
                [({}, round(time.time() - state["generated_at"], 3))])]
        text = render_gauges(swarm_gauges(state) + age) + METRICS.render_prometheus()
        return 200, PROMETHEUS_CONTENT_TYPE, text.encode()
