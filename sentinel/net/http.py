"""A tiny HTTP server for ``/metrics`` (Prometheus text format), usable by every node.

Why stdlib ``ThreadingHTTPServer`` in a daemon thread and not ``prometheus_client``'s server or an
asyncio server: the registry is our own :data:`sentinel.metrics.METRICS` (thread-safe), a scrape
must answer even while the node's event loop is busy (a verifier screening a large tensor, a
worker's compute thread holding the GIL in bursts), and nothing new needs installing.

:class:`RouteServer` is shared with the bootstrap monitor: a path -> handler table, each handler
returning ``(status, content type, body)``. Handlers run in the server's threads, so they must
only read state that is safe to read from another thread (an atomically replaced snapshot, or
the locked METRICS registry).

    server = start_metrics_server(9100)      # node: sentinel-node join ... --metrics-port 9100
    server.url                               # 'http://127.0.0.1:9100/metrics'
    server.close()
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from sentinel.metrics import METRICS

__all__ = ["PROMETHEUS_CONTENT_TYPE", "HTTPPortError", "RouteServer", "start_metrics_server"]

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Response = tuple[int, str, bytes]
Route = Callable[[], Response]


class HTTPPortError(OSError):
    """The HTTP port cannot be bound (taken, or not allowed); the message says which flag to change."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: the monitor page polls every 2 s

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        path = urlsplit(self.path).path
        route = self.server.routes.get(path)
        if route is None:
            status, ctype, body = 404, "text/plain; charset=utf-8", f"not found: {path}\n".encode()
        else:
            try:
                status, ctype, body = route()
            except Exception:  # noqa: BLE001 - a broken page must not take the node's server down
                logger.exception("HTTP handler for %s failed", path)
                status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head:
            with contextlib.suppress(ConnectionError):
                self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an open keep-alive connection never blocks a node's exit
    routes: Mapping[str, Route]


class RouteServer:
    """A ``ThreadingHTTPServer`` on ``host:port`` (0 = any free port) serving ``routes`` from a thread."""

    def __init__(self, routes: Mapping[str, Route], host: str = "127.0.0.1", port: int = 0, flag: str = "--port"):
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise HTTPPortError(e.errno, f"cannot serve HTTP on {host}:{port}: the port is taken; "
                                             f"choose another {flag} (0 picks a free one)") from e
            raise HTTPPortError(e.errno, f"cannot serve HTTP on {host}:{port}: {e.strerror or e}; "
                                         f"check {flag} and the host") from e
        self._server.routes = dict(routes)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()

    def add_route(self, path: str, route: Route) -> None:
        """Serve ``route`` at ``path`` from now on (e.g. a node's ``/status`` once the node exists)."""
        self._server.routes = {**self._server.routes, path: route}  # replaced whole: read by other threads

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def metrics_response() -> Response:
    """This process's METRICS registry in the Prometheus text exposition format."""
    return 200, PROMETHEUS_CONTENT_TYPE, METRICS.render_prometheus().encode()


class MetricsServer(RouteServer):
    """``/metrics`` of this process, for a node's ``--metrics-port``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__({"/metrics": metrics_response}, host, port, flag="--metrics-port")

    @property
    def url(self) -> str:
        return f"{self.base_url}/metrics"


def start_metrics_server(port: int | None, host: str = "127.0.0.1") -> MetricsServer | None:
    """Serve ``/metrics`` on ``port``; None or 0 means the node exposes no metrics (the default).

    Raises :class:`HTTPPortError` with an actionable message if the port cannot be bound.
    """
    if not port:
        return None
    server = MetricsServer(host, port)
    logger.info("serving metrics at %s", server.url)
    return server
