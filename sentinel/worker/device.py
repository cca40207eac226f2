"""Where a worker computes, and how fast: ``--device auto|cpu|cuda`` and a cached self-measurement.

A joining worker announces its throughput in its stage claim; ``stage_selection.choose_stage``
uses it among equally staffed stages (the stage whose replicas are slowest in total gets the
newcomer). Measuring takes a second or two, so the figure is cached per machine, keyed by
everything that changes it (device name, model shape, stage count, micro-batch size, torch
version): a volunteer restarting their node does not pay it again, and a changed run re-measures.
Petals does the same for its blocks (``--throughput auto``, cached in the user's cache dir).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEVICES", "DeviceError", "cached_throughput", "default_cache_path", "measure_throughput",
           "resolve_device"]

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The requested device cannot be used here; the message says what to pass instead."""


def resolve_device(choice: str) -> torch.device:
    """``auto`` -> the first CUDA GPU if torch sees one, else the CPU; ``cuda`` must exist."""
    if choice not in DEVICES:
        raise DeviceError(f"--device {choice!r}: choose one of {', '.join(DEVICES)}")
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise DeviceError("--device cuda: torch sees no CUDA GPU on this machine (driver, or a CPU-only torch "
                          "build?); use --device cpu or auto")
    return torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{os.cpu_count()}x:{torch.get_num_threads()}threads"


def measure_throughput(manifest: Any, device: torch.device, budget_s: float = 1.5) -> float:
    """Training tokens/s of one middle stage of ``manifest``'s model on ``device`` (forward +
    backward + optimizer step on a synthetic micro-batch), timed for about ``budget_s`` after
    one warm-up pass. A middle stage is what most replicas serve; the ends add an embedding or
    a head whose cost the same device scales alike."""
    from sentinel.model.stages import build_stage

    stages = manifest.num_stages
    stage = stages // 2 if stages > 2 else stages - 1
    module = build_stage(manifest.model, stage, stages, seed=0).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = manifest.training.micro_batch_size
    seq = manifest.model.seq_len
    gen = torch.Generator().manual_seed(0)
    if module.is_first:
        x = torch.randint(0, manifest.model.vocab_size, (batch, seq), generator=gen)
    else:
        x = torch.randn((batch, seq, manifest.model.d_model), generator=gen)
    targets = torch.randint(0, manifest.model.vocab_size, (batch, seq), generator=gen).to(device)
    x = x.to(device)

    def one() -> None:
        out = module(x, targets if module.is_last else None)
        (out if out.dim() == 0 else out.float().pow(2).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()  # warm-up: allocation, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    passes, t0 = 0, time.perf_counter()
    while True:
        one()
        passes += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s or passes >= 1000:
            break
    return passes * batch * seq / elapsed


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sentinel" / "throughput.json"


def _cache_key(manifest: Any, device: torch.device) -> str:
    blob = json.dumps({"device": _device_name(device), "model": manifest.model.to_dict(),
                       "stages": manifest.num_stages, "batch": manifest.training.micro_batch_size,
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def cached_throughput(manifest: Any, device: torch.device, path: Path | None = None,
                      measure: Any = measure_throughput) -> tuple[float, bool]:
    """(tokens/s, whether it came from the cache). An unreadable or corrupt cache is measured over
    (and rewritten), never fatal: it is only an optimisation."""
    path = path or default_cache_path()
    key = _cache_key(manifest, device)
    entries: dict[str, Any] = {}
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    hit = entries.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("tokens_per_s"), (int, float)) and hit["tokens_per_s"] > 0:
        return float(hit["tokens_per_s"]), True
    value = float(measure(manifest, device))
    entries[key] = {"tokens_per_s": value, "device": _device_name(device), "measured_at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("cannot cache the throughput measurement in %s: %s", path, e)
    return value, False
