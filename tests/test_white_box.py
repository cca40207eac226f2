"""The white-box attacker and the verifier decision it reads (BoundaryScreen.would_flag)."""

from __future__ import annotations

import math

import pytest
import torch

from sentinel.attacks import AttackContext, load_attack
from sentinel.run.screening import ScreeningConfig
from sentinel.verifier.screen import BoundaryScreen

B, T, D = 8, 8, 64
WORKERS = 4
ATTACKER = "w3"


U = torch.randn(D, generator=torch.Generator().manual_seed(99))  # the stage's mean activation


def honest(i: int, g: torch.Generator) -> torch.Tensor:
    return U + 1.6 * torch.randn(B, T, D, generator=g)


def calibrated(seed: int = 0, n: int = 400) -> tuple[BoundaryScreen, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    screen = BoundaryScreen(ScreeningConfig(), "forward")
    for i in range(n):
        screen.screen(f"w{i % WORKERS}", honest(i, g))
    assert screen.calibrated
    return screen, g


def ctx(screen: BoundaryScreen, step: int, g: torch.Generator) -> AttackContext:
    return AttackContext(step=step, stage=1, worker=ATTACKER, micro_batch=0, direction="forward", generator=g,
                         oracle=lambda t: screen.would_flag(ATTACKER, t))


def test_would_flag_agrees_with_screen_and_changes_nothing() -> None:
    screen, g = calibrated()
    before = screen.summary()
    cases = [honest(0, g) for _ in range(20)] + [-honest(0, g), 10 * honest(0, g), torch.zeros(B, T, D)]
    for x in cases:
        screen.would_flag("w0", x)
    assert screen.summary() == before, "would_flag changed the screen's state"
    predicted = []
    for x in cases:  # the decision of the moment: predict, then screen
        predicted.append(screen.would_flag("w0", x))
        assert screen.screen("w0", x).flagged == predicted[-1]
    assert predicted[-3:] == [True, True, True]


def test_would_flag_is_none_before_calibration_and_true_for_non_finite() -> None:
    screen = BoundaryScreen(ScreeningConfig(), "forward")
    x = torch.randn(B, T, D)
    assert screen.would_flag("w0", x) is None
    bad = x.clone()
    bad[0, 0, 0] = math.nan
    assert screen.would_flag("w0", bad) is True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_white_box_pushes_but_is_never_flagged(seed: int) -> None:
    screen, g = calibrated(seed)
    attack = load_attack("white_box")
    flagged, pushes = 0, []
    for i in range(200):
        worker = f"w{i % WORKERS}"
        x = honest(i, g)
        if worker == ATTACKER:
            sent = attack.forward(x, ctx(screen, i, g))
            pushes.append(float((sent - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()))
            flagged += screen.screen(worker, sent).flagged
        else:
            screen.screen(worker, x)
    assert flagged == 0
    assert sum(p > 0 for p in pushes) >= 0.9 * len(pushes), "the attack rarely pushed at all"
    assert max(pushes) < 4.0


def test_white_box_stays_honest_while_the_verifier_calibrates() -> None:
    screen = BoundaryScreen(ScreeningConfig(), "forward")
    g = torch.Generator().manual_seed(0)
    x = honest(0, g)
    assert torch.equal(load_attack("white_box").forward(x, ctx(screen, 0, g)), x)


def test_white_box_pushes_to_the_limit_where_nothing_is_flagged() -> None:
    g = torch.Generator().manual_seed(0)
    x = honest(0, g)
    c = AttackContext(step=0, stage=1, worker="w", micro_batch=0, direction="forward", generator=g,
                      oracle=lambda t: False)
    sent = load_attack("white_box,max_push=2,margin=1").forward(x, c)
    assert math.isclose(float((sent - x).pow(2).mean().sqrt()), 2 * float(x.pow(2).mean().sqrt()), rel_tol=1e-4)


def test_white_box_without_an_oracle_says_why() -> None:
    c = AttackContext(step=0, stage=1, worker="w", micro_batch=0, direction="forward",
                      generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="simulator"):
        load_attack("white_box").forward(torch.randn(2, 3, 4), c)
