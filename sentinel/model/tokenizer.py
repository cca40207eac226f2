"""Byte-level tokenizer: token = UTF-8 byte. No vocabulary files to ship, version or agree on."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        """UTF-8 bytes of `text` as int64 ids."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: Tensor | Iterable[int]) -> str:
        """Text from ids; byte sequences that are not valid UTF-8 (a model's sample can cut a
        multi-byte character) become U+FFFD instead of raising."""
        values = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        return bytes(values).decode("utf-8", errors="replace")
