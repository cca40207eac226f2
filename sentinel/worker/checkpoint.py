"""A worker's stage on disk: parameters, optimizer state and step, written atomically.

A volunteer's machine reboots, the process is killed, the laptop lid closes: the worker restarts
with ``--checkpoint-dir`` and resumes its stage where it left off, or, when live replicas of the
stage are further along, adopts their state instead (``WorkerNode._join_from_replica``; hivemind's
load-state-from-peers idiom). The file is written to a temporary name and renamed over the old
one, so a crash mid-write leaves the previous checkpoint intact, never a torn one. It is loaded
with ``torch.load(weights_only=True)``: tensors and plain values only, no pickled code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "CheckpointError", "checkpoint_path", "find_checkpoints", "load_checkpoint",
           "save_checkpoint"]

FORMAT = 1


class CheckpointError(ValueError):
    """The checkpoint cannot be used for this run and stage; the message says why."""


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:120] or "run"


def checkpoint_path(directory: Path, run_id: str, stage: int) -> Path:
    return Path(directory) / f"{_safe(run_id)}-stage{stage}.pt"


def find_checkpoints(directory: Path, run_id: str) -> dict[int, Path]:
    """stage -> checkpoint file of ``run_id`` in ``directory`` (none if it does not exist)."""
    d = Path(directory)
    if not d.is_dir():
        return {}
    pattern = re.compile(re.escape(_safe(run_id)) + r"-stage(\d+)\.pt$")
    found = {}
    for p in d.iterdir():
        m = pattern.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def save_checkpoint(runner: Any, path: Path, run_id: str, max_step: int = 0) -> Path:
    """Write ``runner``'s stage (module, optimizer, optimizer-step count) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT, "run_id": run_id, "stage": runner.stage, "num_stages": runner.manifest.num_stages,
        "model": runner.manifest.model.to_dict(), "version": int(runner.version), "max_step": int(max_step),
        "module": {k: v.detach().cpu() for k, v in runner.module.state_dict().items()},
        "optimizer": runner.optimizer.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(runner: Any, path: Path, run_id: str) -> dict[str, Any]:
    """Load ``path`` into ``runner``; returns ``{"version", "max_step"}``. Raises
    :class:`CheckpointError` (and changes nothing) if the file is unreadable or belongs to another
    run, stage or model."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torn, truncated, not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sentinel stage checkpoint (format {FORMAT})")
    m = runner.manifest
    for what, want, got in (("run", run_id, state.get("run_id")), ("stage", runner.stage, state.get("stage")),
                            ("stage count", m.num_stages, state.get("num_stages")),
                            ("model", m.model.to_dict(), state.get("model"))):
        if want != got:
            raise CheckpointError(f"{path} is for {what} {got!r}, this worker serves {what} {want!r}")
    own = runner.module.state_dict()
    saved = state.get("module")
    if not isinstance(saved, dict) or set(saved) != set(own) or any(
            not isinstance(saved[k], torch.Tensor) or saved[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{path} does not fit this stage: its parameters differ in names or shapes")
    module_before = {k: v.clone() for k, v in own.items()}
    try:
        runner.module.load_state_dict(saved)
        runner.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        runner.module.load_state_dict(module_before)
        raise CheckpointError(f"{path} does not fit this stage: {e}") from None
    runner.restored(int(state.get("version", 0)))
    return {"version": runner.version, "max_step": int(state.get("max_step", 0))}
