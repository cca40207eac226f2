"""Framing of Sentinel messages: a msgpack header plus raw tensor bytes, no pickle.

Frame layout::

    b"SNT1" | u32 big-endian header length | msgpack header | payload

The header is the caller's header plus ``"tensors"``: a list of ``[name, dtype, shape, nbytes]``
descriptors; the payload is the tensors' bytes concatenated in that order (C-contiguous,
little-endian, torch's native layout). Why this shape:

- The receiver learns every size from a small, bounded header, so it validates the whole frame
  (dtypes from an allow-list, shapes, byte counts, totals) *before* reading or allocating the
  payload: a peer declaring a 2**40-element tensor costs us nothing.
- Tensors leave as zero-copy views of their buffers (``writer.writelines``); each arrives as one
  copy into a fresh bytearray, so decoded tensors are writable and independent of the frame.
- bfloat16 has no numpy dtype; raw bytes go through ``torch.frombuffer`` and uint8 views.
"""

from __future__ import annotations

import asyncio
import math
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from sentinel.protocol.errors import (
    MalformedMessageError,
    OversizedMessageError,
    StreamClosedError,
    TruncatedMessageError,
)

__all__ = [
    "MAGIC",
    "DTYPES",
    "Message",
    "Limits",
    "encode",
    "decode",
    "write_message",
    "read_message",
    "tensor_descriptors",
    "tensor_buffer",
    "frame_size",
    "as_wire_tensor",
]

MAGIC = b"SNT1"
_PREFIX = struct.Struct(">4sI")
_READ_CHUNK = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


@dataclass
class Message:
    """One protocol message: a msgpack-able header and named tensors (insertion-ordered)."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; checked before anything is read beyond the header."""

    max_header_bytes: int = 64 * 1024
    max_payload_bytes: int = 256 * 2**20
    max_tensors: int = 8
    max_ndim: int = 6


def as_wire_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The exact tensor whose bytes go on the wire: detached, on CPU, C-contiguous."""
    if tensor.dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype {tensor.dtype} is not allowed on the wire; allowed: {sorted(DTYPES)}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a CPU contiguous tensor (works for bfloat16, bool and 0-dim)."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensor_descriptors(tensors: dict[str, torch.Tensor]) -> list[list[Any]]:
    """The ``"tensors"`` header entry for these tensors; also what the signature covers."""
    out = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(
                f"tensor {name!r}: dtype {tensor.dtype} is not allowed; allowed: {sorted(DTYPES)}"
            )
        out.append(
            [name, _DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size()]
        )
    return out


def _prepare(msg: Message) -> tuple[bytes, list[memoryview]]:
    if sys.byteorder != "little":
        raise NotImplementedError(
            "the Sentinel wire format is little-endian; big-endian hosts are unsupported"
        )
    if "tensors" in msg.header:
        raise ValueError('"tensors" is a reserved header key (the codec writes the tensor descriptors there)')
    for name, tensor in list(msg.tensors.items()):
        wire = as_wire_tensor(tensor)
        if wire is not tensor:
            msg.tensors[name] = wire
    header = dict(msg.header)
    header["tensors"] = tensor_descriptors(msg.tensors)
    header_bytes = msgpack.packb(header, use_bin_type=True)
    return header_bytes, [tensor_buffer(t) for t in msg.tensors.values()]


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frame parts ready for ``writelines``/``b"".join``; tensor parts are views, not copies.

    Non-contiguous (or non-CPU) tensors are replaced *in msg.tensors* by their contiguous CPU copy,
    so that a following sign/encode of the same message hashes exactly the bytes that are sent.
    Keep the tensors unchanged until the parts are written.
    """
    header_bytes, buffers = _prepare(msg)
    return [_PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes, *buffers]


def frame_size(parts: Iterable[bytes | memoryview]) -> int:
    """Total bytes of an encoded frame (for the ``sentinel_bytes_total`` counter)."""
    return sum(memoryview(p).nbytes for p in parts)


def _check_prefix(prefix: bytes | memoryview, limits: Limits) -> int:
    magic, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise MalformedMessageError(
            f"not a Sentinel frame (magic {bytes(magic)!r}, expected {MAGIC!r}); is the peer "
            "running a compatible Sentinel version?"
        )
    if header_len > limits.max_header_bytes:
        raise OversizedMessageError(
            f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}"
        )
    return header_len


