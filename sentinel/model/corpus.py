"""Text corpora as byte-token tensors, with deterministic, shardable batching.

Determinism is what lets the swarm be checked: the same (seed, index, shard) always yields the same
micro-batch on any machine, so a verifier can replay or compare a step, and the corpus fingerprint
pinned in the run manifest proves every node trains on the same data.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sentinel.model.synthetic import generate_corpus
from sentinel.model.tokenizer import ByteTokenizer

DEFAULT_CORPUS_NAME = "sentinel-synthetic-v1"


class CorpusError(Exception):
    """The corpus cannot be used; the message says what to do about it."""


@functools.lru_cache(maxsize=1)
def _default_text() -> str:
    return generate_corpus()


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass
class TextCorpus:
    """Byte tokens of one text, split once into train (the head) and val (the tail)."""

    name: str
    train: Tensor
    val: Tensor

    @classmethod
    def from_file(cls, path: str | Path, val_fraction: float = 0.1) -> TextCorpus:
        """Read a UTF-8 text file. Errors name the file and what to do instead."""
        path = Path(path)
        hint = "pass a readable UTF-8 text file, or 'default' for the generated corpus"
        if not path.exists():
            raise CorpusError(f"corpus file not found: {path} ({hint})")
        if not path.is_file():
            raise CorpusError(f"corpus path is not a file: {path} ({hint})")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CorpusError(f"cannot read corpus file {path}: {e.strerror or e} ({hint})") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus file {path} is not UTF-8 text (invalid byte at offset {e.start}); "
                              f"{hint}") from e
        if "\x00" in text:
            raise CorpusError(f"corpus file {path} contains NUL bytes and looks binary; {hint}")
        return cls.from_text(text, name=path.name, val_fraction=val_fraction)

    @classmethod
    def from_text(cls, text: str, name: str, val_fraction: float = 0.1) -> TextCorpus:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        ids = ByteTokenizer().encode(text)
        n_val = int(len(ids) * val_fraction)
        if len(ids) < 4 or n_val < 2 or len(ids) - n_val < 2:
            raise CorpusError(f"corpus {name!r} is too short ({len(ids)} bytes) to split into train and "
                              f"validation with val_fraction={val_fraction}; use a longer text")
        return cls(name=name, train=ids[: len(ids) - n_val], val=ids[len(ids) - n_val:])

    @classmethod
    def default(cls) -> TextCorpus:
        """The generated corpus (see synthetic.py): deterministic, no download."""
        return cls.from_text(_default_text(), name=DEFAULT_CORPUS_NAME)

    def _split(self, split: str) -> Tensor:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def batch(self, split: str, batch_size: int, seq_len: int, *, seed: int, index: int,
              shard: int = 0, num_shards: int = 1) -> tuple[Tensor, Tensor]:
        """Micro-batch number `index` of a data shard: (inputs [B, T], targets [B, T]) int64, targets
        being inputs shifted by one token.

        Deterministic in (split, seed, index, shard, num_shards). Shard k samples windows that lie
        entirely inside the k-th of num_shards contiguous, equal segments of the split, so different
        shards never share a token (verifiers' data shards are disjoint)."""
        data = self._split(split)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        seg = len(data) // num_shards
        lo = shard * seg
        n_starts = seg - seq_len  # a window needs seq_len + 1 tokens inside [lo, lo + seg)
        if n_starts < 1:
            raise CorpusError(f"corpus {self.name!r}: {split} split has {len(data)} tokens, too short for "
                              f"seq_len={seq_len} in {num_shards} shard(s) (each shard needs at least {seq_len + 1}); "
                              "use a longer text, a shorter seq_len or fewer shards")
        gen = _generator("sentinel-batch", split, seed, index, shard, num_shards)
        starts = lo + torch.randint(0, n_starts, (batch_size,), generator=gen)
        return self._windows(data, starts, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, count: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed evaluation set: count * batch_size windows evenly spaced over the val split."""
        n_starts = len(self.val) - seq_len
        if n_starts < 1:
            raise CorpusError(f"corpus {self.name!r}: val split has {len(self.val)} tokens, too short for "
                              f"seq_len={seq_len}; use a longer text or a larger val_fraction")
        starts = torch.linspace(0, n_starts - 1, count * batch_size, dtype=torch.float64).round().long()
        return [self._windows(self.val, chunk, seq_len) for chunk in starts.split(batch_size)]

    @staticmethod
    def _windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        windows = data[starts[:, None] + torch.arange(seq_len + 1)]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def fingerprint(self) -> str:
        """16 hex digits of BLAKE2b over the tokens and the split point: pins the exact data in the run
        manifest (two nodes with the same fingerprint train on the same bytes)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(len(self.train).to_bytes(8, "little"))
        h.update(self.train.to(torch.int64).numpy().tobytes())
        h.update(self.val.to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def load_corpus(spec: str | None) -> TextCorpus:
    """None or "default" -> the generated corpus; anything else is a path to a UTF-8 text file."""
    if spec is None or spec == "default":
        return TextCorpus.default()
    return TextCorpus.from_file(spec)
