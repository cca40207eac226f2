"""Model: stage split, deterministic init, stage composition == full model, pipeline backward."""

from __future__ import annotations

import math

import pytest
import torch

from sentinel.model import (
    ModelConfig,
    StageModule,
    TextCorpus,
    build_full_model,
    build_stage,
    merge_stage_states,
    stage_parameters_count,
)

TINY = ModelConfig(seq_len=16, d_model=32, n_layers=3, n_heads=2, d_ff=88)


def tokens(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def build_pipeline(cfg: ModelConfig, num_stages: int, seed: int = 0) -> list[StageModule]:
    return [build_stage(cfg, k, num_stages, seed) for k in range(num_stages)]


def run_pipeline(stages: list[StageModule], x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    for stage in stages:
        x = stage(x, targets if stage.is_last else None)
    return x


# ------------------------------------------------------------------------------------------- config


def test_config_round_trip_and_unknown_keys():
    cfg = ModelConfig(d_model=64, n_heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


@pytest.mark.parametrize("bad", [{"d_model": 130}, {"n_heads": 0}, {"d_model": 12, "n_heads": 4}, {"init_std": 0.0}])
def test_config_rejects_inconsistent_shapes(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_stage_layers_split_evenly_remainder_first():
    cfg = ModelConfig()  # 6 layers
    assert cfg.stage_layers(1) == [range(0, 6)]
    assert cfg.stage_layers(4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    assert cfg.stage_layers(6) == [range(i, i + 1) for i in range(6)]
    for bad in (0, 7):
        with pytest.raises(ValueError):
            cfg.stage_layers(bad)
    assert cfg.hidden_shape(8) == (8, 64, 128)


# ------------------------------------------------------------------------------ init and composition


def test_replicas_are_bit_identical_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_stage(TINY, 1, 3, seed=7), build_stage(TINY, 1, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_stage(TINY, 1, 3, seed=8)
    assert not torch.equal(sa["blocks.1.attn.qkv.weight"], c.state_dict()["blocks.1.attn.qkv.weight"])


def test_layer_init_does_not_depend_on_stage_split():
    full = build_full_model(TINY, seed=3).state_dict()
    for num_stages in (1, 2, 3):
        for stage in build_pipeline(TINY, num_stages, seed=3):
            for key, value in stage.state_dict().items():
                assert torch.equal(value, full[key]), (num_stages, key)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_stage_composition_equals_full_model(num_stages):
    x, y = tokens(TINY)
    full = build_full_model(TINY, seed=1)
    stages = build_pipeline(TINY, num_stages, seed=1)
    with torch.no_grad():
        # same kernels on the same shapes in one process: bit-identical, not merely close
        assert torch.equal(run_pipeline(stages, x), full(x))
        assert torch.equal(run_pipeline(stages, x, y), full(x, y))


def test_merged_stage_states_load_into_full_model():
    stages = build_pipeline(TINY, 3, seed=5)
    full = build_full_model(TINY, seed=0)
    full.load_state_dict(merge_stage_states(stages))  # strict: keys match exactly
    x, _ = tokens(TINY)
    with torch.no_grad():
        torch.testing.assert_close(run_pipeline(stages, x), full(x), rtol=0, atol=1e-6)


def test_residual_projections_are_scaled():
    block = build_full_model(ModelConfig(), seed=0).blocks[0]
    expected = 0.02 / math.sqrt(2 * 6)
    for w in (block.attn.proj.weight, block.mlp.down.weight):
        assert abs(w.std().item() - expected) < 0.1 * expected
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.equal(block.attn_norm.weight, torch.ones(128))


# ------------------------------------------------------------------------------------ shapes, specs


def test_shapes_and_specs():
    cfg = TINY
    s0, s1, s2 = build_pipeline(cfg, 3)
    assert (s0.is_first, s0.is_last, s2.is_first, s2.is_last, s1.is_first, s1.is_last) == (
        True, False, False, True, False, False)
    assert s0.input_spec(4) == ("int64", (4, 16)) and s0.output_spec(4) == ("float32", (4, 16, 32))
    assert s1.input_spec(4) == ("float32", (4, 16, 32)) and s1.output_spec(4) == ("float32", (4, 16, 32))
    assert s2.input_spec(4) == ("float32", (4, 16, 32)) and s2.output_spec(4) == ("float32", ())
    x, y = tokens(cfg, batch=4)
    h = s0(x)
    assert h.dtype == torch.float32 and h.shape == (4, 16, 32)
    assert s1(h).shape == (4, 16, 32)
    assert s2(s1(h)).shape == (4, 16, cfg.vocab_size)
    assert s2(s1(h), y).shape == ()
    only = build_stage(cfg, 0, 1)
    assert only.is_first and only.is_last
    assert only.input_spec(2) == ("int64", (2, 16)) and only.output_spec(2) == ("float32", ())
    assert only(x, y).shape == ()


def test_wrong_inputs_are_rejected_clearly():
    s0, s1 = build_pipeline(TINY, 2)
    with pytest.raises(ValueError, match="int64 token ids"):
        s0(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="float32 hidden"):
        s1(torch.zeros(2, 16, 31))
    with pytest.raises(ValueError, match="T <= 16"):
        s1(torch.zeros(2, 17, 32))
    with pytest.raises(ValueError):
        build_stage(TINY, 3, 3)


def test_parameter_counts():
    cfg = ModelConfig()
    total = sum(p.numel() for p in build_full_model(cfg).parameters())
    for num_stages in (1, 2, 3, 6):
        counts = [stage_parameters_count(cfg, k, num_stages) for k in range(num_stages)]
        assert sum(counts) == total
        for k in range(num_stages):
            assert counts[k] == sum(p.numel() for p in build_stage(cfg, k, num_stages).parameters())
    tied = ModelConfig(tie_embeddings=True)
    assert stage_parameters_count(tied, 0, 1) == sum(p.numel() for p in build_stage(tied, 0, 1).parameters())
    assert stage_parameters_count(tied, 0, 1) == total - cfg.vocab_size * cfg.d_model
    with pytest.raises(ValueError, match="tie_embeddings"):
        build_stage(tied, 0, 2)


def test_initial_loss_is_uniform():
    x, y = tokens(ModelConfig(), batch=4)
    with torch.no_grad():
        loss = build_full_model(ModelConfig(), seed=0)(x, y).item()
    assert abs(loss - math.log(256)) < 0.3


# ------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("num_stages", [2, 3])
def test_chained_stage_backward_reproduces_full_model_gradients(num_stages):
    """What the pipeline does: each stage recomputes forward from the input it is sent, backprops the
    grad_out it is sent, and passes x.grad upstream."""
    x, y = tokens(TINY, batch=3)
    full = build_full_model(TINY, seed=2)
    full(x, y).backward()
    full_grads = {name: p.grad for name, p in full.named_parameters()}

    stages = build_pipeline(TINY, num_stages, seed=2)
    inputs = [x]
    with torch.no_grad():
        for stage in stages[:-1]:
            inputs.append(stage(inputs[-1]))
    # manual protocol on the last stage, the helper on the others: both must agree
    h = inputs[-1].clone().requires_grad_()
    loss = stages[-1](h, y)
    loss.backward()
    grad = h.grad
    torch.testing.assert_close(loss, full(x, y).detach())
    for stage, inp in zip(reversed(stages[:-1]), reversed(inputs[:-1]), strict=True):
        assert grad.shape == stage.output_spec(3)[1]
        grad = stage.recompute_backward(inp, grad)
    assert grad is None  # first stage: nothing to send upstream

    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_backward_on_last_stage_returns_input_grad():
    s0, s1 = build_pipeline(TINY, 2)
    x, y = tokens(TINY)
    with torch.no_grad():
        h = s0(x)
    g = s1.recompute_backward(h, targets=y)
    assert g is not None and g.shape == h.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert not h.requires_grad  # the caller's tensor is left alone


# ------------------------------------------------------------------------------------------ training


def test_short_training_lowers_loss_on_default_corpus():
    """A tiny model learns the generated corpus: 100 Adam steps, about 1-2 s on one core."""
    cfg = ModelConfig(seq_len=32, d_model=64, n_layers=2, n_heads=2, d_ff=172)
    corpus = TextCorpus.default()
    model = build_full_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one core is plenty for this size
    try:
        for i in range(100):
            x, y = corpus.batch("train", 16, cfg.seq_len, seed=0, index=i)
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = [model(x, y).item() for x, y in corpus.val_batches(16, cfg.seq_len, count=4)]
    finally:
        torch.set_num_threads(threads)
    # uniform is ln 256 = 5.55 nats; the unigram entropy of the corpus is ~3.2 nats
    assert sum(val) / len(val) < 2.8
