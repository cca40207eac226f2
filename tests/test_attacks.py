"""Tests of the attack catalogue and the spec loader (sentinel.attacks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sentinel.attacks import (
    Attack,
    AttackContext,
    AttackSpecError,
    EmaMimic,
    PluginAttack,
    available_attacks,
    default_directions,
    load_attack,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "my_attack.py"

ALL_NAMES = [
    "zeros", "constant", "random", "scaling", "sign_flip", "gaussian", "bias", "delay", "invisible",
    "element_flip", "intermittent", "slow_ramp", "alie", "ema_mimic", "collusion",
]
# Need more context than a tensor: the verifier's state (white_box) or the stage module (lazy
# workers, tests/test_lazy_attacks.py).
CONTEXT_NAMES = ["white_box", "lazy_skip", "lazy_stale", "lazy_random", "lazy_partial"]
# Honest on the pipeline, poisoned in averaging: tests/test_averaging_attacks.py (and the lying
# butterfly reducer, tests/test_butterfly.py).
AVERAGING_NAMES = ["avg_scaling", "avg_random", "avg_alie", "avg_reducer"]
# Honest tensors, late or never: the live drill in tests/test_swarm_faults.py.
AVAILABILITY_NAMES = ["slow", "silent", "trickle"]
# Specs under which each attack changes every message from the second one on.
ALWAYS_FIRES = {name: name for name in ALL_NAMES} | {"intermittent": "intermittent,p=1"}


def ctx(step: int = 0, *, seed: int = 0, stage: int = 1, worker: str = "w0", direction: str = "forward",
        micro_batch: int = 0, generator: torch.Generator | None = None) -> AttackContext:
    return AttackContext(
        step=step, stage=stage, worker=worker, micro_batch=micro_batch, direction=direction,
        generator=generator if generator is not None else torch.Generator().manual_seed(seed), num_stages=4,
    )


def honest_stream(n: int, shape: tuple[int, ...] = (4, 8, 16), noise: float = 0.01, seed: int = 1) -> list[torch.Tensor]:
    """Messages of a stationary honest worker: a fixed pattern plus small noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + noise * torch.randn(shape, generator=g) for _ in range(n)]


def run(attack: Attack, xs: list[torch.Tensor], *, seed: int = 0, direction: str = "forward", **kw) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    send = attack.forward if direction == "forward" else attack.backward
    return [send(x, ctx(t, generator=g, direction=direction, **kw)) for t, x in enumerate(xs)]


# -- catalogue-wide properties ---------------------------------------------------------------------


