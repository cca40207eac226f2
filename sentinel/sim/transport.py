"""The simulator's side of the driver: stages as in-process objects instead of P2P stubs.

The live verifier talks to workers through :class:`sentinel.verifier.transport.P2PTransport`;
the simulator plugs :class:`InProcessTransport` into the *same*
:class:`~sentinel.verifier.driver.PipelineDriver`. Each simulated worker is what a volunteer
runs, minus the network: a :class:`~sentinel.worker.stage_runner.StageRunner` (same stage module,
optimizer and activation cache), the attack applied to what it returns exactly where the live
worker applies it (``attack.forward`` on forward outputs, ``attack.backward`` on input
gradients), and within-stage parameter averaging with ``aggregate`` every ``average_every``
optimizer steps, as ``sentinel.worker.node`` does after each backward.

Also here, because they only make sense next to an in-process transport:

* :class:`SimRouter` — the live :class:`~sentinel.verifier.routing.Router`, fed *simulated*
  latencies instead of wall-clock ones so routing, and therefore the whole run, is a pure
  function of the seed;
* :class:`DuplicateScreen` — Lu et al.'s duplicated-block baseline as a drop-in for the
  SENTINEL screener: every hop is recomputed by another replica and compared, and the extra
  compute is counted so the cost comparison is honest;
* :class:`ComputeCounter` — stage passes and FLOPs, per defense.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sentinel.attacks.base import AttackContext
from sentinel.protocol.aggregation import aggregate, contribution_outliers
from sentinel.run.manifest import RunManifest
from sentinel.verifier.driver import HopResult
from sentinel.verifier.routing import Router
from sentinel.worker.stage_runner import StageRunner

__all__ = [
    "ComputeCounter",
    "DuplicateScreen",
    "InProcessTransport",
    "SimRouter",
    "SimWorker",
    "stage_forward_flops_per_token",
]


def _seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def stage_forward_flops_per_token(runner: StageRunner) -> float:
    """Multiply-add FLOPs of one forward pass of this stage, per token.

    ``2 x`` every weight matrix that multiplies activations (the embedding is a lookup and
    costs nothing), plus causal attention's ``QK^T`` and ``AV`` (``2 x 2 x T/2 x d`` per layer
    on average over positions). Backward is counted as twice the forward, the usual rule.
    """
    cfg = runner.manifest.model
    flops = 0.0
    for name, p in runner.module.named_parameters():
        if p.dim() >= 2 and not name.startswith("embed"):
            flops += 2.0 * p.numel()
    flops += len(runner.module.layers) * 2.0 * cfg.seq_len * cfg.d_model
    return flops


@dataclass
class ComputeCounter:
    """Compute spent by the workers (and, for ``duplicate``, by the checking replicas).

    ``stage_passes`` is in token x stage-forward equivalents (a forward = 1, a backward from the
    activation cache = 2, a backward that must recompute its forward = 3, each times the tokens
    of the micro-batch), so ``stage_passes / tokens`` is ``3 x stages`` for plain training;
    ``flops`` weights each pass by the stage's own FLOPs per token.
    """

    stage_passes: float = 0.0
    check_passes: float = 0.0
    flops: float = 0.0
    check_flops: float = 0.0

    def add(self, passes: float, flops_per_token: float, tokens: int, check: bool = False) -> None:
        """Count ``passes`` stage-forward equivalents over ``tokens`` tokens."""
        if check:
            self.check_passes += passes * tokens
            self.check_flops += passes * flops_per_token * tokens
        else:
            self.stage_passes += passes * tokens
            self.flops += passes * flops_per_token * tokens

    @property
    def total_passes(self) -> float:
        return self.stage_passes + self.check_passes

    @property
    def total_flops(self) -> float:
        return self.flops + self.check_flops


@dataclass
class SimWorker:
    """One simulated volunteer: its stage's compute, and the attack it runs, if any."""

    name: str
    stage: int
    runner: StageRunner
    attack: Any | None = None
    flops_per_token: float = 0.0
    last_averaged_version: int = 0
    last_aggregate: torch.Tensor | None = None  # its parameters right after its last averaging round
    messages: int = 0  # tensors it returned in training
    contributions: int = 0  # averaging contributions it sent to its replicas
    attacked_contributions: int = 0  # of which its attack changed the vector
    attacked_messages: int = 0  # of which the attack changed the tensor

    @property
    def malicious(self) -> bool:
        return self.attack is not None


