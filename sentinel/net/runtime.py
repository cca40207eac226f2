"""The networking core every role shares: one p2pd daemon, one in-process DHT node, signed records.

Design notes (why it looks like this):
- One P2P daemon per node, whose identity is the node's Ed25519 key, so a PeerID *is* a signing
  key and every message and DHT record can be checked against its sender alone.
- The DHT node runs inside the node's own asyncio loop (``DHTNode`` over the same P2P) rather
  than in a separate process as ``hivemind.DHT`` does: on a 2-core volunteer box a dozen extra
  Python processes cost more than they isolate, and tensors never cross a process boundary.
  Torch compute runs in a worker thread so the loop stays responsive.
- Records are re-announced on a heartbeat with a TTL of several heartbeats (a store made before
  a node has peers is lost, and a dead node's records expire on their own).
- Tensors travel over stream handlers, never unary calls (4 MiB cap, silent hangs).
- p2pd is started so that it dies with its node even on SIGKILL (PR_SET_PDEATHSIG), so a
  crashed volunteer never leaves an orphan daemon holding its identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from sentinel.metrics import METRICS
from sentinel.protocol.codec import Limits, Message, read_message, write_message
from sentinel.protocol.errors import ProtocolError, StreamClosedError
from sentinel.protocol.identity import Identity
from sentinel.protocol.records import SentinelRecordValidator, make_value
from sentinel.protocol.signing import sign_message

logger = logging.getLogger(__name__)

Handler = Callable[[Message, str], Awaitable[Message]]

# A handler may ask for its reply to be sent slowly (bytes/s): the trickling availability attack
# (``sentinel.attacks.availability.Trickle``) sets it. A ContextVar because the handler runs in
# the stream's own task, so the value set inside it is seen by ``serve`` and by no other stream.
REPLY_PACE: ContextVar[float | None] = ContextVar("sentinel_reply_pace", default=None)


class BootstrapUnreachableError(RuntimeError):
    """None of the --initial-peers answered."""


class PeerCallError(RuntimeError):
    """A remote call failed (timeout, connection, or the peer answered with an error)."""

    def __init__(self, message: str, reason: str = "call_failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class NetworkConfig:
    """How a node joins the swarm. Flags of every CLI mirror these fields."""

    initial_peers: list[str] = field(default_factory=list)  # multiaddrs ending in /p2p/<peer id>
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] | None = None
    identity_path: str | None = None  # created on first run (mode 0600); None = ephemeral identity
    startup_timeout: float = 60.0  # p2pd start on a loaded 2-core machine can take tens of seconds
    heartbeat_s: float = 3.0  # re-announce period for DHT records
    record_ttl_s: float = 15.0  # >= 2x heartbeat so one missed beat does not drop a node
    dht_wait_timeout: float = 5.0
    max_message_bytes: int = 64 * 2**20


def _die_with_parent() -> None:  # runs in the forked p2pd child before exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _p2pd_dies_with_us():
    """Make the p2pd child get SIGTERM if this process dies, however it dies."""
    orig = asyncio.subprocess.create_subprocess_exec

    async def patched(*args: Any, **kwargs: Any):
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return await orig(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = patched  # type: ignore[assignment]
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = orig  # type: ignore[assignment]


def peer_id_of_maddr(maddr: str) -> str:
    """The peer id at the end of a multiaddr, with an actionable error for anything else."""
    parts = str(maddr).strip().split("/")
    if len(parts) < 3 or parts[0] != "" or "p2p" not in parts or not parts[-1] or parts[-2] != "p2p":
        raise ValueError(f"initial peer {maddr!r} is not a multiaddr ending in /p2p/<peer id>, "
                         "e.g. /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW...")
    return parts[-1]


class SwarmRuntime:
    """A joined node: identity, P2P daemon, DHT node, record heartbeat, stream RPC."""

    def __init__(self, config: NetworkConfig, identity: Identity, p2p: P2P, dht: DHTNode):
        self.config = config
        self.identity = identity
        self.peer_id = identity.peer_id
        self.p2p = p2p
        self.dht = dht
        self.limits = Limits(max_payload_bytes=config.max_message_bytes)
        self._announcements: dict[str, Callable[[], dict[str, Any] | None]] = {}
        self._heartbeat_task: asyncio.Task | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    async def create(cls, config: NetworkConfig, identity: Identity | None = None) -> SwarmRuntime:
        if identity is None:
            identity = Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()
        for maddr in config.initial_peers:
            peer_id_of_maddr(maddr)  # fail fast with a clear message on a malformed flag
        identity_file = config.identity_path
        tmp_identity = None
        if identity_file is None:
            import tempfile

            tmp_identity = tempfile.NamedTemporaryFile(prefix="sentinel-id-", delete=False)
            tmp_identity.close()
            identity.save(tmp_identity.name)
            identity_file = tmp_identity.name
        try:
            with _p2pd_dies_with_us():
                p2p = await P2P.create(
                    initial_peers=config.initial_peers or None,
                    host_maddrs=config.host_maddrs,
                    announce_maddrs=config.announce_maddrs,
                    identity_path=identity_file,
                    startup_timeout=config.startup_timeout,
                    check_if_identity_free=False,  # hivemind's check only understands RSA identities
                    idle_timeout=3600 * 24 * 365,
                )
        except Exception as e:
            msg = str(e)
            if "address already in use" in msg.lower() or "bind" in msg.lower():
                raise RuntimeError(f"cannot listen on {config.host_maddrs}: port taken ({msg})") from e
            raise
        finally:
            if tmp_identity is not None:
                with contextlib.suppress(OSError):
                    import os

                    os.unlink(tmp_identity.name)
        try:
            dht = await DHTNode.create(
                p2p=p2p,
                initial_peers=config.initial_peers or None,
                record_validator=SentinelRecordValidator(identity),
                wait_timeout=config.dht_wait_timeout,
                bootstrap_timeout=config.startup_timeout,
                cache_locally=False,  # records change every heartbeat; a stale local cache misleads routing
                cache_on_store=False,
                cache_nearest=0,
                blacklist_time=1.0,
                ensure_bootstrap_success=True,
            )
        except RuntimeError as e:
            await p2p.shutdown()
            if "bootstrap failed" in str(e):
                raise BootstrapUnreachableError(
                    f"bootstrap peer unreachable: none of {config.initial_peers} answered; "
                    "check --initial-peers and that the bootstrap peer is running"
                ) from e
            raise
        except BaseException:
            await p2p.shutdown()
            raise
        self = cls(config, identity, p2p, dht)
        self._heartbeat_task = asyncio.create_task(self._heartbeat())
        return self

    async def visible_maddrs(self) -> list[str]:
        return [f"{m}/p2p/{self.peer_id}" if "/p2p/" not in str(m) else str(m) for m in await self.p2p.get_visible_maddrs()]

    async def shutdown(self, final_records: dict[str, dict[str, Any]] | None = None) -> None:
        """Publish final records (e.g. OFFLINE), then stop the DHT and p2pd."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat_task
        if final_records:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*(self.store(k, v, ttl=self.config.record_ttl_s) for k, v in final_records.items())),
                    timeout=5,
                )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.dht.shutdown(), timeout=5)
        with contextlib.suppress(Exception):
            await self.p2p.shutdown()

    # -- DHT records ---------------------------------------------------------------------------
    async def store(self, key: str, value: dict[str, Any], ttl: float | None = None) -> bool:
        """Store ``value`` (from ``make_value``) under ``key`` in this node's own subkey."""
        ttl = self.config.record_ttl_s if ttl is None else ttl
        try:
            return bool(await self.dht.store(key, value, get_dht_time() + ttl, subkey=self.peer_id))
        except Exception as e:  # noqa: BLE001 - a DHT hiccup must not kill a node
            logger.debug("DHT store of %s failed: %s", key, e)
            return False

    async def get(self, key: str) -> dict[str, dict[str, Any]]:
        """All valid, unexpired records under ``key``: owner peer id -> payload."""
        try:
            found = await self.dht.get(key, latest=True)
        except Exception as e:  # noqa: BLE001
            logger.debug("DHT get of %s failed: %s", key, e)
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for subkey, item in found.value.items():
            payload = item.value
            if isinstance(subkey, str) and isinstance(payload, dict):
                out[subkey] = payload
        return out

    def announce(self, key: str, make: Callable[[], dict[str, Any] | None]) -> None:
        """Re-store ``make()`` under ``key`` on every heartbeat (None = skip this beat)."""
        self._announcements[key] = make

    def stop_announcing(self, key: str) -> None:
        self._announcements.pop(key, None)

    async def announce_now(self) -> None:
        items = list(self._announcements.items())
        values = [(k, make()) for k, make in items]
        await asyncio.gather(*(self.store(k, v) for k, v in values if v is not None))

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.announce_now()
            except Exception as e:  # noqa: BLE001
                logger.warning("heartbeat failed: %s", e)
            await asyncio.sleep(self.config.heartbeat_s)

    # -- stream RPC ----------------------------------------------------------------------------
    async def serve(self, name: str, handler: Handler) -> None:
        """Register a stream handler: one request message in, one response message out.

        Protocol errors become a signed error response plus a counted metric; any other
        exception is logged and answered as an internal error. Nothing propagates: a malformed
        or hostile request never takes the node down.
        """

        async def on_stream(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = info.peer_id.to_base58()
            try:
                REPLY_PACE.set(None)
                try:
                    request = await read_message(reader, self.limits)
                    METRICS.inc("sentinel_bytes_total", _approx_size(request), direction="in")
                    response = await handler(request, remote)
                except StreamClosedError:
                    return
                except ProtocolError as e:
                    METRICS.inc("sentinel_rejected_messages_total", reason=e.reason)
                    logger.info("rejected %s from %s: %s", name, remote[-8:], e)
                    response = self.error_message(e.reason, str(e))
                except PeerCallError as e:
                    response = self.error_message(e.reason, str(e))
                except Exception as e:  # noqa: BLE001
                    logger.exception("handler %s failed", name)
                    METRICS.inc("sentinel_handler_errors_total", handler=name)
                    response = self.error_message("internal", f"{type(e).__name__}: {e}")
                await write_message(writer, response, REPLY_PACE.get())
                METRICS.inc("sentinel_bytes_total", _approx_size(response), direction="out")
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        await self.p2p.add_binary_stream_handler(name, on_stream)

    def error_message(self, reason: str, text: str) -> Message:
        msg = Message(header={"direction": "error", "reason": reason, "error": text[:2000]}, tensors={})
        return sign_message(msg, self.identity)

    async def call(self, peer_id: str, name: str, request: Message, timeout: float) -> Message:
        """Send one signed request over a fresh stream and read one response, within ``timeout``."""

        async def _go() -> Message:
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), name)
            try:
                await write_message(writer, request)
                return await read_message(reader, self.limits)
            finally:
                writer.close()

        t0 = time.perf_counter()
        try:
            response = await asyncio.wait_for(_go(), timeout=timeout)
        except asyncio.TimeoutError as e:
            raise PeerCallError(f"{name} to {peer_id[-8:]} timed out after {timeout:.1f}s", "timeout") from e
        except StreamClosedError as e:
            raise PeerCallError(f"{peer_id[-8:]} closed the {name} stream without answering", "closed") from e
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - p2pd control errors come in many types
            raise PeerCallError(f"{name} to {peer_id[-8:]} failed: {type(e).__name__}: {e}", "unreachable") from e
        METRICS.inc("sentinel_rpc_seconds_total", time.perf_counter() - t0, handler=name)
        if response.header.get("direction") == "error":
            raise PeerCallError(
                f"{peer_id[-8:]} answered {name} with error: {response.header.get('error')}",
                str(response.header.get("reason", "remote_error")),
            )
        return response

    def record_value(self, kind: str, key: str, run: str, **fields: Any) -> dict[str, Any]:
        return make_value(kind, key, run, **fields)


def _approx_size(msg: Message) -> int:
    return sum(t.numel() * t.element_size() for t in msg.tensors.values())
