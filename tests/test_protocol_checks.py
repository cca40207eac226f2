"""Signing and message checks: each attack or mistake raises its own, specific error type."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sentinel.metrics import METRICS
from sentinel.protocol.checks import MessageChecker, ReplayGuard, TensorSpec, assert_finite, new_nonce
from sentinel.protocol.codec import Message, decode, encode
from sentinel.protocol.errors import (
    DtypeMismatchError,
    ForgedSignatureError,
    MalformedMessageError,
    NonFiniteTensorError,
    ReplayedMessageError,
    ShapeMismatchError,
    StaleStepError,
    WrongRunError,
    WrongSenderError,
)
from sentinel.protocol.identity import Identity
from sentinel.protocol.signing import canonical_packb, message_digest, sign_message, verify_message

RUN = "run-test"
ALICE, BOB = Identity.generate(), Identity.generate()
SPEC = {"x": TensorSpec("float32", (None, 4))}


def _message(
    identity: Identity = ALICE, *, step: int = 5, tensors: dict | None = None, **header: Any
) -> Message:
    base = {
        "run": RUN,
        "step": step,
        "micro_batch": 1,
        "stage": 2,
        "direction": "forward",
        "nonce": new_nonce(),
    }
    msg = Message({**base, **header}, tensors if tensors is not None else {"x": torch.randn(3, 4)})
    return sign_message(msg, identity)


def _wire(msg: Message) -> Message:
    return decode(b"".join(bytes(p) for p in encode(msg)))


def test_sign_encode_decode_verify_round_trip() -> None:
    msg = _message(tensors={"x": torch.randn(4, 6).t(), "bf": torch.randn(3).bfloat16(), "e": torch.empty(0)})
    received = _wire(msg)
    verify_message(received)
    MessageChecker(RUN).check(received, expected_sender=ALICE.peer_id)
    assert received.header["sender"] == ALICE.peer_id and len(received.header["digest"]) == 32


def test_digest_is_independent_of_header_order() -> None:
    msg = _message()
    reordered = Message(dict(reversed(list(msg.header.items()))), msg.tensors)
    assert message_digest(reordered) == msg.header["digest"]
    assert canonical_packb({"b": {"y": 1, "x": 2}, "a": (1,)}) == canonical_packb(
        {"a": [1], "b": {"x": 2, "y": 1}}
    )


def test_flipping_one_payload_byte_fails() -> None:
    frame = bytearray(b"".join(bytes(p) for p in encode(_message())))
    frame[-3] ^= 0x01
    with pytest.raises(ForgedSignatureError):
        verify_message(decode(frame))


@pytest.mark.parametrize("field,value", [("step", 6), ("stage", 3), ("direction", "backward"), ("extra", 1)])
def test_changing_one_header_field_fails(field: str, value: Any) -> None:
    received = _wire(_message())
    received.header[field] = value
    with pytest.raises(ForgedSignatureError):
        MessageChecker(RUN).check(received)


def test_tensor_renamed_or_reshaped_fails() -> None:
    received = _wire(_message())
    received.tensors["y"] = received.tensors.pop("x")
    with pytest.raises(ForgedSignatureError):
        verify_message(received)
    received = _wire(_message())
    received.tensors["x"] = received.tensors["x"].reshape(4, 3)
    with pytest.raises(ForgedSignatureError):
        verify_message(received)


def test_forged_sender_signed_by_a_claims_b() -> None:
    # A signs, then rewrites the sender to B: the digest no longer matches.
    msg = _message(ALICE)
    msg.header["sender"] = BOB.peer_id
    with pytest.raises(ForgedSignatureError):
        MessageChecker(RUN).check(_wire(msg), expected_sender=BOB.peer_id)
    # A recomputes a consistent digest naming B but can only sign it with A's key.
    msg.header["digest"] = message_digest(msg)
    msg.header["signature"] = ALICE.sign(msg.header["digest"])
    with pytest.raises(ForgedSignatureError):
        MessageChecker(RUN).check(_wire(msg), expected_sender=BOB.peer_id)


def test_wrong_sender() -> None:
    with pytest.raises(WrongSenderError):
        MessageChecker(RUN).check(_wire(_message(ALICE)), expected_sender=BOB.peer_id)
    msg = _message()
    msg.header["sender"] = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    with pytest.raises(WrongSenderError):
        MessageChecker(RUN).check(msg)


def test_wrong_run() -> None:
    with pytest.raises(WrongRunError, match="run-test"):
        MessageChecker("other-run").check(_wire(_message()))


def test_replayed_nonce_and_stale_step() -> None:
    checker = MessageChecker(RUN, replay_window=4)
    first = _message(step=10)
    checker.check(_wire(first))
    with pytest.raises(ReplayedMessageError):
        checker.check(_wire(first))
    checker.check(_wire(_message(step=6)))  # within the window
    with pytest.raises(StaleStepError):
        checker.check(_wire(_message(step=5)))
    checker.check(_wire(_message(BOB, step=0)))  # windows are per sender
    checker.check(_wire(first), check_replay=False)


def test_wrong_shape_and_dtype_and_names() -> None:
    checker = MessageChecker(RUN)
    checker.check(_wire(_message(tensors={"x": torch.randn(7, 4)})), expected=SPEC)  # None = any size
    with pytest.raises(ShapeMismatchError):
        checker.check(_wire(_message(tensors={"x": torch.randn(3, 5)})), expected=SPEC)
    with pytest.raises(ShapeMismatchError):
        checker.check(_wire(_message(tensors={"x": torch.randn(3, 4, 1)})), expected=SPEC)
    with pytest.raises(DtypeMismatchError):
        checker.check(_wire(_message(tensors={"x": torch.randn(3, 4).half()})), expected=SPEC)
    with pytest.raises(ShapeMismatchError):
        checker.check(_wire(_message(tensors={"y": torch.randn(3, 4)})), expected=SPEC)
    with pytest.raises(ShapeMismatchError):
        checker.check(_wire(_message(tensors={})), expected=SPEC)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(dtype: torch.dtype, bad: float) -> None:
    tensor = torch.randn(5, 4).to(dtype)
    tensor[3, 1] = bad
    with pytest.raises(NonFiniteTensorError):
        MessageChecker(RUN).check(_wire(_message(tensors={"x": tensor})))


def test_large_finite_values_are_accepted() -> None:
    big = torch.full((1000, 4), 3e38)  # a sum of these would overflow to inf
    big[::2] *= -1
    MessageChecker(RUN).check(_wire(_message(tensors={"x": big})))
    assert_finite("h", torch.full((100,), 60000.0).half())
    assert_finite("ids", torch.arange(10))  # integer tensors cannot be non-finite


@pytest.mark.parametrize("size", [1, 7, 16, 33, 1000, 70001])
def test_assert_finite_every_position(size: int) -> None:
    for position in {0, size // 2, size - 1}:
        for bad in (float("nan"), float("inf"), float("-inf")):
            tensor = torch.zeros(size)
            tensor[position] = bad
            with pytest.raises(NonFiniteTensorError):
                assert_finite("x", tensor)


@pytest.mark.parametrize(
    "field,value",
    [
        ("run", None),
        ("step", "5"),
        ("step", True),
        ("step", -1),
        ("micro_batch", 1.0),
        ("stage", None),
        ("direction", 0),
        ("nonce", b"short"),
        ("nonce", "x" * 16),
        ("digest", b"x"),
        ("signature", None),
    ],
)
def test_malformed_headers(field: str, value: Any) -> None:
    msg = _wire(_message())
    if value is None:
        del msg.header[field]
    else:
        msg.header[field] = value
    with pytest.raises(MalformedMessageError):
        MessageChecker(RUN).check(msg)


def test_rejections_are_counted_by_reason() -> None:
    before = METRICS.get("sentinel_rejected_messages_total", reason="wrong_run")
    with pytest.raises(WrongRunError):
        MessageChecker("elsewhere").check(_wire(_message()))
    assert METRICS.get("sentinel_rejected_messages_total", reason="wrong_run") == before + 1


def test_replay_guard_memory_is_bounded_and_fails_closed() -> None:
    guard = ReplayGuard(window=100, max_senders=2, max_nonces_per_sender=3)
    for step in (1, 2, 3):
        guard.check_and_record("a", step, b"n%d" % step)
    guard.check_and_record("a", 4, b"n4")  # evicts step 1, which becomes stale instead of replayable
    with pytest.raises(StaleStepError):
        guard.check_and_record("a", 1, b"n1")
    with pytest.raises(ReplayedMessageError):
        guard.check_and_record("a", 4, b"n4")
    guard.check_and_record("b", 1, b"x")
    guard.check_and_record("c", 1, b"x")  # evicts the least recently seen sender ("a")
    assert len(guard._senders) == 2
    with pytest.raises(ValueError):
        ReplayGuard(window=-1)


def test_new_nonce() -> None:
    assert len(new_nonce()) == 16 and new_nonce() != new_nonce()