def _parse_header(header_bytes: bytes | memoryview, limits: Limits) -> tuple[dict[str, Any], list[tuple]]:
    """Unpack and validate the header; returns (user header, [(name, dtype, shape, nbytes)])."""
    try:
        header = msgpack.unpackb(header_bytes, raw=False, use_list=True)
    except Exception as e:  # msgpack raises a zoo of types (ValueError, ExtraData, FormatError, ...)
        raise MalformedMessageError(f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise MalformedMessageError(f"header must be a map, got {type(header).__name__}")
    if not all(isinstance(k, str) for k in header):
        raise MalformedMessageError("header keys must be strings")
    descriptors = header.pop("tensors", None)
    if not isinstance(descriptors, list):
        raise MalformedMessageError('header lacks the "tensors" descriptor list')
    if len(descriptors) > limits.max_tensors:
        raise OversizedMessageError(f"{len(descriptors)} tensors exceed the limit of {limits.max_tensors}")
    parsed, names, total = [], set(), 0
    for item in descriptors:
        if not (isinstance(item, list) and len(item) == 4):
            raise MalformedMessageError("tensor descriptor must be [name, dtype, shape, nbytes]")
        name, dtype, shape, nbytes = item
        if not isinstance(name, str) or name in names:
            raise MalformedMessageError(f"tensor name {name!r} is not a string or is duplicated")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise MalformedMessageError(
                f"tensor {name!r}: dtype {dtype!r} not allowed; allowed: {sorted(DTYPES)}"
            )
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise MalformedMessageError(
                f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} dims"
            )
        if not all(type(d) is int and d >= 0 for d in shape):
            raise MalformedMessageError(f"tensor {name!r}: shape {shape!r} must hold non-negative integers")
        if type(nbytes) is not int or nbytes != math.prod(shape) * _ITEMSIZE[dtype]:
            raise MalformedMessageError(
                f"tensor {name!r}: nbytes {nbytes!r} does not match shape {shape} x {dtype}"
            )
        total += nbytes
        if total > limits.max_payload_bytes:
            raise OversizedMessageError(
                f"payload of at least {total} bytes exceeds the limit of {limits.max_payload_bytes}"
            )
        parsed.append((name, dtype, tuple(shape), nbytes))
    return header, parsed


def _make_tensor(data: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses empty buffers
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


def decode(buf: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Message:
    """Parse one complete frame. Raises MalformedMessageError / OversizedMessageError only."""
    view = memoryview(buf).cast("B")
    if len(view) < _PREFIX.size:
        raise MalformedMessageError(f"frame truncated: {len(view)} bytes, shorter than the 8-byte prefix")
    header_len = _check_prefix(view[: _PREFIX.size], limits)
    offset = _PREFIX.size + header_len
    if len(view) < offset:
        raise MalformedMessageError("frame truncated inside the header")
    header, descriptors = _parse_header(view[_PREFIX.size : offset], limits)
    payload_len = sum(d[3] for d in descriptors)
    if len(view) - offset != payload_len:
        raise MalformedMessageError(f"payload is {len(view) - offset} bytes, header declares {payload_len}")
    tensors = {}
    for name, dtype, shape, nbytes in descriptors:
        tensors[name] = _make_tensor(bytearray(view[offset : offset + nbytes]), dtype, shape)
        offset += nbytes
    return Message(header, tensors)


async def write_message(writer: asyncio.StreamWriter, msg: Message, pace_bytes_per_s: float | None = None) -> None:
    """Encode and send one frame, waiting for the transport to drain (backpressure).

    ``pace_bytes_per_s`` sends it in small chunks at that rate instead: only the trickling
    availability attack (``sentinel.attacks.availability.Trickle``) asks for it.
    """
    if pace_bytes_per_s is None:
        writer.writelines(encode(msg))
        await writer.drain()
        return
    data = b"".join(bytes(part) for part in encode(msg))
    chunk = max(1, min(1024, int(pace_bytes_per_s)))
    for pos in range(0, len(data), chunk):
        writer.write(data[pos : pos + chunk])
        await writer.drain()
        await asyncio.sleep(chunk / pace_bytes_per_s)


async def _read_exactly_into(reader: asyncio.StreamReader, data: bytearray) -> None:
    view, pos = memoryview(data), 0
    while pos < len(data):
        chunk = await reader.read(min(len(data) - pos, _READ_CHUNK))
        if not chunk:
            raise TruncatedMessageError(f"frame truncated: stream ended {len(data) - pos} bytes early")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)


async def read_message(reader: asyncio.StreamReader, limits: Limits = Limits()) -> Message:
    """Read one frame, validating prefix and header before the payload is read or allocated."""
    try:
        try:
            prefix = await reader.readexactly(_PREFIX.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise StreamClosedError("stream closed before any frame byte arrived") from None
            raise
        header_len = _check_prefix(prefix, limits)
        header_bytes = await reader.readexactly(header_len)
    except asyncio.IncompleteReadError as e:
        raise TruncatedMessageError(
            f"frame truncated: stream ended {e.expected - len(e.partial)} bytes early"
        ) from None
    header, descriptors = _parse_header(header_bytes, limits)
    tensors = {}
    for name, dtype, shape, nbytes in descriptors:
        data = bytearray(nbytes)
        await _read_exactly_into(reader, data)
        tensors[name] = _make_tensor(data, dtype, shape)
    return Message(header, tensors)