@dataclass
class ContributionChecks:
    """How a lockstep stage re-checks its replicas' gradient contributions (the screen's
    settings): every outlier above ``ratio`` (scored with ``floor``)."""

    ratio: float
    floor: float
    on_proven: Callable[[str, int], None]  # (worker, step): a contribution its passes do not compute


@dataclass
class _Sent:
    """What a worker returned for the hop the driver is about to screen."""

    tensor: torch.Tensor | None
    attacked: bool
    expected: torch.Tensor | None = None  # the checking replica's recomputation (duplicate defense)


@dataclass
class SimRouter(Router):
    """The live router, with simulated latencies so a run does not depend on wall-clock noise.

    The driver reports the measured latency of every hop; here it is replaced by
    ``latency_of(worker)``. Everything else (expected finish time, in-flight counts,
    back-off, tie-breaks) is the live code path.
    """

    latency_of: Callable[[str], float] | None = None

    def finished(self, worker: str, latency_s: float) -> None:
        super().finished(worker, self.latency_of(worker) if self.latency_of is not None else latency_s)


class LatencyModel:
    """Deterministic simulated hop latencies: a fixed speed per worker times per-call jitter.

    Jitter is what rotates the router's traffic over the replicas of a stage (as load and
    network noise do in a real swarm); both come from seeded generators, so routing is
    reproducible. The speed spread is kept small on purpose: with a wide one the slowest
    replicas get almost no traffic, so an attacker there neither attacks nor gets caught, and
    the table would measure the router instead of the screening.
    """

    def __init__(self, seed: int, spread: float = 0.1, jitter: float = 0.3, base_s: float = 0.05):
        self.seed = seed
        self.spread = spread
        self.jitter = jitter
        self.base_s = base_s
        self._speed: dict[str, float] = {}
        self._rng = random.Random(_seed("latency", seed))

    def __call__(self, worker: str) -> float:
        speed = self._speed.get(worker)
        if speed is None:
            speed = self._speed[worker] = random.Random(_seed("speed", self.seed, worker)).lognormvariate(
                0.0, self.spread)
        return self.base_s * speed * self._rng.lognormvariate(0.0, self.jitter)