def test_catalogue_lists_every_builtin() -> None:
    assert list(available_attacks()) == ALL_NAMES + CONTEXT_NAMES + AVERAGING_NAMES + AVAILABILITY_NAMES
    for name, cls in available_attacks().items():
        assert cls.name == name
        assert cls.__doc__ and "Why it matters" in (cls.__doc__ + (cls.__mro__[1].__doc__ or ""))


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_builtin_preserves_shape_dtype_input_and_changes_x(name: str, dtype: torch.dtype, direction: str) -> None:
    xs = [x.to(dtype) for x in honest_stream(3)]
    originals = [x.clone() for x in xs]
    outs = run(load_attack(ALWAYS_FIRES[name]), xs, direction=direction)
    for x, original, out in zip(xs, originals, outs, strict=True):
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert torch.equal(x, original), "attack modified its input in place"
    for x, out in zip(xs[1:], outs[1:], strict=True):
        assert not torch.equal(out, x), f"{name} did not change the message"


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (2, 3, 4)])
def test_builtin_handles_any_shape(name: str, shape: tuple[int, ...]) -> None:
    xs = [torch.randn(shape, generator=torch.Generator().manual_seed(t)) + 2.0 for t in range(3)]
    for x, out in zip(xs, run(load_attack(ALWAYS_FIRES[name]), xs), strict=True):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_builtin_is_deterministic_for_a_seed(name: str) -> None:
    xs = honest_stream(4)
    first = run(load_attack(name), xs, seed=5)
    second = run(load_attack(name), xs, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_random_attacks_follow_the_seed() -> None:
    xs = honest_stream(2)
    for name in ("random", "gaussian", "element_flip", "bias"):
        a, b = run(load_attack(name), xs, seed=1), run(load_attack(name), xs, seed=2)
        assert not torch.equal(a[1], b[1]), name


# -- loading and parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, attr, value",
    [
        ("scaling,factor=-1", "factor", -1.0),
        ("scaling,factor=10", "factor", 10.0),
        ("gaussian,sigma=0.5", "sigma", 0.5),
        ("constant,value=3", "value", 3.0),
        ("bias,bias=2", "bias", 2.0),
        ("delay,k=7", "k", 7),
        ("invisible,eps=1e-4", "eps", 1e-4),
        ("element_flip,fraction=0.5", "fraction", 0.5),
        ("intermittent,p=0.25,inner=sign_flip", "p", 0.25),
        ("slow_ramp,rate=0.1,mode=scale", "mode", "scale"),
        ("alie,z=2", "z", 2.0),
        ("ema_mimic,budget=0.1,track=sent", "budget", 0.1),
        ("collusion,group_seed=3,stages=1-2,consecutive=true", "consecutive", True),
        ("Sign-Flip,start_step=4", "start_step", 4),
        ("zeros,directions=backward", "directions", "backward"),
        ("gaussian, sigma = 0.5 ,", "sigma", 0.5),
    ],
)
def test_spec_parameters_are_parsed_and_typed(spec: str, attr: str, value: object) -> None:
    attack = load_attack(spec)
    got = getattr(attack, attr)
    assert got == value and type(got) is type(value)


def test_nested_inner_parameters() -> None:
    attack = load_attack("intermittent,p=1,inner=scaling,inner.factor=10")
    x = torch.ones(2, 3)
    assert torch.equal(attack.forward(x, ctx()), 10 * x)
    assert load_attack("intermittent,inner.factor=3").inner.factor == 3.0  # inner defaults to sign_flip


def test_directions_are_respected() -> None:
    x = torch.randn(4, 8)
    for attack in (load_attack("sign_flip", directions="forward"), load_attack("sign_flip,directions=forward")):
        assert torch.equal(attack.forward(x, ctx(direction="forward")), -x)
        assert attack.backward(x, ctx(direction="backward")) is x
    backward_only = load_attack("gaussian", directions="backward")
    assert backward_only.forward(x, ctx()) is x
    assert not torch.equal(backward_only.backward(x, ctx(direction="backward")), x)
    with pytest.raises(AttackSpecError, match="directions"):
        load_attack("zeros,directions=forward", directions="backward")
    with pytest.raises(AttackSpecError, match="directions"):
        load_attack("zeros,directions=sideways")


def test_start_step_is_respected() -> None:
    attack = load_attack("gaussian,start_step=5")
    xs = honest_stream(8)
    outs = run(attack, xs)
    assert all(out is x for x, out in zip(xs[:5], outs[:5], strict=True))
    assert all(not torch.equal(out, x) for x, out in zip(xs[5:], outs[5:], strict=True))


def test_slow_ramp_grows_linearly_from_start_step() -> None:
    attack = load_attack("slow_ramp,rate=0.1,start_step=2")
    xs = honest_stream(8)
    push = [float((out - x).pow(2).mean().sqrt()) / float(x.pow(2).mean().sqrt()) for x, out in zip(xs, run(attack, xs), strict=True)]
    assert push[:3] == [0.0, 0.0, 0.0]
    assert push[3:] == pytest.approx([0.1 * (t - 2) for t in range(3, 8)], rel=1e-3)
    scale = load_attack("slow_ramp,rate=0.5,mode=scale,max_strength=1")
    x = torch.ones(3)
    assert torch.equal(scale.forward(x, ctx(3)), 2 * x)


