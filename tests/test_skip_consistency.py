"""The ``skip`` statistic: each reply compared with the hop's own source, token by token.

A synthetic residual stage, ``out = h + f(h)`` with a small random block ``f`` (and, backward,
``g_in = g_out + J^T g_out`` with a small random ``J``), stands in for a decoder stage. Four
replicas take turns; an attack applies to ``w3`` only. The checks are on the mechanism, not on
one seed: the statistic's values, its parsing as hostile evidence, and that attacks the
batch-level statistics cannot see (a sign-flipped or noisy *gradient*) are flagged on the
attacker's messages while the honest replicas' messages are not.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.run.screening import ScreeningConfig
from sentinel.verifier.reference import Profile, profile_of
from sentinel.verifier.screen import BoundaryScreen
from sentinel.verifier.stats import TensorStats, _row_dots, compute_stats
from sentinel.verifier.strikes import StrikeLedger, majority_allows_ban

B, T, D = 4, 16, 48


def test_skip_values() -> None:
    cfg = ScreeningConfig()
    h = torch.randn(B, T, D)
    assert compute_stats(h, cfg).skip is None  # no source, no statistic
    assert compute_stats(h, cfg, torch.randn(B, T, D + 1)).skip is None  # shape mismatch: ignored
    assert compute_stats(h, cfg, h).skip == pytest.approx(1.0, abs=1e-6)
    assert compute_stats(-h, cfg, h).skip == pytest.approx(-1.0, abs=1e-6)
    assert compute_stats(3.0 * h, cfg, h).skip == pytest.approx(1.0, abs=1e-6)  # scale-free
    assert abs(compute_stats(torch.randn(B, T, D), cfg, h).skip) < 0.1
    assert compute_stats(torch.zeros(B, T, D), cfg, h).skip == 0.0  # no direction: orthogonal
    # tokens that received no gradient say nothing about the reply: left out, not counted as 0
    src = h.clone()
    src[0] = 0.0
    assert compute_stats(h, cfg, src).skip == pytest.approx(1.0, abs=1e-6)
    assert compute_stats(h, cfg, torch.zeros(B, T, D)).skip is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 5.0))
def test_skip_is_a_cosine_and_survives_the_evidence_round_trip(seed: int, noise: float) -> None:
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, T, D, generator=g)
    out = src + noise * torch.randn(B, T, D, generator=g)
    s = compute_stats(out, ScreeningConfig(), src)
    assert s.skip is not None and -1.0 <= s.skip <= 1.0
    back = TensorStats.from_dict(s.to_dict())
    assert back.skip == pytest.approx(s.skip)
    p = profile_of(back)
    assert Profile.from_dict(p.to_dict()).log_skip == pytest.approx(p.log_skip)


def test_hostile_skip_values_are_rejected() -> None:
    d = compute_stats(torch.randn(B, T, D), ScreeningConfig(), torch.randn(B, T, D)).to_dict()
    for bad in (2.0, -1.5, float("nan"), "0.9", True, [0.5]):
        with pytest.raises(ValueError):
            TensorStats.from_dict({**d, "skip": bad})
    legacy = {k: v for k, v in d.items() if k != "skip"}  # records from before the statistic
    assert TensorStats.from_dict(legacy).skip is None
    p = profile_of(TensorStats.from_dict(d)).to_dict()
    for bad in (5.0, -10.0, float("inf"), "x"):
        with pytest.raises(ValueError):
            Profile.from_dict({**p, "log_skip": bad})


class ResidualStage:
    """``h -> h + f(h)`` with a small random MLP ``f``; backward through the same map."""

    def __init__(self, seed: int, strength: float = 0.15) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(D, 2 * D, generator=g) * strength / math.sqrt(D)
        self.w2 = torch.randn(2 * D, D, generator=g) / math.sqrt(2 * D)

    def f(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.w1) @ self.w2

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.f(h)

    def backward(self, h: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
        x = h.detach().requires_grad_(True)
        (self.forward(x) * g_out).sum().backward()
        return x.grad


ATTACKS = {
    "sign_flip": lambda y, g: -y,
    "gaussian_sigma_0.5": lambda y, g: y + 0.5 * y.pow(2).mean().sqrt() * torch.randn(y.shape, generator=g),
    "element_flip_20pct": lambda y, g: torch.where(torch.rand(y.shape, generator=g) < 0.2, -y, y),
    "random": lambda y, g: torch.randn(y.shape, generator=g) * y.pow(2).mean().sqrt(),
}


def _stream(direction: str, attack: str | None, n: int, seed: int) -> tuple[float, float]:
    """(share of the attacker's messages flagged, share of honest messages flagged)."""
    cfg = ScreeningConfig()
    screen = BoundaryScreen(cfg, direction)
    stage = ResidualStage(seed)
    g = torch.Generator().manual_seed(seed + 1)
    flagged = {True: 0, False: 0}
    sent = {True: 0, False: 0}
    for i in range(n):
        worker = f"w{i % 4}"
        # heavy-tailed, scale-drifting inputs like a real stream's
        scale = 20.0 ** (i / n) if direction == "forward" else 20.0 ** (-i / n)
        h = torch.randn(B, T, D, generator=g) * torch.exp(0.5 * torch.randn(B, T, 1, generator=g)) * scale
        if direction == "forward":
            source, reply = h, stage.forward(h)
        else:
            act = torch.randn(B, T, D, generator=g)
            source, reply = h, stage.backward(act, h)
        bad = attack is not None and worker == "w3"
        if bad:
            reply = ATTACKS[attack](reply, g)
        v = screen.screen(worker, reply, source)
        if i >= n // 4:  # judged once calibrated
            flagged[bad] += v.flagged
            sent[bad] += 1
    rate = {k: flagged[k] / sent[k] if sent[k] else 0.0 for k in sent}
    return rate[True], rate[False]


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_on_the_skip_connection_are_flagged(direction: str, attack: str) -> None:
    hit, false_alarms = _stream(direction, attack, 400, seed=11)
    assert hit >= 0.9, f"{attack}/{direction}: only {hit:.0%} of the attacker's messages flagged"
    assert false_alarms <= 0.05, f"{attack}/{direction}: {false_alarms:.1%} of honest messages flagged"


def test_sign_flipped_gradient_is_invisible_without_the_source() -> None:
    """Why the statistic exists: the same stream screened without sources misses a gradient sign flip."""
    cfg = ScreeningConfig()
    with_src, without = BoundaryScreen(cfg, "backward"), BoundaryScreen(cfg, "backward")
    stage = ResidualStage(3)
    g = torch.Generator().manual_seed(4)
    hits = {"with": 0, "without": 0}
    for i in range(300):
        worker = f"w{i % 4}"
        g_out = torch.randn(B, T, D, generator=g) * torch.exp(0.5 * torch.randn(B, T, 1, generator=g))
        reply = stage.backward(torch.randn(B, T, D, generator=g), g_out)
        if worker == "w3":
            reply = -reply
        a, b = with_src.screen(worker, reply, g_out), without.screen(worker, reply)
        if worker == "w3" and i >= 100:
            hits["with"] += a.flagged
            hits["without"] += b.flagged
    assert hits["with"] >= 45  # 50 attacker messages after calibration
    assert hits["without"] <= 10
    # ban evidence carries the statistic: another verifier re-scoring it sees what this one saw
    g_out = torch.randn(B, T, D, generator=g) * torch.exp(0.5 * torch.randn(B, T, 1, generator=g))
    honest = stage.backward(torch.randn(B, T, D, generator=g), g_out)
    cfg = with_src.config
    flipped = with_src.rescore(TensorStats.from_dict(compute_stats(-honest, cfg, g_out).to_dict()))
    assert "skip" in flipped.reasons, flipped
    fine = with_src.rescore(TensorStats.from_dict(compute_stats(honest, cfg, g_out).to_dict()))
    assert "skip" not in fine.reasons, fine


def test_majority_bound_holds_a_ban_and_releases_it() -> None:
    assert majority_allows_ban(3, 0) and not majority_allows_ban(3, 1)
    assert majority_allows_ban(8, 2) and not majority_allows_ban(8, 3)
    assert not majority_allows_ban(2, 0) and not majority_allows_ban(1, 0)
    allow = {"a": False}
    ledger = StrikeLedger(3, 10, may_ban=lambda w: allow["a"])
    for _ in range(5):
        st_ = ledger.record("a", True)
    assert not st_.banned and st_.held and st_.strikes == 3.0  # held at the limit, not beyond
    st_ = ledger.record("a", False)
    assert not st_.held and st_.strikes < 3.0  # a clean message forgives as usual
    allow["a"] = True
    st_ = ledger.record("a", True)
    assert st_.banned and st_.banned_now and not st_.held


@pytest.mark.parametrize("shape", [(3, 5), (4097, 64), (300, 1000), (2, 300000)])
def test_chunked_row_dots_match_one_matmul_per_row(shape: tuple[int, int]) -> None:
    """The chunked dot pass (chunks of 2**18 elements, with a remainder) equals a per-row matmul."""
    g = torch.Generator().manual_seed(shape[0])
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = torch.bmm(a.unsqueeze(1).double(), b.unsqueeze(2).double()).view(-1)
    torch.testing.assert_close(_row_dots(a, b).double(), expected, rtol=1e-5, atol=1e-3)


def _gain_stream(factor: float, n: int, seed: int, with_source: bool = True) -> tuple[float, float]:
    """Backward stream whose incoming gradient's scale swings over two decades from one message
    to the next (one micro-batch's loss is not another's, and a scaling accepted further down the
    pipeline multiplies everything above it); ``w3`` multiplies its replies by ``factor``.
    Returns (share of the attacker's messages flagged, share of honest messages flagged)."""
    screen = BoundaryScreen(ScreeningConfig(), "backward")
    stage = ResidualStage(seed)
    g = torch.Generator().manual_seed(seed + 1)
    flagged = {True: 0, False: 0}
    sent = {True: 0, False: 0}
    for i in range(n):
        worker = f"w{i % 4}"
        scale = 10.0 ** (2.0 * float(torch.rand((), generator=g)) - 1.0)
        g_out = torch.randn(B, T, D, generator=g) * torch.exp(0.5 * torch.randn(B, T, 1, generator=g)) * scale
        reply = stage.backward(torch.randn(B, T, D, generator=g), g_out)
        bad = worker == "w3"
        if bad:
            reply = reply * factor
        v = screen.screen(worker, reply, g_out if with_source else None)
        if i >= n // 4:
            flagged[bad] += v.flagged
            sent[bad] += 1
    return flagged[True] / sent[True], flagged[False] / sent[False]


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0, 10.0])
def test_scaled_gradients_are_judged_by_the_hop_gain(factor: float) -> None:
    """The norm distance judges ``rms(reply) / rms(source)`` where the hop has a source: the
    incoming gradient's scale, however it swings, is not the worker's doing."""
    hit, false_alarms = _gain_stream(factor, 400, seed=5)
    assert hit >= 0.9, f"x{factor}: only {hit:.0%} of the attacker's messages flagged"
    assert false_alarms <= 0.05, f"x{factor}: {false_alarms:.1%} of honest messages flagged"


