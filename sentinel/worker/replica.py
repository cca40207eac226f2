"""What a stage replica is right now, shared by its worker and the helpers that act for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Replica:
    """The stage a worker serves, the newest pipeline step it has seen, and that stage's compute.

    The worker updates it (a move to another stage replaces ``runner``); its averaging reads it
    at the moment it acts, so a helper never holds a stale stage or parameter state.
    """

    stage: int = -1  # -1 until the worker has chosen its stage
    step: int = 0  # highest pipeline step seen in a request: it dates signed replies
    runner: Any = None  # the stage's StageRunner (or anything with its parameter methods)
