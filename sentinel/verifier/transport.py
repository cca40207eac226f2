"""The live swarm's side of the driver: stage calls as signed messages over P2P streams.

Every response is checked before the driver sees it: signed by the worker that was called,
bound to our request by digest, same run/step/stage, dtype and shape from the manifest, finite.
A response that fails any check is an integrity fault (a strike), not a network hiccup.
"""

from __future__ import annotations

import torch

from sentinel.metrics import METRICS
from sentinel.net.runtime import PeerCallError, SwarmRuntime
from sentinel.protocol import rpc as wire
from sentinel.protocol.checks import MessageChecker
from sentinel.protocol.errors import ProtocolError
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import RunManifest
from sentinel.verifier.driver import HopError, HopResult


class P2PTransport:
    def __init__(self, runtime: SwarmRuntime, manifest: RunManifest):
        self.runtime = runtime
        self.manifest = manifest
        self.checker = MessageChecker(manifest.run_id)
        self._replicas: dict[int, list[str]] = {s: [] for s in range(manifest.num_stages)}

    def set_replicas(self, stage: int, workers: list[str]) -> None:
        self._replicas[stage] = list(workers)

    def replicas(self, stage: int) -> list[str]:
        return self._replicas.get(stage, [])

    async def _call(self, worker: str, handler: str, stage: int, step: int, micro_batch: int, direction: str,
                    tensors: dict[str, torch.Tensor], timeout: float, **extra) -> HopResult:
        req = wire.request(self.manifest.run_id, step, micro_batch, stage, direction, tensors, **extra)
        sign_message(req, self.runtime.identity)
        try:
            resp = await self.runtime.call(worker, handler, req, timeout)
        except PeerCallError as e:
            METRICS.inc("sentinel_hop_failures_total", reason=e.reason)
            # an error answer concerns our request, a timeout the network: availability, not a strike
            raise HopError(str(e), e.reason, integrity=False) from e
        except ProtocolError as e:  # the response frame itself was truncated / malformed / oversized
            # An unsigned, incomplete frame proves nothing to other verifiers and is what a stream
            # cut by a loaded host looks like: route around it, strike only signed bad content.
            METRICS.inc("sentinel_rejected_messages_total", reason=e.reason)
            raise HopError(f"bad response from {worker[-8:]}: {e}", e.reason, integrity=False) from e
        try:
            self.checker.check(resp, expected_sender=worker, expected=wire.response_specs(self.manifest, stage, handler))
            h = resp.header
            if h.get("in_reply_to") != req.header["digest"] or h.get("step") != step or h.get("stage") != stage \
                    or h.get("micro_batch") != micro_batch:
                raise ProtocolError("response is not bound to this request (in_reply_to/step/stage mismatch)")
        except ProtocolError as e:
            METRICS.inc("sentinel_rejected_messages_total", reason=e.reason)
            raise HopError(f"rejected response from {worker[-8:]}: {e}", e.reason, integrity=True) from e
        METRICS.inc("sentinel_messages_total", kind="response", direction=direction)
        meta = {"digest": resp.header["digest"], "signature": resp.header["signature"],
                "sender": resp.header["sender"], "step": step, "micro_batch": micro_batch, "stage": stage,
                "direction": direction}
        for key in ("version", "params_digest", "device"):  # lockstep stages sign these into every answer
            if key in resp.header:
                meta[key] = resp.header[key]
        return HopResult(next(iter(resp.tensors.values()), None), meta)

    async def forward(self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
                      targets: torch.Tensor | None, mode: str, timeout: float) -> HopResult:
        tensors = {"x": x}
        if targets is not None:
            tensors["targets"] = targets
        return await self._call(worker, wire.FORWARD, stage, step, micro_batch, "forward", tensors, timeout,
                                mode=mode)

    async def backward(self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
                       grad: torch.Tensor | None, targets: torch.Tensor | None, timeout: float,
                       mode: str = "train") -> HopResult:
        tensors = {"x": x}
        if grad is not None:
            tensors["grad"] = grad
        if targets is not None:
            tensors["targets"] = targets
        extra = {"mode": mode} if mode != "train" else {}
        return await self._call(worker, wire.BACKWARD, stage, step, micro_batch, "backward", tensors, timeout,
                                **extra)