def test_scaled_gradients_hide_in_the_input_scale_without_the_source() -> None:
    """Why: judged by its absolute RMS, a x2 gradient is lost in the incoming gradient's swings."""
    hit, _ = _gain_stream(2.0, 400, seed=5, with_source=False)
    assert hit <= 0.2


def test_a_zero_source_is_neither_judged_nor_learnt() -> None:
    """An upstream zero that got through (e.g. during a calibration) makes every honest replica
    return zeros: learnt from, that pulled the reference scale to zero and every honest reply
    afterwards was flagged (lock-up)."""
    screen = BoundaryScreen(ScreeningConfig(), "backward")
    stage = ResidualStage(2)
    g = torch.Generator().manual_seed(3)

    def honest(worker: str, g_out: torch.Tensor):
        return screen.screen(worker, stage.backward(torch.randn(B, T, D, generator=g), g_out), g_out)

    for i in range(120):
        honest(f"w{i % 4}", torch.randn(B, T, D, generator=g))
    assert screen.calibrated
    zero = torch.zeros(B, T, D)
    for i in range(40):
        v = screen.screen(f"w{i % 4}", zero, zero)
        assert not v.flagged and not v.distances
    late = [honest(f"w{i % 4}", torch.randn(B, T, D, generator=g)).flagged for i in range(80)]
    assert sum(late) <= 4


