"""The event loop every node runs on: uvloop where it is installed, asyncio's own otherwise.

hivemind depends on uvloop, so a node installed with ``pip install .`` has it. Small stream RPCs
are faster on it (``bench/rpc_latency.py`` compares the two).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """"uvloop" when nodes run on it here, else "asyncio"."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run(main)`` on uvloop when it is installed (and ``use_uvloop``)."""
    if use_uvloop and loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
