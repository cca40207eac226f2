"""Attacks that know how screening works and shape their tensors to pass it.

These are the ones a serious adversary would run: they look at the honest distribution (ALIE),
keep their own model of the verifier's reference and stay inside its fences (EMA-mimic), read
the verifier's exact reference and fences and ride just below them (white box), or coordinate
with other malicious workers so their pushes add up instead of cancelling (collusion).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch

from sentinel.attacks.base import Attack, AttackContext, rms, unit_direction

__all__ = ["Alie", "Collusion", "EmaMimic", "WhiteBox", "parse_stages"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 rows of its feature (last) dimension; a 0-dim tensor is one 1-wide row."""
    d = x.shape[-1] if x.dim() > 0 else 1
    return x.detach().float().reshape(-1, d)


class Alie(Attack):
    """"A Little Is Enough": shift every feature by ``z`` standard deviations against its mean.

    For each feature channel (last dimension) the mean and standard deviation are taken over all
    other dimensions (batch and tokens); the channel is shifted by ``-z * std * sign(mean)``. With
    a single row there is no spread to measure, and the tensor's rms stands in for the std.

    Args:
        z: shift in standard deviations per channel.

    Why it matters: the shift stays within the natural spread of every coordinate, so
    coordinate-wise and distance-based screens tuned on honest variance let it through, yet it
    pulls every channel the same way and biases what the next stage learns.
    """

    name = "alie"

    def __init__(self, z: float = 1.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.z = float(z)

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        rows = _rows(x)
        mean = rows.mean(dim=0)
        if rows.shape[0] >= 2:
            std = rows.std(dim=0, correction=0)
        else:
            std = torch.full_like(mean, rms(x))
        sign = torch.where(mean >= 0, 1.0, -1.0)
        shift = (-self.z * std * sign).reshape(x.shape[-1:])
        return x + shift.to(device=x.device, dtype=x.dtype)


class EmaMimic(Attack):
    """Adaptive: push along a fixed direction as far as the verifier's fences allow, every time.

    The attack keeps its own exponential moving average (momentum ``momentum``) of the per-feature
    batch mean ``mu`` (mean over all rows of the feature dimension) and of the rms ``r`` of the
    tensors it sees, per worker, stage and direction. Each message it sends ``x + m * v``, with
    ``v`` a fixed random unit vector of the feature dimension (drawn from ``ctx.generator`` on the
    first message) added to every row, and ``m >= 0`` the largest push that keeps, relative to the
    estimate taken before this message:

    - the norm ratio: ``|rms(sent) / r - 1| <= margin * budget``;
    - the mean distance: ``||mean(sent) - mu|| / (r * sqrt(D)) <= margin * budget``.

    If the honest tensor alone already breaks the budget (legitimate drift), ``m = 0`` and the
    message goes out honest. ``track="honest"`` (default) updates the estimate with the honest
    tensors, modelling a verifier anchored to honest data: a steady push of about ``budget``.
    ``track="sent"`` updates it with what was sent, modelling a verifier whose reference learns
    from accepted messages: each push builds on the last and the offset from honest grows.

    Args:
        budget: relative size of the fences the attack assumes (e.g. 0.05 = 5%).
        momentum: EMA momentum of its running estimate (the paper's verifier uses 0.9 forward).
        margin: fraction of the budget actually used ("just under" the fence).
        track: ``"honest"`` or ``"sent"``, see above.

    Why it matters: a consistent push in one direction adds up in the parameters, while every
    single message stays inside fences fitted on the honest spread — the strongest attack a
    verifier built on per-message distances has to face.
    """

    name = "ema_mimic"

    TRACKS = ("honest", "sent")

    def __init__(
        self,
        budget: float = 0.05,
        momentum: float = 0.9,
        margin: float = 0.95,
        track: str = "honest",
        *,
        directions: str = "both",
        start_step: int = 0,
    ) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if budget <= 0:
            raise ValueError(f"budget must be > 0; got {budget}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1]; got {margin}")
        if track not in self.TRACKS:
            raise ValueError(f"track must be one of {', '.join(self.TRACKS)}; got {track!r}")
        self.budget = float(budget)
        self.momentum = float(momentum)
        self.margin = float(margin)
        self.track = track
        # key -> (running mean [D], running rms, unit push direction [D])
        self._state: dict[tuple[Hashable, ...], tuple[torch.Tensor, float, torch.Tensor]] = {}

    def reset(self) -> None:
        self._state.clear()

    def estimate(self, ctx: AttackContext, features: int) -> tuple[torch.Tensor, float] | None:
        """The attack's current running (mean, rms) estimate for this worker's stream, if any."""
        state = self._state.get((*self.state_key(ctx), features))
        return None if state is None else (state[0].clone(), state[1])

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        rows = _rows(x)
        d = rows.shape[1]
        mu_x, r_x = rows.mean(dim=0), float(rows.pow(2).mean().sqrt())
        key = (*self.state_key(ctx), d)
        if key not in self._state:
            v = unit_direction(x, ctx.generator).float().reshape(d) / math.sqrt(d)
            self._state[key] = (mu_x, r_x, v)
        mu_e, r_e, v = self._state[key]

        m = self._largest_push(rows, mu_x, r_x, mu_e, r_e, v)
        push = m * v
        sent = x if m == 0.0 else x + push.reshape(x.shape[-1:]).to(device=x.device, dtype=x.dtype)

        if self.track == "sent":
            mu_src, r_src = mu_x + push, float((rows + push).pow(2).mean().sqrt())
        else:
            mu_src, r_src = mu_x, r_x
        beta = self.momentum
        self._state[key] = (beta * mu_e + (1 - beta) * mu_src, beta * r_e + (1 - beta) * r_src, v)
        return sent

    def _largest_push(
        self,
        rows: torch.Tensor,
        mu_x: torch.Tensor,
        r_x: float,
        mu_e: torch.Tensor,
        r_e: float,
        v: torch.Tensor,
    ) -> float:
        """Largest ``m >= 0`` keeping ``rows + m*v`` within the budget of the estimate, else 0."""
        b = self.margin * self.budget
        d = rows.shape[1]
        scale = r_e * math.sqrt(d)
        # mean distance: ||a + m v||^2 <= (b * scale)^2, with a = mu_x - mu_e and |v| = 1
        a = mu_x - mu_e
        av = float(a @ v)
        disc = av * av - float(a @ a) + (b * scale) ** 2
        # norm ratio (upper side): rms(rows + m v)^2 = r_x^2 + (2 m (mu_x . v) + m^2) / d <= ((1+b) r_e)^2
        mv = float(mu_x @ v)
        disc2 = mv * mv - d * (r_x**2 - ((1 + b) * r_e) ** 2)
        if disc < 0 or disc2 < 0:
            return 0.0
        m = max(0.0, min(-av + math.sqrt(disc), -mv + math.sqrt(disc2)))
        for _ in range(30):  # closed form first; check every fence exactly, back off if rounding bites
            if m == 0.0 or self._within_budget(rows + m * v, mu_e, r_e):
                return m
            m *= 0.5
        return 0.0

    def _within_budget(self, sent_rows: torch.Tensor, mu_e: torch.Tensor, r_e: float) -> bool:
        r_s = float(sent_rows.pow(2).mean().sqrt())
        dist = float((sent_rows.mean(dim=0) - mu_e).norm()) / (r_e * math.sqrt(sent_rows.shape[1]) + 1e-30)
        return abs(r_s / (r_e + 1e-30) - 1.0) <= self.budget and dist <= self.budget


class WhiteBox(Attack):
    """Adaptive, white box: knows the verifier's exact reference and fences and rides just below them.

    Each message it sends ``x + m * rms(x) * v``, with ``v`` a fixed random direction of the
    feature dimension per worker, stage and direction (unit rms per element, drawn from the
    first message's generator) and ``m`` the largest push in ``[0, max_push]`` that the verifier
    would accept *now*, found by bisection on the verifier's own decision (``ctx.oracle``),
    times ``margin``. While the verifier has no fences (calibrating) it sends the honest tensor:
    an attacker that pushed then would only widen fences it wants to learn first.

    Args:
        max_push: the largest push tried, relative to the message's rms.
        margin: fraction of the largest accepted push actually sent (1.0 = on the fence).
        iters: bisection steps (each one screening pass over the candidate tensor).

    Why it matters: the upper bound on what per-message screening lets through — any attacker
    with less knowledge does at most this much without being flagged. Needs the verifier's
    state, which only the simulator can hand over (``ctx.oracle``); a live worker refuses it.
    """

    name = "white_box"

    def __init__(self, max_push: float = 4.0, margin: float = 0.9, iters: int = 10, *,
                 directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if max_push <= 0:
            raise ValueError(f"max_push must be > 0; got {max_push}")
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1]; got {margin}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1; got {iters}")
        self.max_push, self.margin, self.iters = float(max_push), float(margin), int(iters)
        self._dirs: dict[tuple[Hashable, ...], torch.Tensor] = {}
        #: the push ``m`` of each message sent, per state key (what the attack managed, for reports)
        self.pushes: dict[tuple[Hashable, ...], list[float]] = {}

    def reset(self) -> None:
        self._dirs.clear()
        self.pushes.clear()

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        if ctx.oracle is None:
            raise ValueError("white_box needs the verifier's state (ctx.oracle), which only the simulator "
                             "provides; use ema_mimic for a live worker")
        key = self.state_key(ctx)
        if key not in self._dirs:
            self._dirs[key] = unit_direction(x, ctx.generator)
        step = rms(x) * self._dirs[key].to(dtype=x.dtype)

        def send(m: float) -> torch.Tensor:
            return x + m * step

        if ctx.oracle(send(0.0)) is None:  # no fences yet
            return x
        lo, hi = 0.0, self.max_push
        if ctx.oracle(send(hi)) is False:
            lo = hi
        else:
            for _ in range(self.iters):
                mid = 0.5 * (lo + hi)
                if ctx.oracle(send(mid)):
                    hi = mid
                else:
                    lo = mid
        m = lo * self.margin
        self.pushes.setdefault(key, []).append(m)
        return send(m) if m > 0 else x


def parse_stages(text: str) -> frozenset[int] | None:
    """Parse a stage set such as ``"1-2"``, ``"3"`` or ``"0-1+5"`` (``+`` joins parts).

    The empty string means every stage and returns ``None``. Raises ``ValueError`` on bad input.
    """
    text = text.strip()
    if not text:
        return None
    stages: set[int] = set()
    for part in text.split("+"):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad stage set {text!r}: use e.g. '1-2', '3' or '0-1+5'") from None
        if a < 0 or b < a:
            raise ValueError(f"bad stage range {part!r} in {text!r}: need 0 <= first <= last")
        stages.update(range(a, b + 1))
    return frozenset(stages)


class Collusion(Attack):
    """Colluding workers all push the same way, along a direction derived from a shared seed.

    The direction (unit rms per element, in the feature dimension) comes from ``group_seed``, not
    from ``ctx.generator``: every member with the same seed computes the same direction with no
    communication. Each member sends ``x + scale * rms(x) * direction``.

    Args:
        group_seed: the seed the colluders agreed on.
        scale: push size per element, relative to the tensor's rms.
        stages: attack only at these stages (``"1-2"``, ``"3"``, ``"0-1+5"``); empty = all.
        consecutive: the members hold consecutive stages; requires ``stages`` to be a contiguous
            range of at least two stages.

    Why it matters: independent attackers' perturbations partly cancel in a stage's average and
    stand out from each other; colluders' pushes add up and can shift the replica median the
    verifier anchors to. Colluders in consecutive stages defeat schemes where each worker checks
    the previous stage by recomputing it (duplicated blocks), since the checker is a colluder.
    """

    name = "collusion"

    def __init__(
        self,
        group_seed: int = 0,
        scale: float = 0.5,
        stages: str = "",
        consecutive: bool = False,
        *,
        directions: str = "both",
        start_step: int = 0,
    ) -> None:
        super().__init__(directions=directions, start_step=start_step)
        self.group_seed = int(group_seed)
        self.scale = float(scale)
        self.stages = stages
        self.consecutive = bool(consecutive)
        self._stage_set = parse_stages(stages)
        if consecutive:
            s = self._stage_set
            if s is None or len(s) < 2 or max(s) - min(s) + 1 != len(s):
                raise ValueError(f"consecutive=True needs stages to be a range of >= 2 stages, e.g. '1-2'; got {stages!r}")
        self._directions: dict[int, torch.Tensor] = {}

    def active(self, ctx: AttackContext) -> bool:
        return super().active(ctx) and (self._stage_set is None or ctx.stage in self._stage_set)

    def shared_direction(self, features: int) -> torch.Tensor:
        """The group's direction for a feature dimension of size ``features`` (float32, CPU)."""
        direction = self._directions.get(features)
        if direction is None:
            g = torch.Generator().manual_seed((self.group_seed * 1_000_003 + features) % (2**63))
            direction = unit_direction(torch.empty(features), g)
            self._directions[features] = direction
        return direction

    def perturb(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        features = x.shape[-1] if x.dim() > 0 else 1
        direction = self.shared_direction(features).reshape(x.shape[-1:])
        return x + (direction * (self.scale * rms(x))).to(device=x.device, dtype=x.dtype)
