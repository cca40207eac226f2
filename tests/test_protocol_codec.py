"""Codec: round-trips, zero-copy encode, and that hostile frames only ever raise ProtocolError."""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc
import warnings

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.protocol.codec import (
    DTYPES,
    MAGIC,
    Limits,
    Message,
    decode,
    encode,
    read_message,
    write_message,
)
from sentinel.protocol.errors import MalformedMessageError, OversizedMessageError, ProtocolError

SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3), (2, 3, 4)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 200, shape).to(dtype)


def _frame(msg: Message) -> bytes:
    return b"".join(bytes(p) for p in encode(msg))


def _raw_frame(header: object, payload: bytes = b"") -> bytes:
    header_bytes = msgpack.packb(header, use_bin_type=True)
    return MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes + payload


def _read(data: bytes, limits: Limits = Limits(), eof: bool = True) -> Message:
    async def main() -> Message:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await asyncio.wait_for(read_message(reader, limits), timeout=5)

    return asyncio.run(main())


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_dtype_and_shape(dtype_name: str, shape: tuple[int, ...]) -> None:
    tensor = _sample(DTYPES[dtype_name], shape)
    msg = Message({"step": 3, "blob": b"\x00\x01", "nested": {"b": [1, 2], "a": None}}, {"x": tensor})
    out = decode(_frame(msg))
    assert out.header == {"step": 3, "blob": b"\x00\x01", "nested": {"b": [1, 2], "a": None}}
    assert list(out.tensors) == ["x"]
    assert out.tensors["x"].dtype == tensor.dtype and out.tensors["x"].shape == tensor.shape
    assert torch.equal(out.tensors["x"], tensor)


def test_multiple_tensors_keep_order_and_noncontiguous_is_made_contiguous() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "t": base.t(),
        "bf": torch.randn(3, 2).bfloat16()[::2],
        "ids": torch.arange(5),
        "e": torch.empty(0),
    }
    msg = Message({}, dict(tensors))
    out = decode(_frame(msg))
    assert list(out.tensors) == ["t", "bf", "ids", "e"]
    for name, tensor in tensors.items():
        assert torch.equal(out.tensors[name], tensor), name


def test_message_without_tensors() -> None:
    assert decode(_frame(Message({"ping": True}))) == Message({"ping": True}, {})