def test_source_rms_and_gain_survive_the_evidence_round_trip() -> None:
    cfg = ScreeningConfig()
    src = torch.randn(B, T, D)
    s = compute_stats(3.0 * src, cfg, src)
    assert s.source_rms == pytest.approx(float(src.pow(2).mean().sqrt()), rel=1e-5)
    back = TensorStats.from_dict(s.to_dict())
    assert back.source_rms == pytest.approx(s.source_rms)
    p = profile_of(back)
    assert p.log_gain == pytest.approx(math.log(3.0), abs=1e-5)
    assert Profile.from_dict(p.to_dict()).log_gain == pytest.approx(p.log_gain)
    assert profile_of(compute_stats(src, cfg)).log_gain is None  # no source, no gain
    assert profile_of(compute_stats(src, cfg, torch.zeros(B, T, D))).log_gain is None  # dead source
    d = s.to_dict()
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError):
            TensorStats.from_dict({**d, "source_rms": bad})
    legacy = {k: v for k, v in d.items() if k != "source_rms"}  # records from before the statistic
    assert TensorStats.from_dict(legacy).source_rms is None
    pd = p.to_dict()
    for bad in (float("inf"), float("nan"), "x", True):
        with pytest.raises(ValueError):
            Profile.from_dict({**pd, "log_gain": bad})
    assert Profile.from_dict({k: v for k, v in pd.items() if k != "log_gain"}).log_gain is None
