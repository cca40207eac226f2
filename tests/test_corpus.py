"""Corpora: tokenizer round trip, deterministic and disjoint batching, clear errors, real files by path."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from sentinel.model import ByteTokenizer, CorpusError, TextCorpus, generate_corpus, load_corpus
from sentinel.model.corpus import DEFAULT_CORPUS_NAME

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus() -> TextCorpus:
    return TextCorpus.default()


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and len(ids) == len(text.encode()) and int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # a cut multi-byte character does not raise
    assert tok.encode("").shape == (0,)


def test_generated_corpus_is_deterministic_ascii_and_structured():
    a, b = generate_corpus(20_000, seed=0), generate_corpus(20_000, seed=0)
    assert a == b and len(a) == 20_000 and a.isascii()
    assert generate_corpus(20_000, seed=1) != a
    assert " = " in a and "name: " in a and ". " in a
    counts = Counter(a.encode())
    entropy = -sum(c / len(a) * math.log2(c / len(a)) for c in counts.values())
    assert 3.5 < entropy < 5.5  # English-like bytes, not random (8 bits) and not degenerate


def test_default_corpus_split_and_fingerprint(corpus):
    assert corpus.name == DEFAULT_CORPUS_NAME
    assert len(corpus.train) + len(corpus.val) == 400_000
    assert len(corpus.val) == 40_000
    assert corpus.train.dtype == torch.int64
    assert corpus.fingerprint() == load_corpus(None).fingerprint() == load_corpus("default").fingerprint()
    assert len(corpus.fingerprint()) == 16
    other = TextCorpus.from_text("x" * 1000, name="x")
    assert other.fingerprint() != corpus.fingerprint()


def test_batch_is_deterministic_and_shifted(corpus):
    x, y = corpus.batch("train", 8, 64, seed=3, index=5)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = corpus.batch("train", 8, 64, seed=3, index=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, corpus.batch("train", 8, 64, seed=3, index=6)[0])
    assert not torch.equal(x, corpus.batch("train", 8, 64, seed=4, index=5)[0])
    # every row is a real window of the text
    start = int(torch.nonzero(torch.all(corpus.train.unfold(0, 64, 1) == x[0], dim=1))[0])
    assert torch.equal(corpus.train[start + 1: start + 65], y[0])


def test_shards_are_disjoint():
    # token id == position, so a batch shows exactly which part of the text it came from
    positions = TextCorpus(name="positions", train=torch.arange(10_000), val=torch.arange(1000))
    seq_len, num_shards = 32, 4
    seen: list[set[int]] = []
    for shard in range(num_shards):
        used: set[int] = set()
        for index in range(50):
            x, y = positions.batch("train", 8, seq_len, seed=0, index=index, shard=shard, num_shards=num_shards)
            used.update(x.flatten().tolist() + y.flatten().tolist())
        seen.append(used)
    for i in range(num_shards):
        assert min(seen[i]) >= i * 2500 and max(seen[i]) < (i + 1) * 2500
        for j in range(i + 1, num_shards):
            assert not seen[i] & seen[j]
    with pytest.raises(ValueError):
        positions.batch("train", 8, seq_len, seed=0, index=0, shard=4, num_shards=4)


def test_val_batches_are_fixed_and_spread(corpus):
    a = corpus.val_batches(4, 64, count=3)
    b = corpus.val_batches(4, 64, count=3)
    assert len(a) == 3 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert a[0][0].shape == (4, 64)
    assert torch.equal(a[0][0][0], corpus.val[:64])
    assert torch.equal(a[-1][1][-1], corpus.val[-64:])


def test_errors_are_clear(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        TextCorpus.from_file(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="not a file"):
        TextCorpus.from_file(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes([0x80, 0xFF, 0x00, 0x13]) * 100)
    with pytest.raises(CorpusError, match="not UTF-8"):
        TextCorpus.from_file(binary)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"abc\x00" * 100)
    with pytest.raises(CorpusError, match="binary"):
        load_corpus(str(nul))
    with pytest.raises(CorpusError, match="too short"):
        TextCorpus.from_text("hi", name="tiny")
    short = TextCorpus.from_text("a short text. " * 4, name="short")
    with pytest.raises(CorpusError, match="seq_len=64"):
        short.batch("train", 2, 64, seed=0, index=0)
    with pytest.raises(CorpusError, match="seq_len=64"):
        short.val_batches(2, 64, count=1)
    with pytest.raises(ValueError, match="split"):
        short.batch("test", 2, 4, seed=0, index=0)


def test_reads_a_real_corpus_by_path():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared corpus not found at {SHAKESPEARE} (expected ../shared/data beside the repo)")
    corpus = load_corpus(str(SHAKESPEARE))
    assert corpus.name == "tinyshakespeare.txt"
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert len(corpus.train) + len(corpus.val) == len(text.encode())
    assert ByteTokenizer().decode(corpus.train[:9]) == text[:9]
    x, y = corpus.batch("train", 4, 64, seed=0, index=0)
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