def test_decoded_tensors_are_writable_and_independent() -> None:
    msg = Message({}, {"a": torch.zeros(4), "b": torch.zeros(4)})
    frame = bytearray(_frame(msg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when wrapping a read-only buffer
        out = decode(frame)
        out.tensors["a"].add_(1)
    assert torch.equal(out.tensors["b"], torch.zeros(4))
    frame[-1] ^= 0xFF  # the frame buffer is not shared with the decoded tensors
    assert torch.equal(out.tensors["b"], torch.zeros(4))


def test_encode_is_zero_copy_for_contiguous_tensors() -> None:
    tensor = torch.zeros(1024)
    parts = encode(Message({}, {"x": tensor}))
    assert isinstance(parts[1], memoryview) and parts[1].nbytes == 4096
    tensor[0] = 1.0
    assert bytes(parts[1][:4]) == struct.pack("<f", 1.0)


def test_reserved_header_key_and_bad_dtype_are_local_errors() -> None:
    with pytest.raises(ValueError):
        encode(Message({"tensors": []}))
    with pytest.raises(TypeError):
        encode(Message({}, {"x": torch.zeros(2, dtype=torch.float64)}))


@pytest.mark.parametrize("pace", [None, 40_000.0])
def test_stream_round_trip_over_loopback(pace: float | None) -> None:
    """Also paced (the trickle attack's way of sending): same bytes, and at most that fast."""
    messages = [
        Message({"i": i}, {"x": torch.randn(64, 33), "m": torch.ones(3, dtype=torch.bool)}) for i in range(3)
    ]

    async def main() -> tuple[list[Message], float]:
        received: list[Message] = []
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for _ in messages:
                received.append(await read_message(reader))
            writer.close()
            done.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.perf_counter()
            for msg in messages:
                await write_message(writer, msg, pace)
            sent_s = time.perf_counter() - t0
            await asyncio.wait_for(done.wait(), timeout=10)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        return received, sent_s

    received, sent_s = asyncio.run(main())
    if pace is not None:  # ~26 KiB at 40 KB/s: never faster than the pace (load only slows it)
        assert sent_s >= 0.9 * sum(len(b"".join(bytes(p) for p in encode(m))) for m in messages) / pace
    for sent, got in zip(messages, received, strict=True):
        assert got.header == sent.header
        assert all(torch.equal(got.tensors[k], v) for k, v in sent.tensors.items())


def test_every_truncation_is_malformed() -> None:
    frame = _frame(
        Message({"step": 1, "who": "x"}, {"a": torch.arange(3, dtype=torch.int32), "b": torch.ones(2)})
    )
    for cut in range(len(frame)):
        with pytest.raises(MalformedMessageError):
            decode(frame[:cut])
        with pytest.raises(MalformedMessageError):
            _read(frame[:cut])
    assert decode(frame).header == {"step": 1, "who": "x"}
    with pytest.raises(MalformedMessageError):
        decode(frame + b"\x00")  # trailing garbage


@pytest.mark.parametrize(
    "header",
    [
        [1, 2, 3],  # not a map
        {"tensors": "nope"},
        {},  # no descriptor list
        {1: "int key", "tensors": []},
        {"tensors": [["x", "float64", [1], 8]]},  # dtype outside the allow-list
        {"tensors": [["x", "float32", [-1], -4]]},
        {"tensors": [["x", "float32", [2], 4]]},  # nbytes inconsistent
        {"tensors": [["x", "float32", [2.0], 8]]},
        {"tensors": [["x", "float32", [True], 4]]},
        {"tensors": [["x", "float32", [1] * 7, 4]]},  # ndim > max_ndim
        {"tensors": [["x", "float32", [1], 4], ["x", "float32", [1], 4]]},  # duplicate name
        {"tensors": [[b"x", "float32", [1], 4]]},
        {"tensors": [["x", "float32", [1]]]},
    ],
)
def test_inconsistent_headers_are_malformed(header: object) -> None:
    frame = _raw_frame(header, b"\x00" * 8)
    with pytest.raises(MalformedMessageError):
        decode(frame)
    with pytest.raises(MalformedMessageError):
        _read(frame)


def test_bad_magic_and_bad_msgpack() -> None:
    frame = _frame(Message({}, {"x": torch.ones(1)}))
    with pytest.raises(MalformedMessageError, match="magic"):
        decode(b"HTTP" + frame[4:])
    bad = MAGIC + struct.pack(">I", 2) + b"\xc1\xc1"  # 0xc1 is never valid msgpack
    with pytest.raises(MalformedMessageError):
        decode(bad)
    with pytest.raises(MalformedMessageError):
        _read(bad)


def test_huge_declared_shape_is_rejected_before_allocation() -> None:
    header = {"tensors": [["x", "float32", [2**20, 2**20], 2**42]]}
    with pytest.raises(OversizedMessageError):
        decode(_raw_frame(header))
    # the stream is left open: the reader must refuse without waiting for (or allocating) the payload
    with pytest.raises(OversizedMessageError):
        _read(_raw_frame(header), eof=False)
    # just over the limit but allocatable: still nothing allocated
    limits = Limits(max_payload_bytes=64 * 2**20)
    header = {"tensors": [["x", "uint8", [64 * 2**20 + 1], 64 * 2**20 + 1]]}
    tracemalloc.start()
    try:
        with pytest.raises(OversizedMessageError):
            _read(_raw_frame(header), limits, eof=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_header_length_and_tensor_count_limits() -> None:
    with pytest.raises(OversizedMessageError):
        _read(MAGIC + struct.pack(">I", 2**31), eof=False)
    frame = _frame(Message({"pad": "x" * 200}))
    with pytest.raises(OversizedMessageError):
        decode(frame, Limits(max_header_bytes=100))
    many = Message({}, {f"t{i}": torch.zeros(1) for i in range(9)})
    with pytest.raises(OversizedMessageError):
        decode(_frame(many))
    assert len(decode(_frame(many), Limits(max_tensors=9)).tensors) == 9


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_random_garbage_raises_only_protocol_errors(data: bytes) -> None:
    for candidate in (data, MAGIC + data, MAGIC + struct.pack(">I", len(data)) + data):
        try:
            decode(candidate)
        except ProtocolError:
            pass


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8)
)
_descriptor = st.lists(
    st.one_of(_scalars, st.sampled_from(sorted(DTYPES)), st.lists(st.integers(-2, 2**40), max_size=7)),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text(max_size=6), _scalars, max_size=4),
    st.lists(_descriptor, max_size=4),
    st.binary(max_size=64),
)
def test_structured_garbage_raises_only_protocol_errors(
    header: dict, descriptors: list, payload: bytes
) -> None:
    frame = _raw_frame({**header, "tensors": descriptors}, payload)
    for parse in (decode, _read):
        try:
            parse(frame)
        except ProtocolError:
            pass
