"""Sentinel wire protocol: identities, message framing, signatures, checks and DHT records.

Submodules, by weight:

- ``errors``, ``identity``: light (cryptography, base58); safe for the CLI to import.
- ``codec``, ``signing``, ``checks``: import torch and msgpack.
- ``records``: imports hivemind (seconds); only DHT-running code needs it.

Names are exported lazily (PEP 562) so that ``from sentinel.protocol.identity import Identity``
does not drag torch or hivemind in through this package's ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "ProtocolError",
            "MalformedMessageError",
            "OversizedMessageError",
            "ForgedSignatureError",
            "WrongSenderError",
            "WrongRunError",
            "ReplayedMessageError",
            "StaleStepError",
            "ShapeMismatchError",
            "DtypeMismatchError",
            "NonFiniteTensorError",
            "InvalidRecordError",
            "UnknownRecordError",
            "IdentityError",
        ],
        "errors",
    ),
    **dict.fromkeys(["Identity", "public_key_from_peer_id", "verify_signature"], "identity"),
    **dict.fromkeys(
        ["Message", "Limits", "DTYPES", "encode", "decode", "write_message", "read_message"], "codec"
    ),
    **dict.fromkeys(["sign_message", "verify_message", "message_digest", "canonical_packb"], "signing"),
    **dict.fromkeys(["TensorSpec", "ReplayGuard", "MessageChecker", "new_nonce", "assert_finite"], "checks"),
    **dict.fromkeys(
        ["SCHEMAS", "register_schema", "record_key", "make_value", "SentinelRecordValidator"], "records"
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
