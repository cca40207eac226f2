"""The pipeline's RPCs: handler names, header fields, the tensors each message must carry, and
the dispatcher that checks every request before its handler sees it.

Every shape here follows from the run manifest, which is what lets a receiver reject a tensor
of the wrong dtype or shape before it touches any compute. A role declares its handlers once
(:func:`checked_handlers`); no handler checks a request itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sentinel.protocol.checks import MessageChecker, TensorSpec, new_nonce
from sentinel.protocol.codec import Message
from sentinel.run.manifest import RunManifest

FORWARD = "sentinel.forward"  # x (+ targets on the last stage) -> y (the loss on the last stage)
BACKWARD = "sentinel.backward"  # x, grad (targets on the last stage) -> grad_x (nothing on stage 0)
PARAMS = "sentinel.params"  # () or part=[lo, hi] -> flat parameters of the stage (or that slice)
REDUCE = "sentinel.reduce"  # my slice [lo, hi) of the stage's parameters + the group -> the reduced slice
REDUCE_AUDIT = "sentinel.reduce_audit"  # (a reduction's digest, index) -> one signed slice it committed to
COMPLAINT = "sentinel.complaint"  # a replica's signed averaging contribution, reported as poisoned -> ack
STATUS = "sentinel.status"  # () -> a node's status header, for `sentinel-node status`
# lockstep stages (``sentinel.worker.lockstep``), between replicas of one stage:
GRADIENT = "sentinel.gradient"  # version=v, part=[lo, hi] -> the replica's gradient for v (that slice)
STATE = "sentinel.state"  # part=[lo, hi] -> a slice of the replica's parameters + optimizer moments
PASSES = "sentinel.passes"  # version=v, index=i -> the i-th backward request it accumulated at v, as signed

MODES = ("train", "eval")
# a backward's modes: "train" accumulates the parameter gradient for the stage's next update;
# "probe" only answers the input-gradient (a re-check on another replica changes nothing there)
BACKWARD_MODES = ("train", "probe")

# Requests that must be fresh (inside the sender's replay window): the pipeline's, and those that
# change the receiver's state. Reads (parameters, status, audit slices) may be repeated.
REPLAY_CHECKED = frozenset({FORWARD, BACKWARD, REDUCE, COMPLAINT, GRADIENT})

Handler = Callable[[Message, str], Awaitable[Message]]
# (rpc name, checked request, sender) -> None, or raise a ProtocolError: a role's admission rule
Admit = Callable[[str, Message, str], Awaitable[None]]


def request_specs(manifest: RunManifest, stage: int, handler: str) -> dict[str, TensorSpec]:
    """Tensors a request to ``handler`` on ``stage`` must carry."""
    b, t, d = manifest.training.micro_batch_size, manifest.model.seq_len, manifest.model.d_model
    last = stage == manifest.num_stages - 1
    ids = TensorSpec("int64", (b, t))
    hidden = TensorSpec("float32", (b, t, d))
    specs: dict[str, TensorSpec] = {}
    if handler in (FORWARD, BACKWARD):
        specs["x"] = ids if stage == 0 else hidden
        if last:
            specs["targets"] = ids
        if handler == BACKWARD and not last:
            specs["grad"] = hidden
    return specs


def request_tensors(name: str, manifest: RunManifest, stage: int, header: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Tensors a request to ``name`` must carry, at the receiver's ``stage``. Lengths that depend
    on the request itself (a reduce's part) are checked by the handler against that request."""
    if name in (FORWARD, BACKWARD):
        return request_specs(manifest, stage, name)
    if name == REDUCE:
        return {"params": TensorSpec("float32", (None,))}
    if name == COMPLAINT:
        if header.get("kind") == "reduction":  # a reducer's answer and the slices it committed to
            return {"part": TensorSpec("float32", (None,)), "params": TensorSpec("float32", (None, None))}
        if header.get("kind") == "gradient":  # a lockstep contribution, its passes and the stage's parameters
            return complaint_gradient_specs(manifest, header.get("stage"))
        return {"params": TensorSpec("float32", (None,))}
    return {}


def complaint_gradient_specs(manifest: RunManifest, stage: Any) -> dict[str, TensorSpec]:
    """Tensors of a ``kind = "gradient"`` complaint about a replica of ``stage``: the stage's flat
    parameters, the accused's flat gradient, and its passes' backward tensors stacked (a leading
    dimension per pass)."""
    specs = {"params": TensorSpec("float32", (None,)), "grad": TensorSpec("float32", (None,))}
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < manifest.num_stages:
        return specs  # the checker then refuses the pass tensors as unexpected
    for name, spec in request_specs(manifest, stage, BACKWARD).items():
        specs[f"pass_{name}"] = TensorSpec(spec.dtype, (None, *spec.shape))
    return specs


def checked_handlers(handlers: Mapping[str, Handler], *, checker: MessageChecker, manifest: RunManifest,
                     stage: Callable[[], int], admit: Admit | None = None) -> dict[str, Handler]:
    """Each of ``handlers`` behind the one dispatcher: the request's signature, sender, run,
    freshness (:data:`REPLAY_CHECKED`), tensors (:func:`request_tensors` at ``stage()``) and
    finiteness are checked, then the role's ``admit`` rule, and only then the handler runs."""

    def dispatch(name: str, handler: Handler) -> Handler:
        async def checked(msg: Message, remote: str) -> Message:
            checker.check(msg, expected_sender=remote, check_replay=name in REPLAY_CHECKED,
                          expected=request_tensors(name, manifest, stage(), msg.header))
            if admit is not None:
                await admit(name, msg, remote)
            return await handler(msg, remote)

        return checked

    return {name: dispatch(name, handler) for name, handler in handlers.items()}


def response_specs(manifest: RunManifest, stage: int, handler: str) -> dict[str, TensorSpec]:
    """Tensors a worker's response to ``handler`` on ``stage`` must carry."""
    b, t, d = manifest.training.micro_batch_size, manifest.model.seq_len, manifest.model.d_model
    last = stage == manifest.num_stages - 1
    if handler == FORWARD:
        return {"y": TensorSpec("float32", ()) if last else TensorSpec("float32", (b, t, d))}
    if handler == BACKWARD:
        return {} if stage == 0 else {"grad_x": TensorSpec("float32", (b, t, d))}
    return {}


def request(
    run: str, step: int, micro_batch: int, stage: int, direction: str, tensors: dict, **extra: Any
) -> Message:
    header = {
        "run": run,
        "step": int(step),
        "micro_batch": int(micro_batch),
        "stage": int(stage),
        "direction": direction,
        "nonce": new_nonce(),
        **extra,
    }
    return Message(header=header, tensors=tensors)


def reply(req: Message, direction: str, tensors: dict, **extra: Any) -> Message:
    """A response that echoes the request's coordinates and binds to it by digest."""
    h = req.header
    header = {
        "run": h["run"],
        "step": h["step"],
        "micro_batch": h["micro_batch"],
        "stage": h["stage"],
        "direction": direction,
        "nonce": new_nonce(),
        "in_reply_to": h["digest"],
        **extra,
    }
    return Message(header=header, tensors=tensors)
