"""Lazy workers (sentinel.attacks.lazy): cheaper paths than the stage, self-consistent both ways."""

from __future__ import annotations

import pytest
import torch

from sentinel.attacks import AttackContext, load_attack
from sentinel.model.config import ModelConfig
from sentinel.model.stages import build_stage

CFG = ModelConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=3, n_heads=2, d_ff=32)
LAZY = ["lazy_skip", "lazy_stale", "lazy_random", "lazy_partial"]
B = 4


def stage_module(stage: int) -> torch.nn.Module:
    """A stage whose blocks matter: at initialisation (std 0.02) they barely move the residual
    stream, so every lazy path would send nearly the honest tensor."""
    m = build_stage(CFG, stage, 3, seed=0)
    g = torch.Generator().manual_seed(stage)
    with torch.no_grad():
        for p in m.blocks.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def inputs(stage: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, CFG.vocab_size, (B, CFG.seq_len), generator=g)
    if stage == 0:
        return torch.randint(0, CFG.vocab_size, (B, CFG.seq_len), generator=g), targets
    return torch.randn((B, CFG.seq_len, CFG.d_model), generator=g), targets


def honest(m: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, grad_out: torch.Tensor | None):
    """(output, input-gradient) of the true stage."""
    y = m(x, targets if m.is_last else None).detach()
    g = m.recompute_backward(x, grad_out, targets if m.is_last else None)
    m.zero_grad(set_to_none=True)
    return y, g


def ctx(m, x, targets, direction: str, grad_out=None, step: int = 0) -> AttackContext:
    return AttackContext(step=step, stage=m.stage, worker="lazy", micro_batch=0, direction=direction,
                         generator=torch.Generator().manual_seed(1), stage_input=x, num_stages=3,
                         targets=targets if m.is_last else None, grad_output=grad_out, stage_module=m)


@pytest.mark.parametrize("name", LAZY)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lazy_output_has_the_honest_shape_and_differs(name: str, stage: int) -> None:
    m = stage_module(stage)
    x, targets = inputs(stage)
    grad_out = None if m.is_last else torch.randn((B, CFG.seq_len, CFG.d_model))
    y, g = honest(m, x, targets, grad_out)
    attack = load_attack(name)
    if name == "lazy_stale":  # frozen now; the stage then trains, so the copy is behind
        attack.forward(y, ctx(m, x, targets, "forward"))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        y, g = honest(m, x, targets, grad_out)
    sent = attack.forward(y, ctx(m, x, targets, "forward"))
    assert sent.shape == y.shape and sent.dtype == y.dtype and torch.isfinite(sent).all()
    assert not torch.allclose(sent, y), f"{name} sent the honest output on stage {stage}"
    if g is not None:
        sent_g = attack.backward(g, ctx(m, x, targets, "backward", grad_out))
        assert sent_g.shape == g.shape and torch.isfinite(sent_g).all()
        assert not torch.allclose(sent_g, g), f"{name} sent the honest gradient on stage {stage}"
    assert all(p.grad is None for p in m.parameters()), "a lazy attack trained the worker's module"


def test_skip_passes_the_input_and_the_gradient_through_a_middle_stage() -> None:
    m = stage_module(1)
    x, _ = inputs(1)
    grad_out = torch.randn_like(x)
    attack = load_attack("lazy_skip")
    assert torch.equal(attack.forward(x.clone(), ctx(m, x, None, "forward")), x)
    assert torch.allclose(attack.backward(x.clone(), ctx(m, x, None, "backward", grad_out)), grad_out)


def test_stale_sends_what_the_stage_computed_when_it_froze() -> None:
    m = stage_module(1)
    x, _ = inputs(1)
    attack = load_attack("lazy_stale")
    before = m(x).detach()
    first = attack.forward(before, ctx(m, x, None, "forward"))
    assert torch.allclose(first, before)  # still honest when it freezes
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    after = m(x).detach()
    assert not torch.allclose(after, before)
    assert torch.allclose(attack.forward(after, ctx(m, x, None, "forward", step=1)), before)


@pytest.mark.parametrize("stage", [1, 2])
def test_partial_at_fraction_one_is_honest_and_at_zero_is_skip(stage: int) -> None:
    m = stage_module(stage)
    x, targets = inputs(stage)
    grad_out = None if m.is_last else torch.randn((B, CFG.seq_len, CFG.d_model))
    y, g = honest(m, x, targets, grad_out)
    full = load_attack("lazy_partial,fraction=1")
    assert torch.allclose(full.forward(y, ctx(m, x, targets, "forward")), y, atol=1e-6)
    assert torch.allclose(full.backward(g, ctx(m, x, targets, "backward", grad_out)), g, atol=1e-6)
    none, skip = load_attack("lazy_partial,fraction=0"), load_attack("lazy_skip")
    fwd = ctx(m, x, targets, "forward")
    assert torch.allclose(none.forward(y, fwd), skip.forward(y, fwd), atol=1e-6)
    bwd = ctx(m, x, targets, "backward", grad_out)
    assert torch.allclose(none.backward(g, bwd), skip.backward(g, bwd), atol=1e-6)


def test_partial_works_exactly_on_its_share_of_rows() -> None:
    m = stage_module(1)
    x, _ = inputs(1)
    grad_out = torch.randn_like(x)
    y, g = honest(m, x, None, grad_out)
    half = load_attack("lazy_partial,fraction=0.5")
    sent = half.forward(y, ctx(m, x, None, "forward"))
    sent_g = half.backward(g, ctx(m, x, None, "backward", grad_out))
    assert torch.allclose(sent[:2], y[:2], atol=1e-6) and torch.equal(sent[2:], x[2:])
    assert torch.allclose(sent_g[:2], g[:2], atol=1e-6) and torch.allclose(sent_g[2:], grad_out[2:])


def test_lazy_without_the_stage_module_says_what_is_missing() -> None:
    x = torch.randn(B, CFG.seq_len, CFG.d_model)
    c = AttackContext(step=0, stage=1, worker="w", micro_batch=0, direction="forward",
                      generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stage_module"):
        load_attack("lazy_skip").forward(x, c)


def test_bad_partial_fraction_is_rejected() -> None:
    with pytest.raises(ValueError, match="fraction"):
        load_attack("lazy_partial,fraction=1.5")