class InProcessTransport:
    """:class:`~sentinel.verifier.driver.StageTransport` over in-process :class:`SimWorker` s.

    Args:
        workers: every worker, by name.
        manifest: the run manifest the workers were built from (averaging rule and period).
        is_banned: the verifier's ban view; banned replicas are left out of averaging.
        attack_start: no attack fires before this step (the worker is honest until then).
        seed: seeds each message's attack generator together with worker, step, micro-batch
            and direction, as the live worker seeds its own.
        duplicate: recompute every training hop on a checking replica (see
            :class:`DuplicateScreen`), counting its compute.
        interleave: yield to the event loop at every hop, so the micro-batches of a step are in
            flight together and the router spreads them over the replicas, as on a network.
        lockstep: backward passes only accumulate; :meth:`step_boundary` then aggregates each
            stage's gradients and every replica applies the same update (replicas stay
            bit-identical). Off: each replica steps its own optimizer and averages parameters
            every ``average_every`` steps (the previous design, kept as the baseline).
    """

    def __init__(
        self,
        workers: Mapping[str, SimWorker],
        manifest: RunManifest,
        is_banned: Callable[[str], bool] = lambda w: False,
        attack_start: int = 0,
        seed: int = 0,
        duplicate: bool = False,
        interleave: bool = True,
        lockstep: bool = True,
    ) -> None:
        self.workers = dict(workers)
        self.manifest = manifest
        self.is_banned = is_banned
        self.attack_start = attack_start
        self.seed = seed
        self.duplicate = duplicate
        self.interleave = interleave
        self.lockstep = lockstep
        self.num_stages = manifest.num_stages
        self._by_stage: dict[int, list[str]] = {s: [] for s in range(self.num_stages)}
        for name, w in self.workers.items():
            self._by_stage[w.stage].append(name)
        self.compute = ComputeCounter()
        #: ``(stage, direction, worker, tensor, source) -> bool | None``: the verifier's decision,
        #: handed to white-box attacks (set by the simulation once its screener exists)
        self.oracle: Callable[..., bool | None] | None = None
        #: ``(stage, step, names, vectors)``: every asynchronous averaging round's contributions,
        #: the averaging worker's own first (set by a defended simulation, which screens them)
        self.contribution_screen: Callable[..., None] | None = None
        #: lockstep: how contributions are re-checked exactly (set by a defended simulation)
        self.contribution_checks: ContributionChecks | None = None
        # lockstep: the inputs of every backward pass each replica accumulated since its last
        # step, in order: what a re-check of its contribution recomputes
        self._passes: dict[str, list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]] = {}
        self.latest: dict[tuple[int, str, str], _Sent] = {}
        self.honest_loss: dict[tuple[int, int], float] = {}
        self.averaging_rounds = 0
        self.resyncs = 0  # lockstep replicas that adopted their stage majority's state
        self.contribution_stats = {"checked": 0, "proven": 0, "inconclusive": 0}
        # the checking replica's activation cache (duplicate defense): key -> (leaf, out, version)
        self._check_cache: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}

    def replicas(self, stage: int) -> list[str]:
        return list(self._by_stage.get(stage, []))

    # -- attack ------------------------------------------------------------------------------------
    def _ctx(self, w: SimWorker, step: int, micro_batch: int, direction: str, x: torch.Tensor,
             targets: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> AttackContext:
        gen = torch.Generator().manual_seed(_seed("attack", self.seed, w.name, step, micro_batch, direction))
        oracle = None
        if self.oracle is not None:
            # the source the driver screens this hop with: the hidden state into a middle stage's
            # forward, the output gradient into a backward
            src = grad if direction == "backward" else (x if 0 < w.stage < self.num_stages - 1 else None)
            check = self.oracle

            def oracle(t: torch.Tensor, s: int = w.stage, d: str = direction, n: str = w.name) -> bool | None:
                return check(s, d, n, t, src)
        return AttackContext(step=step, stage=w.stage, worker=w.name, micro_batch=micro_batch, direction=direction,
                             generator=gen, stage_input=x, num_stages=self.num_stages, targets=targets,
                             grad_output=grad, grad_scale=1.0 / w.runner.manifest.training.accumulate,
                             stage_module=w.runner.module, oracle=oracle)

    def _attack(self, w: SimWorker, y: torch.Tensor, step: int, micro_batch: int, direction: str,
                x: torch.Tensor, targets: torch.Tensor | None = None,
                grad: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        if w.attack is None or step < self.attack_start:
            return y, False
        ctx = self._ctx(w, step, micro_batch, direction, x, targets, grad)
        sent = w.attack.forward(y, ctx) if direction == "forward" else w.attack.backward(y, ctx)
        changed = sent is not y and not torch.equal(sent, y)
        return sent, changed

    # -- StageTransport ----------------------------------------------------------------------------
    async def forward(self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
                      targets: torch.Tensor | None, mode: str, timeout: float) -> HopResult:
        if self.interleave:
            await asyncio.sleep(0)
        w = self.workers[worker]
        if mode == "eval":
            return HopResult(w.runner.evaluate(x, targets), {"sender": worker})
        key = (step, micro_batch)
        y = w.runner.forward(key, x, targets)
        tokens = x.shape[0] * x.shape[1]
        self.compute.add(1.0, w.flops_per_token, tokens)
        expected = self._check_forward(w, key, x, targets) if self.duplicate else None
        if w.runner.is_last:
            self.honest_loss[key] = float(y)
        sent, attacked = self._attack(w, y, step, micro_batch, "forward", x, targets)
        w.messages += 1
        w.attacked_messages += attacked
        self.latest[(stage, "forward", worker)] = _Sent(sent, attacked, expected)
        return HopResult(sent, {"sender": worker, "step": step, "micro_batch": micro_batch, "stage": stage,
                                "direction": "forward", **self._stamp(w)})

    def _stamp(self, w: SimWorker) -> dict[str, Any]:
        """What a lockstep replica signs into its answers: version and parameter digest (one
        process, one build: the arithmetic is the same everywhere)."""
        if not self.lockstep:
            return {}
        return {"version": w.runner.version, "params_digest": w.runner.digest(), "device": "sim"}

    async def backward(self, worker: str, stage: int, step: int, micro_batch: int, x: torch.Tensor,
                       grad: torch.Tensor | None, targets: torch.Tensor | None, timeout: float,
                       mode: str = "train") -> HopResult:
        if self.interleave:
            await asyncio.sleep(0)
        w = self.workers[worker]
        key = (step, micro_batch)
        tokens = x.shape[0] * x.shape[1]
        expected = self._check_backward(w, key, x, grad, targets) if self.duplicate else None
        if mode == "probe":  # a re-check: the input-gradient only, nothing accumulated
            grad_x = w.runner.probe_backward(x, grad, targets)
            self.compute.add(3.0, w.flops_per_token, tokens)
        else:
            recomputes = w.runner.stats.recomputes
            grad_x = w.runner.backward(key, x, grad, targets, hold=self.lockstep)
            if self.lockstep:
                self._passes.setdefault(worker, []).append((x, grad, targets))
            self.compute.add(2.0 + (w.runner.stats.recomputes - recomputes), w.flops_per_token, tokens)
            if not self.lockstep:
                self._maybe_average(w, step)
        if grad_x is None:  # stage 0: token ids have no gradient; nothing is sent back
            self.latest[(stage, "backward", worker)] = _Sent(None, False)
            return HopResult(None, {"sender": worker})
        sent, attacked = self._attack(w, grad_x, step, micro_batch, "backward", x, targets, grad)
        w.messages += 1
        w.attacked_messages += attacked
        self.latest[(stage, "backward", worker)] = _Sent(sent, attacked, expected)
        return HopResult(sent, {"sender": worker, "step": step, "micro_batch": micro_batch, "stage": stage,
                                "direction": "backward", **self._stamp(w)})

    # -- lockstep: one agreed gradient per stage and step ---------------------------------------------
    def step_boundary(self, step: int) -> None:
        """End of ``step``: in every stage, the live replicas that ran backward passes contribute
        their mean gradient (a malicious one what its attack's ``average`` returns, the gradient
        being its update), the contributions are aggregated with the run's rule, and every live
        replica applies the aggregate, so all take the same optimizer step from the same state.

        Contributions are re-checked exactly (:meth:`_check_contributions`) before they are
        aggregated: an outlier is never struck for being one, since an honest replica upstream of
        an attacker carries the attacker's corruption in its gradient (BENCHMARKS.md, "Lockstep
        stages in the simulator"); a contribution its own passes do not compute is proven wrong."""
        t = self.manifest.training
        for stage in range(self.num_stages):
            live = [self.workers[n] for n in self._by_stage[stage] if not self.is_banned(n)]
            names: list[str] = []
            vectors: list[torch.Tensor] = []
            for w in live:
                grad, passes = w.runner.accumulated_gradient()
                if passes == 0:
                    continue
                sent = grad
                if w.attack is not None and step >= self.attack_start:
                    gen = torch.Generator().manual_seed(_seed("average", self.seed, w.name, step))
                    ctx = AttackContext(step=step, stage=stage, worker=w.name, micro_batch=-1, direction="average",
                                        generator=gen, num_stages=self.num_stages, anchor=torch.zeros_like(grad),
                                        peers=list(vectors))
                    sent = w.attack.average(grad, ctx)
                    w.attacked_contributions += sent is not grad and not torch.equal(sent, grad)
                w.contributions += 1
                names.append(w.name)
                vectors.append(sent)
            if self.contribution_checks is not None and vectors:
                wrong = self._check_contributions(stage, step, names, vectors)
                kept = [i for i, n in enumerate(names) if n not in wrong]
                names, vectors = [names[i] for i in kept], [vectors[i] for i in kept]
                live = [w for w in live if not self.is_banned(w.name)]
            for n in self._by_stage[stage]:
                self._passes.pop(n, None)
            if not vectors:
                continue  # no traffic this step: every replica stays at its version
            agg = aggregate(vectors, t.averaging) if len(vectors) > 1 else vectors[0]
            for w in live:
                w.runner.apply_gradient(agg)
            self.averaging_rounds += 1
            self._resync(live)

    def _check_contributions(self, stage: int, step: int, names: list[str], vectors: list[torch.Tensor]) -> set[str]:
        """Re-check every outlier contribution (``contribution_scores`` above the screen's ratio)
        exactly, as the live replicas do: every other live replica of the stage recomputes it at
        the same version from the inputs of the passes it claims. If a strict majority of the
        stage's unbanned replicas computes one value, every replica outside it (the contributor
        or a lying checker) is proven wrong (reported to ``on_proven``), and a proven-wrong
        contribution is left out of this round. Returns the contributions left out."""
        policy = self.contribution_checks
        assert policy is not None
        outliers = contribution_outliers(vectors, policy.ratio, policy.floor)
        wrong: set[str] = set()
        for name, vector, outlier in zip(names, vectors, outliers, strict=True):
            if not outlier:
                continue
            passes = self._passes.get(name, [])
            live = [n for n in self._by_stage[stage] if not self.is_banned(n)]
            groups: list[tuple[torch.Tensor, list[str]]] = [(vector, [name])]
            self.contribution_stats["checked"] += 1
            for checker in live:
                if checker == name:
                    continue
                answer = self._recompute_contribution(self.workers[checker], passes, step)
                for value, members in groups:
                    if torch.equal(value, answer):
                        members.append(checker)
                        break
                else:
                    groups.append((answer, [checker]))
            _, majority = max(groups, key=lambda g: len(g[1]))
            if 2 * len(majority) <= len(live):
                self.contribution_stats["inconclusive"] += 1
                continue
            for _, members in groups:
                if members is not majority:
                    for who in members:
                        wrong.add(who)
                        self.contribution_stats["proven"] += 1
                        policy.on_proven(who, step)
        return wrong

    def _recompute_contribution(self, checker: SimWorker, passes: list, step: int) -> torch.Tensor:
        """``checker``'s answer to "what do these passes contribute at your version": honest
        recomputation, or what a malicious checker's attack makes of it (as of its own)."""
        grad, _ = checker.runner.recompute_gradient(passes)
        for x, _, _ in passes:
            self.compute.add(3.0, checker.flops_per_token, x.shape[0] * x.shape[1], check=True)
        if checker.attack is not None and step >= self.attack_start:
            gen = torch.Generator().manual_seed(_seed("recheck", self.seed, checker.name, step))
            ctx = AttackContext(step=step, stage=checker.stage, worker=checker.name, micro_batch=-1,
                                direction="average", generator=gen, num_stages=self.num_stages,
                                anchor=torch.zeros_like(grad), peers=[])
            grad = checker.attack.average(grad, ctx)
        return grad

    def _resync(self, live: list[SimWorker]) -> None:
        """A replica whose parameters differ from its stage's strict majority (or that fell
        behind its version) adopts a majority replica's state instead of being struck: with
        identical replicas a disagreement of state is a fault to repair, not evidence."""
        digests = {w.name: (w.runner.version, w.runner.digest()) for w in live}
        best, n = Counter(digests.values()).most_common(1)[0]
        if 2 * n <= len(live) or n == len(live):
            return
        source = next(w for w in live if digests[w.name] == best)
        state = source.runner.state()
        for w in live:
            if digests[w.name] != best:
                w.runner.load_state(state)
                self.resyncs += 1

    # -- within-stage averaging (asynchronous baseline) ------------------------------------------------
    def _maybe_average(self, w: SimWorker, step: int) -> None:
        """What the live worker does after each backward: every ``average_every`` optimizer
        steps, replace its parameters by the aggregate of its own and its live replicas'
        contributions. A malicious replica contributes what its attack's ``average`` returns
        (honest for pipeline attacks); ``contribution_screen``, when set, sees every round."""
        t = self.manifest.training
        if w.runner.version - w.last_averaged_version < t.average_every:
            return
        w.last_averaged_version = w.runner.version
        peers = [self.workers[n] for n in self._by_stage[w.stage] if n != w.name and not self.is_banned(n)]
        if not peers:
            return
        own = w.runner.flat_parameters()
        honest = [p.runner.flat_parameters() for p in peers]
        vectors = [own]
        for i, (p, flat) in enumerate(zip(peers, honest, strict=True)):
            sent = flat
            if p.attack is not None and step >= self.attack_start:
                gen = torch.Generator().manual_seed(_seed("average", self.seed, p.name, w.name, step))
                ctx = AttackContext(step=step, stage=p.stage, worker=p.name, micro_batch=-1, direction="average",
                                    generator=gen, num_stages=self.num_stages, anchor=p.last_aggregate,
                                    peers=[own, *honest[:i], *honest[i + 1:]])
                sent = p.attack.average(flat, ctx)
                p.attacked_contributions += sent is not flat and not torch.equal(sent, flat)
            p.contributions += 1
            vectors.append(sent)
        agg = aggregate(vectors, t.averaging)
        if self.contribution_screen is not None:
            self.contribution_screen(w.stage, step, [w.name, *(p.name for p in peers)], vectors)
        w.runner.load_flat_parameters(agg)
        w.last_aggregate = agg.to(own.dtype)
        self.averaging_rounds += 1

    # -- duplicated computation (Lu et al. baseline) --------------------------------------------------
    def _check_forward(self, w: SimWorker, key: tuple[int, int], x: torch.Tensor,
                       targets: torch.Tensor | None) -> torch.Tensor:
        """The checking replica recomputes this forward hop with the same parameters.

        Lu et al.'s replicas are in lock-step, so a duplicate has the checked worker's exact
        weights: that is modelled by running the checked worker's own module again, as a second
        and separate pass (its graph is kept for the backward check, like an activation cache).
        """
        runner = w.runner
        leaf = x if runner.is_first else x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = runner.module(leaf, targets if runner.is_last else None)
        self._check_cache[(w.name, *key)] = (leaf, out, runner.version)
        if len(self._check_cache) > 4096:
            self._check_cache.pop(next(iter(self._check_cache)))
        self.compute.add(1.0, w.flops_per_token, x.shape[0] * x.shape[1], check=True)
        return out.detach()

    def _check_backward(self, w: SimWorker, key: tuple[int, int], x: torch.Tensor, grad: torch.Tensor | None,
                        targets: torch.Tensor | None) -> torch.Tensor | None:
        """The checking replica's input gradient, computed before the worker's optimizer step
        (so with the same parameters) and without touching any parameter gradient."""
        runner = w.runner
        tokens = x.shape[0] * x.shape[1]
        cached = self._check_cache.pop((w.name, *key), None)
        if runner.is_first:  # stage 0 sends nothing back: there is nothing to check
            return None
        passes = 2.0
        if cached is None or cached[2] != runner.version or not torch.equal(cached[0].detach(), x):
            leaf = x if runner.is_first else x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = runner.module(leaf, targets if runner.is_last else None)
            passes += 1.0
        else:
            leaf, out = cached[0], cached[1]
        self.compute.add(passes, w.flops_per_token, tokens, check=True)
        scale = 1.0 / self.manifest.training.accumulate
        g_out = torch.ones_like(out) * scale if runner.is_last else grad * scale
        (g_x,) = torch.autograd.grad(out, leaf, g_out)
        return g_x.detach()


@dataclass
class _DupVerdict:
    flagged: bool
    reasons: tuple[str, ...]
    distances: dict[str, float] = field(default_factory=dict)
    fences: dict[str, float] = field(default_factory=dict)
    drift: bool = False
    calibrating: bool = False


class _ZeroSubstitute:
    @staticmethod
    def substitute(like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like)


class DuplicateScreen:
    """Lu et al.'s duplicated-block check, behind the screener interface the driver calls.

    For every hop the transport has a checking replica recompute the same stage on the same input
    (``InProcessTransport(duplicate=True)``); this screen compares what the worker sent with that
    recomputation: ``||sent - expected|| > rtol * ||expected|| + atol`` flags the worker (a
    strike), exactly like a SENTINEL flag. The checking replica is drawn from the stage's other
    live replicas; a malicious checker covers for whoever it checks (passes everything), which is
    the collusion this baseline cannot see. It needs no statistics, so it has no false positives
    from drift, but it costs a second copy of every stage pass.
    """

    def __init__(self, transport: InProcessTransport, is_malicious: Callable[[str], bool],
                 is_banned: Callable[[str], bool], seed: int = 0, rtol: float = 1e-4, atol: float = 1e-7):
        self.transport = transport
        self.is_malicious = is_malicious
        self.is_banned = is_banned
        self.seed = seed
        self.rtol = rtol
        self.atol = atol
        self.messages = 0
        self.flagged = 0
        self._checks = 0

    def checker_for(self, stage: int, worker: str) -> str | None:
        """The replica that recomputes ``worker``'s hop (seeded round robin over the others)."""
        others = [n for n in self.transport.replicas(stage) if n != worker and not self.is_banned(n)]
        if not others:
            return None
        self._checks += 1
        return others[random.Random(_seed("checker", self.seed, self._checks)).randrange(len(others))]

    def screen(self, stage: int, direction: str, worker: str, x: torch.Tensor,
               source: torch.Tensor | None = None) -> _DupVerdict:
        self.messages += 1
        sent = self.transport.latest.get((stage, direction, worker))
        checker = self.checker_for(stage, worker)
        if sent is None or sent.expected is None or checker is None or self.is_malicious(checker):
            return _DupVerdict(False, ())
        if not bool(torch.isfinite(x).all()):
            self.flagged += 1
            return _DupVerdict(True, ("non_finite",))
        diff = float(torch.linalg.vector_norm(x.float() - sent.expected.float()))
        bound = self.rtol * float(torch.linalg.vector_norm(sent.expected.float())) + self.atol
        if diff > bound:
            self.flagged += 1
            return _DupVerdict(True, ("duplicate_mismatch",), {"diff": diff}, {"diff": bound})
        return _DupVerdict(False, (), {"diff": diff}, {"diff": bound})

    def boundary(self, stage: int, direction: str) -> _ZeroSubstitute:
        return _ZeroSubstitute()

    def take_retroactive(self) -> list[tuple[int, str, str, Any]]:
        return []

    def flag_rates(self) -> dict[str, float]:
        return {"all": self.flagged / self.messages if self.messages else 0.0}