# -- individual attacks ----------------------------------------------------------------------------


def test_intermittent_hits_about_p_of_messages() -> None:
    attack = load_attack("intermittent,p=0.25,inner=sign_flip")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8) + 1.0
    n = 2000
    hits = sum(not torch.equal(attack.forward(x, ctx(t, generator=g)), x) for t in range(n))
    assert abs(hits / n - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


def test_delay_replays_the_exact_output_of_k_steps_earlier() -> None:
    k = 5
    attack = load_attack(f"delay,k={k}")
    xs = [torch.full((2, 3), float(t)) for t in range(30)]
    outs = run(attack, xs)
    assert outs[0] is xs[0]  # nothing to replay yet: documented honest first message
    for t in range(1, k):
        assert torch.equal(outs[t], xs[0])  # before k steps of history: the oldest available
    for t in range(k, 30):
        assert torch.equal(outs[t], xs[t - k])
    assert all(len(h) <= k + 1 for h in attack._history.values())  # bounded FIFO


def test_delay_keeps_workers_and_directions_apart() -> None:
    attack = load_attack("delay,k=1")
    a0, b0, a1 = torch.zeros(3), torch.ones(3), torch.full((3,), 2.0)
    attack.forward(a0, ctx(0, worker="a"))
    attack.forward(b0, ctx(0, worker="b"))
    attack.backward(b0, ctx(0, worker="a", direction="backward"))
    assert torch.equal(attack.forward(a1, ctx(1, worker="a")), a0)
    assert torch.equal(attack.backward(a1, ctx(1, worker="a", direction="backward")), b0)


def test_alie_shifts_each_channel_against_its_mean() -> None:
    x = torch.randn(6, 5, 4) + torch.tensor([1.0, -1.0, 2.0, -2.0])
    out = load_attack("alie,z=1.5").forward(x, ctx())
    rows = x.reshape(-1, 4)
    expected = -1.5 * rows.std(dim=0, correction=0) * rows.mean(dim=0).sign()
    assert torch.allclose((out - x).reshape(-1, 4), expected.expand(30, 4), atol=1e-5)


def test_ema_mimic_stays_within_budget_while_its_push_grows() -> None:
    budget, beta = 0.05, 0.9
    attack = load_attack(f"ema_mimic,budget={budget},momentum={beta}")
    assert isinstance(attack, EmaMimic)
    xs = honest_stream(60, noise=0.02)
    outs = run(attack, xs)
    mu_e, r_e = xs[0].reshape(-1, 16).mean(0), float(xs[0].pow(2).mean().sqrt())
    pushes = []
    for x, out in zip(xs, outs, strict=True):
        rows = out.reshape(-1, 16)
        ratio = float(out.pow(2).mean().sqrt()) / r_e
        dist = float((rows.mean(0) - mu_e).norm()) / (r_e * 4.0)
        assert abs(ratio - 1) <= budget + 1e-6 and dist <= budget + 1e-6
        pushes.append((out - x).reshape(-1, 16).mean(0))
        mu_e = beta * mu_e + (1 - beta) * x.reshape(-1, 16).mean(0)
        r_e = beta * r_e + (1 - beta) * float(x.pow(2).mean().sqrt())
    direction = pushes[0] / pushes[0].norm()
    along = torch.stack([p @ direction for p in pushes])
    assert (along > 0).float().mean() > 0.9  # pushes nearly every message...
    assert all(float(torch.nn.functional.cosine_similarity(p, direction, dim=0)) > 0.999 for p in pushes if p.norm() > 0)
    cumulative = along.cumsum(0)
    assert cumulative[-1] > 10 * cumulative[4] > 0  # ...always the same way, so the push adds up


def test_ema_mimic_tracking_what_it_sent_drifts_away_from_honest() -> None:
    xs = honest_stream(80, noise=0.0)
    outs = run(load_attack("ema_mimic,budget=0.05,track=sent"), xs)
    offsets = [float((out - x).reshape(-1, 16).mean(0).norm()) for x, out in zip(xs, outs, strict=True)]
    assert offsets[-1] > 3 * offsets[0] > 0


def test_collusion_members_push_the_same_way() -> None:
    x1, x2 = torch.randn(4, 8, 16), torch.randn(4, 8, 16) * 3
    m1, m2 = load_attack("collusion,group_seed=7"), load_attack("collusion,group_seed=7")
    d1 = (m1.forward(x1, ctx(seed=1, worker="a", stage=0)) - x1)[0, 0]
    d2 = (m2.backward(x2, ctx(seed=2, worker="b", stage=3, direction="backward")) - x2)[0, 0]
    assert float(torch.nn.functional.cosine_similarity(d1, d2, dim=0)) == pytest.approx(1.0, abs=1e-5)
    other = load_attack("collusion,group_seed=8")
    d3 = (other.forward(x1, ctx()) - x1)[0, 0]
    assert float(torch.nn.functional.cosine_similarity(d1, d3, dim=0)) < 0.9


def test_collusion_attacks_only_its_stages() -> None:
    attack = load_attack("collusion,group_seed=1,stages=1-2,consecutive=true")
    x = torch.randn(3, 4)
    assert [not torch.equal(attack.forward(x, ctx(stage=s)), x) for s in range(4)] == [False, True, True, False]
    with pytest.raises(AttackSpecError, match="consecutive"):
        load_attack("collusion,stages=1+3,consecutive=true")
    with pytest.raises(AttackSpecError, match="stage"):
        load_attack("collusion,stages=one")


# -- plugins ---------------------------------------------------------------------------------------


def test_plugin_loads_by_path_with_and_without_parameters() -> None:
    freeze = load_attack(f"{EXAMPLE}:Freeze")
    assert isinstance(freeze, Attack) and freeze.every == 10
    freeze = load_attack(f"{EXAMPLE}:Freeze,every=3")
    xs = [torch.full((2,), float(t)) for t in range(4)]
    assert [float(out[0]) for out in run(freeze, xs)] == [0.0, 0.0, 0.0, 3.0]


def test_plugin_loads_by_relative_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert load_attack("examples/my_attack.py:Freeze,every=2").every == 2


def test_plugin_loads_by_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    assert load_attack("examples.my_attack:Freeze,start_step=3").start_step == 3


def test_plugin_not_subclassing_attack() -> None:
    dampen = load_attack(f"{EXAMPLE}:Dampen,factor=0.25")
    g = torch.ones(3)
    assert torch.equal(dampen.backward(g, ctx(direction="backward")), 0.25 * g)
    assert isinstance(dampen, PluginAttack)
    # it defines only backward, so that is what it attacks unless told otherwise
    assert dampen.directions == "backward" and dampen.attacks("backward") and not dampen.attacks("forward")
    x = torch.ones(3)
    assert dampen.forward(x, ctx()) is x
    assert dampen.average(x, ctx(direction="average")) is x  # no average method: honest there
    wrapped = load_attack(f"{EXAMPLE}:Dampen", directions="forward")
    assert wrapped.backward(g, ctx(direction="backward")) is g
    late = load_attack(f"{EXAMPLE}:Dampen")
    late.start_step = 5
    assert late.backward(g, ctx(direction="backward")) is g  # ctx() is step 0: not started yet
    assert load_attack(f"intermittent,p=1,inner={EXAMPLE}:Dampen").backward(g, ctx()).sum() == 1.5


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(AttackSpecError) as info:
        load_attack("gausian")
    message = str(info.value)
    assert "gausian" in message and "Did you mean 'gaussian'" in message
    assert all(name in message for name in ALL_NAMES)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("gaussian,sigam=1", "unknown parameter 'sigam'"),
        ("gaussian,sigma=abc", "'sigma' expects a number"),
        ("delay,k=2.5", "'k' expects an integer"),
        ("collusion,consecutive=maybe", "'consecutive' expects true/false"),
        ("intermittent,p=2", "p must be in [0, 1]"),
        ("intermittent,inner=nope", "unknown attack 'nope'"),
        ("intermittent,inner.sigma=1", "unknown parameter 'sigma'"),
        ("zeros,inner.x=1", "unknown parameter 'inner'"),
        ("gaussian,sigma", "key=value"),
        ("gaussian,sigma=1,sigma=2", "given twice"),
        ("", "empty attack spec"),
        ("missing/dir/attack.py:Foo", "attack file not found"),
        (f"{EXAMPLE}:Nope", "no class 'Nope'"),
        (f"{EXAMPLE}:Freeze,every=0", "every must be >= 1"),
        (f"{EXAMPLE}:Freeze,speed=2", "unknown parameter 'speed'"),
        ("no_such_package.attacks:Foo", "cannot import module"),
        ("math:pi", "not a class"),
        ("collections:OrderedDict", "is not an attack"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: str, fragment: str) -> None:
    with pytest.raises(AttackSpecError) as info:
        load_attack(spec)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_class_lists_the_attack_classes_there() -> None:
    with pytest.raises(AttackSpecError, match="Freeze"):
        load_attack(f"{EXAMPLE}:Nope")


def test_broken_plugin_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(AttackSpecError, match="boom"):
        load_attack(f"{path}:Anything")


def test_examples_in_the_loader_docstring_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from sentinel.attacks import loader

    monkeypatch.chdir(REPO)
    examples_line = loader.__doc__.split("Examples:")[1].split("\n\n")[0]
    specs = re.findall(r"``([^`]+)``", examples_line)
    assert len(specs) >= 6
    for spec in specs:
        load_attack(spec)


def test_availability_attacks_send_honest_tensors_late_or_never() -> None:
    x = torch.randn(2, 3, 4)
    slow, silent = load_attack("slow,delay=25,start_step=3"), load_attack("silent,directions=backward")
    for direction in ("forward", "backward"):
        c = ctx(5, direction=direction)
        assert slow.forward(x, c) is x and slow.backward(x, c) is x
        assert slow.reply_delay(c) == 25.0
        assert slow.reply_delay(ctx(2, direction=direction)) == 0.0  # honest before start_step
    assert silent.reply_delay(ctx(0, direction="backward")) == math.inf
    assert silent.reply_delay(ctx(0, direction="forward")) == 0.0
    with pytest.raises(ValueError):
        load_attack("slow,delay=-1")
    trickle = load_attack("trickle,bytes_per_s=100,start_step=3")
    assert trickle.reply_delay(ctx(5)) == 0.0 and trickle.reply_pace(ctx(5)) == 100.0
    assert trickle.reply_pace(ctx(2)) is None and slow.reply_pace(ctx(5)) is None
    with pytest.raises(ValueError):
        load_attack("trickle,bytes_per_s=0")


def test_plain_plugin_defaults_to_the_directions_it_defines(tmp_path) -> None:
    plugin = tmp_path / "plugins.py"
    plugin.write_text(
        "class Both:\n"
        "    def forward(self, x, ctx):\n        return -x\n"
        "    def backward(self, g, ctx):\n        return -g\n"
        "class OnlyForward:\n"
        "    def forward(self, x, ctx):\n        return -x\n"
        "class Poison:\n"
        "    def average(self, params, ctx):\n        return 0 * params\n"
    )
    assert load_attack(f"{plugin}:Both").directions == "both"
    assert load_attack(f"{plugin}:OnlyForward").directions == "forward"
    poison = load_attack(f"{plugin}:Poison")
    p = torch.ones(4)
    assert torch.equal(poison.average(p, ctx(direction="average")), torch.zeros(4))
    assert poison.forward(p, ctx()) is p and poison.backward(p, ctx()) is p
    assert default_directions(f"{plugin}:Poison") is None and default_directions("sign_flip") == "forward"
    assert default_directions("gaussian,sigma=1,directions=backward") is None
