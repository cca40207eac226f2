"""Lockstep's promise, checked from outside: every replica of a stage answers the same input
with the same bits.

After training, the verifier sends one validation micro-batch through the pipeline and, at each
stage, the same input to every replica of that stage: a forward in "eval" mode and a backward in
"probe" mode (neither changes the replica's next update). Replicas of a lockstep stage at the
same version must agree bit for bit and sign the same parameter digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import torch

from sentinel.verifier.driver import HopError, HopResult

PROBE_MICRO_BATCH = 20_000  # micro-batch number of the probe hops (apart from training and eval ones)


class ProbeTransport(Protocol):
    async def forward(self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
                      targets: torch.Tensor | None, mode: str, timeout: float) -> HopResult: ...

    async def backward(self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
                       grad: torch.Tensor | None, targets: torch.Tensor | None, timeout: float,
                       mode: str = "train") -> HopResult: ...


def _identical(results: dict[str, HopResult]) -> bool | None:
    tensors = [r.tensor for r in results.values() if r.tensor is not None]
    if len(tensors) < 2:
        return None
    return all(t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors[1:])


def _stamps(results: dict[str, HopResult]) -> dict[str, list]:
    return {"versions": sorted({r.meta.get("version") for r in results.values()}, key=str),
            "digests": len({r.meta.get("params_digest") for r in results.values()})}


async def _ask_all(workers: list[str], call: Callable[[str], Awaitable[HopResult]]) -> dict[str, HopResult]:
    """Every worker at once (a silent one costs the probe one timeout, not one per replica); the
    answers of those that answered."""
    got = await asyncio.gather(*(call(w) for w in workers), return_exceptions=True)
    for r in got:
        if isinstance(r, BaseException) and not isinstance(r, (HopError, asyncio.TimeoutError)):
            raise r
    return {w: r for w, r in zip(workers, got, strict=True) if isinstance(r, HopResult)}


async def replica_agreement(transport: ProbeTransport, replicas: list[list[str]], step: int, x: torch.Tensor,
                            targets: torch.Tensor, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Per stage: how many replicas answered, the versions and distinct digests they signed, and
    whether their forward and backward answers to the same input are bit-identical (None where
    fewer than two answered, or on stage 0's backward, which returns nothing)."""
    num_stages = len(replicas)
    inputs: list[torch.Tensor] = []
    rows: list[dict[str, Any]] = []
    h = x
    for s in range(num_stages):
        tg = targets if s == num_stages - 1 else None
        answers = await _ask_all(replicas[s], lambda w, s=s, h=h, tg=tg: transport.forward(
            w, s, step, PROBE_MICRO_BATCH, h, tg, "eval", timeout))
        inputs.append(h)
        rows.append({"stage": s, "replicas": len(replicas[s]), "answered": len(answers),
                     "forward_identical": _identical(answers), **_stamps(answers)})
        if not answers:
            return rows
        h = next(iter(answers.values())).tensor
    grad: torch.Tensor | None = None
    for s in reversed(range(num_stages)):
        tg = targets if s == num_stages - 1 else None
        answers = await _ask_all(replicas[s], lambda w, s=s, grad=grad, tg=tg: transport.backward(
            w, s, step, PROBE_MICRO_BATCH, inputs[s], grad, tg, timeout, mode="probe"))
        rows[s]["backward_identical"] = _identical(answers) if s > 0 else None
        rows[s]["backward_answered"] = len(answers)
        if s > 0:
            if not answers:
                break
            grad = next(iter(answers.values())).tensor
    return rows
