"""The swarm as a node sees it: stage claims, replica parameters and the run manifest from the DHT.

Readers every role shares (workers to average and join, verifiers to route and judge complaints,
launchers to find the manifest), so no role imports another to read the swarm.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sentinel.metrics import METRICS
from sentinel.net.runtime import PeerCallError, SwarmRuntime
from sentinel.protocol import rpc as wire
from sentinel.protocol.checks import MessageChecker, TensorSpec
from sentinel.protocol.codec import Message
from sentinel.protocol.errors import ProtocolError
from sentinel.protocol.keys import MANIFEST_KEY, stage_key
from sentinel.protocol.signing import sign_message
from sentinel.run.manifest import RunManifest

logger = logging.getLogger(__name__)


async def read_stage_claims(runtime: SwarmRuntime, run: str, num_stages: int) -> dict[int, dict[str, dict]]:
    """stage -> {peer id -> claim payload} for claims whose owner says they serve that stage."""
    keys = [stage_key(run, s) for s in range(num_stages)]
    found = await asyncio.gather(*(runtime.get(k) for k in keys))
    claims: dict[int, dict[str, dict]] = {}
    for s, recs in enumerate(found):
        claims[s] = {p: v for p, v in recs.items() if v.get("stage") == s and v.get("run") == run}
    # One process serves one stage. A key claiming several at once (a Sybil flood from one key, or
    # a squatter) is ignored in all of them: routing to it would fail hops, and counting it would
    # make starved stages look served. A worker that moves writes OFFLINE to its old stage first.
    seen: dict[str, int] = {}
    for recs in claims.values():
        for p, v in recs.items():
            if v.get("state") != "OFFLINE":
                seen[p] = seen.get(p, 0) + 1
    multi = {p for p, n in seen.items() if n > 1}
    if len(_MULTI_STAGE_REPORTED) > 10_000:  # bounded: a flood of fresh keys must not grow memory
        _MULTI_STAGE_REPORTED.clear()
    for p in multi - _MULTI_STAGE_REPORTED:
        _MULTI_STAGE_REPORTED.add(p)
        METRICS.inc("sentinel_multi_stage_claims_total")
        logger.warning("ignoring %s: it claims %d stages at once", p[-8:], seen[p])
    if multi:
        claims = {s: {p: v for p, v in recs.items() if p not in multi} for s, recs in claims.items()}
    return claims


_MULTI_STAGE_REPORTED: set[str] = set()


def version_of(msg: Message) -> int:
    """The optimizer-step count a ``params_result`` announces (0 if absent or not an int)."""
    v = msg.header.get("version", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


async def fetch_params(runtime: SwarmRuntime, checker: MessageChecker, run: str, step: int, stage: int,
                       peers: list[str], numel: int | None = None, timeout: float = 20.0,
                       part: tuple[int, int] | None = None,
                       ) -> tuple[list[tuple[str, Message]], list[tuple[str, Exception]]]:
    """Ask each of ``peers`` for its flat parameters of ``stage`` (or the slice ``part`` =
    ``(lo, hi)`` of them): the signed, checked ``params_result`` of those that answer, and
    (peer, error) for the rest. Replicas use it to average and join, verifiers to judge a
    complaint against the stage."""
    if part is not None:
        numel = part[1] - part[0]
    spec = {"params": TensorSpec("float32", (numel,))}
    extra = {"part": list(part)} if part is not None else {}

    async def fetch(peer: str) -> tuple[str, Message | Exception]:
        req = sign_message(wire.request(run, step, 0, stage, "params", {}, **extra), runtime.identity)
        try:
            resp = await runtime.call(peer, wire.PARAMS, req, timeout)
            checker.check(resp, expected_sender=peer, expected=spec, check_replay=False)
            h = resp.header
            # bound to this request: the echoed step is what dates the reply as evidence
            # (``sentinel.verifier.complaints``), so the sender must not choose it
            if h.get("in_reply_to") != req.header["digest"] or h.get("step") != req.header["step"] \
                    or h.get("stage") != stage or h.get("direction") != "params_result" \
                    or (part is not None and h.get("part") != list(part)):
                raise ProtocolError("params reply is not bound to this request (in_reply_to/step/stage/part)")
        except (PeerCallError, ProtocolError) as e:
            logger.debug("params of stage %d from %s failed: %s", stage, peer[-8:], e)
            return peer, e
        return peer, resp

    got = await asyncio.gather(*(fetch(p) for p in peers))
    return ([(p, r) for p, r in got if isinstance(r, Message)],
            [(p, r) for p, r in got if not isinstance(r, Message)])


async def fetch_manifest(runtime: SwarmRuntime, trusted: list[str], timeout: float = 120.0) -> RunManifest:
    """The run manifest signed by a trusted peer (the record validator already checked the signature)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = await runtime.get(MANIFEST_KEY)
        for signer in trusted:
            if signer in recs:
                return RunManifest.from_dict(recs[signer]["manifest"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no run manifest signed by {[t[-8:] for t in trusted]} found in the DHT "
                               f"after {timeout:.0f}s; is the bootstrap peer running?")
        await asyncio.sleep(0.5)
