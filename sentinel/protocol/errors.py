"""Error types of the wire protocol.

Every rejection of something received from the network is a :class:`ProtocolError` subclass with
a class attribute ``reason``: a short snake_case label used as the ``reason`` label of the
rejection counters in :mod:`sentinel.metrics` and sent back to the peer, so a volunteer sees the
same word in their log as the operator sees on the dashboard. Messages say what was wrong and,
where the sender can do something about it, what to do.

:class:`IdentityError` is deliberately *not* a ProtocolError: it is a local configuration problem
(an unreadable key file), raised at start-up, never caused by a remote peer.
"""

from __future__ import annotations

from typing import Any


class ProtocolError(Exception):
    """Something received from a peer is unusable. Never fatal for the receiving node."""

    reason: str = "protocol_error"

    def as_header(self) -> dict[str, Any]:
        """A msgpack-able error reply so the sender learns why its message was refused."""
        return {"error": self.reason, "message": str(self)}


class MalformedMessageError(ProtocolError):
    """Bytes that do not parse as a Sentinel frame or header (bad magic, truncation, bad msgpack...)."""

    reason = "malformed"


class TruncatedMessageError(MalformedMessageError):
    """A frame whose stream ended mid-way: what a call cut by its timeout or a peer shutting down
    looks like, counted apart from bytes that do not parse (``malformed``)."""

    reason = "truncated"


class StreamClosedError(MalformedMessageError):
    """The peer closed the stream without sending a single byte (no handler yet, or it died).

    An availability fault rather than a malformed message: callers route around it instead of
    striking the peer.
    """

    reason = "closed"


class OversizedMessageError(ProtocolError):
    """A frame or header larger than the receiver's limits; rejected before it is read."""

    reason = "oversized"


class ForgedSignatureError(ProtocolError):
    """The digest or signature does not match the content and the claimed sender's key."""

    reason = "forged_signature"


class WrongSenderError(ProtocolError):
    """The sender field is missing, not an Ed25519 peer id, or not the peer we expected."""

    reason = "wrong_sender"


class WrongRunError(ProtocolError):
    """The message belongs to another training run (stale volunteer config, or a mix-up)."""

    reason = "wrong_run"


class ReplayedMessageError(ProtocolError):
    """A nonce seen before from the same sender: a replay, or a sender reusing nonces on retry."""

    reason = "replayed"


class StaleStepError(ProtocolError):
    """A step older than the receiver's replay window for that sender."""

    reason = "stale_step"


class ShapeMismatchError(ProtocolError):
    """Tensor names or shapes differ from what the run manifest prescribes."""

    reason = "wrong_shape"


class DtypeMismatchError(ProtocolError):
    """A tensor dtype differs from what the run manifest prescribes."""

    reason = "wrong_dtype"


class NonFiniteTensorError(ProtocolError):
    """A floating tensor contains NaN or +-Inf."""

    reason = "non_finite"


class InvalidRecordError(ProtocolError):
    """A DHT record fails its signature, binding or schema check."""

    reason = "invalid_record"


class UnknownRecordError(InvalidRecordError):
    """A DHT record of a kind no schema is registered for (newer software, or junk)."""

    reason = "unknown_record"


class IdentityError(Exception):
    """The node's identity file cannot be used (missing directory, unreadable, not an Ed25519 key)."""
