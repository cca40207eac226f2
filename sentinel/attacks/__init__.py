"""Attack catalogue: what malicious workers send instead of their true activations and gradients.

Load an attack by spec (``load_attack("scaling,factor=10")``, or ``path/to/file.py:MyAttack``
for your own), then call ``attack.forward(x, ctx)`` / ``attack.backward(g, ctx)`` with an
:class:`AttackContext` describing the message. See :mod:`sentinel.attacks.loader` for the spec
syntax and :mod:`sentinel.attacks.catalogue` for the built-ins.
"""

from sentinel.attacks.adaptive import Alie, Collusion, EmaMimic, WhiteBox
from sentinel.attacks.averaging import AvgAlie, AvgRandom, AvgReducer, AvgScaling
from sentinel.attacks.base import DIRECTIONS, Attack, AttackContext
from sentinel.attacks.catalogue import BUILTIN_ATTACKS
from sentinel.attacks.lazy import LazyPartial, LazyRandom, LazySkip, LazyStale
from sentinel.attacks.loader import (
    AttackSpecError,
    PluginAttack,
    available_attacks,
    default_directions,
    load_attack,
)
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

__all__ = [
    "BUILTIN_ATTACKS",
    "DIRECTIONS",
    "Alie",
    "Attack",
    "AttackContext",
    "AttackSpecError",
    "AvgAlie",
    "AvgRandom",
    "AvgReducer",
    "AvgScaling",
    "Bias",
    "Collusion",
    "Constant",
    "Delay",
    "PluginAttack",
    "default_directions",
    "ElementFlip",
    "EmaMimic",
    "Gaussian",
    "Intermittent",
    "Invisible",
    "LazyPartial",
    "LazyRandom",
    "LazySkip",
    "LazyStale",
    "Random",
    "Scaling",
    "SignFlip",
    "SlowRamp",
    "WhiteBox",
    "Zeros",
    "available_attacks",
    "load_attack",
]
