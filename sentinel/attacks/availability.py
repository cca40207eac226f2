"""Attacks on time, not content: a worker that answers late or never.

Every tensor these workers send is honest, so no screen can flag them; what they cost is the
verifier's patience. A replica that is slow or silent must be routed around without stalling the
step (``sentinel.verifier.driver``: hedged hops, adaptive timeouts, back-off), which only a live
swarm can show: the simulator has no clock, and there these attacks are honest workers.
"""

from __future__ import annotations

import math

from sentinel.attacks.base import Attack, AttackContext

__all__ = ["AvailabilityAttack", "Silent", "Slow", "Trickle"]


class AvailabilityAttack(Attack):
    """Base: honest tensors, delayed replies (:meth:`reply_delay` seconds, ``inf`` = never)."""

    def attacks(self, direction: str) -> bool:
        return False  # the content is honest

    def reply_delay(self, ctx: AttackContext) -> float:
        """Seconds the worker holds its (honest) reply to this request before sending it."""
        if not self.active(ctx) or not (self.directions == "both" or self.directions == ctx.direction):
            return 0.0
        return self.delay(ctx)

    def delay(self, ctx: AttackContext) -> float:
        return 0.0

    def reply_pace(self, ctx: AttackContext) -> float | None:
        """Bytes per second at which the worker sends this reply (None = as fast as it can)."""
        if not self.active(ctx) or not (self.directions == "both" or self.directions == ctx.direction):
            return None
        return self.pace(ctx)

    def pace(self, ctx: AttackContext) -> float | None:
        return None


class Slow(AvailabilityAttack):
    """Answers every request ``delay`` seconds late.

    Args:
        delay: seconds added to each reply; the default 30 is beyond the verifier's 20-s
            timeout floor, so every reply arrives after the verifier gave up on it.

    Why it matters: a straggler that holds a micro-batch for the whole timeout stalls the step.
    """

    name = "slow"

    def __init__(self, delay: float = 30.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if not (delay >= 0 and math.isfinite(delay)):
            raise ValueError(f"delay must be a finite number of seconds >= 0; got {delay}")
        self.delay_s = float(delay)

    def delay(self, ctx: AttackContext) -> float:
        return self.delay_s


class Silent(AvailabilityAttack):
    """Accepts every request and never answers (the stream stays open until the caller gives up).

    Why it matters: the worst straggler; without a timeout the hop would wait forever.
    """

    name = "silent"

    def delay(self, ctx: AttackContext) -> float:
        return math.inf


class Trickle(AvailabilityAttack):
    """Answers at once, then sends its reply a few bytes at a time.

    Args:
        bytes_per_s: the sending rate; the default 4096 takes about a minute for one
            activation of the demo model (256 KiB), three times the 20-s timeout floor.

    Why it matters: the stream is alive and making progress, so a deadline on the first byte or
    an idle timeout never fires; only a deadline on the whole exchange (or a hedge) does.
    """

    name = "trickle"

    def __init__(self, bytes_per_s: float = 4096.0, *, directions: str = "both", start_step: int = 0) -> None:
        super().__init__(directions=directions, start_step=start_step)
        if not (bytes_per_s > 0 and math.isfinite(bytes_per_s)):
            raise ValueError(f"bytes_per_s must be a finite number > 0; got {bytes_per_s}")
        self.bytes_per_s = float(bytes_per_s)

    def pace(self, ctx: AttackContext) -> float | None:
        return self.bytes_per_s
