"""The registry of built-in attacks, by name.

The classes live in five small modules grouped by what the adversary exploits:
:mod:`~sentinel.attacks.simple` (one message at a time), :mod:`~sentinel.attacks.temporal`
(history and timing), :mod:`~sentinel.attacks.adaptive` (knowledge of the screening) and
:mod:`~sentinel.attacks.lazy` (credit without the work), plus
:mod:`~sentinel.attacks.averaging` (honest on the pipeline, poisoned in the stage's average) and
:mod:`~sentinel.attacks.availability` (honest tensors, late or never).
"""

from __future__ import annotations

from sentinel.attacks.adaptive import Alie, Collusion, EmaMimic, WhiteBox
from sentinel.attacks.availability import Silent, Slow, Trickle
from sentinel.attacks.averaging import AvgAlie, AvgRandom, AvgReducer, AvgScaling
from sentinel.attacks.base import Attack
from sentinel.attacks.lazy import LazyPartial, LazyRandom, LazySkip, LazyStale
from sentinel.attacks.simple import (
    Bias,
    Constant,
    ElementFlip,
    Gaussian,
    Invisible,
    Random,
    Scaling,
    SignFlip,
    Zeros,
)
from sentinel.attacks.temporal import Delay, Intermittent, SlowRamp

__all__ = ["BUILTIN_ATTACKS"]

#: Built-in attack classes in catalogue order; each is loaded by its ``name``.
BUILTIN_ATTACKS: tuple[type[Attack], ...] = (
    Zeros,
    Constant,
    Random,
    Scaling,
    SignFlip,
    Gaussian,
    Bias,
    Delay,
    Invisible,
    ElementFlip,
    Intermittent,
    SlowRamp,
    Alie,
    EmaMimic,
    Collusion,
    WhiteBox,
    LazySkip,
    LazyStale,
    LazyRandom,
    LazyPartial,
    AvgScaling,
    AvgRandom,
    AvgAlie,
    AvgReducer,
    Slow,
    Silent,
    Trickle,
)
