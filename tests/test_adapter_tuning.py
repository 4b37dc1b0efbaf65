"""Adapter tuning (Houlsby et al. 2019): identity at init, only adapters train, not mergeable."""
import pytest
import torch

from tiny_gpt import GPT, TrainConfig
from tiny_gpt.methods.adapter_tuning import (AdaptedSublayer, BottleneckAdapter, adapter_layers,
                                     adapter_parameters, apply_adapter_tuning)
from tiny_gpt.finetune import finetune

FP32_TOL = 1e-5  # float32 results that differ only in summation order


def tokens(cfg, batch=3, T=10, seed=1):
    return torch.randint(cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def adapted_copy(model, **kw):
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return apply_adapter_tuning(twin, **kw)


def test_adapters_start_as_the_identity(small_model, small_cfg):
    x = tokens(small_cfg)
    adapted = adapted_copy(small_model, bottleneck=4)
    # W_up = 0 and b_up = 0 make the adapter's branch exactly 0.0, and h + 0.0 == h bit for bit.
    assert torch.equal(adapted(x)[0], small_model(x)[0])


def test_adapters_are_placed_after_attention_and_mlp_of_every_block(small_model, small_cfg):
    adapted = adapted_copy(small_model, bottleneck=4)
    paths = [p for p, _ in adapter_layers(adapted)]
    assert paths == [f"blocks.{i}.{s}" for i in range(small_cfg.n_layer) for s in ("attn", "mlp")]
    only_mlp = adapted_copy(small_model, bottleneck=4, places=("mlp",))
    assert [p for p, _ in adapter_layers(only_mlp)] == [f"blocks.{i}.mlp"
                                                        for i in range(small_cfg.n_layer)]


def test_only_adapter_parameters_are_trainable(small_model, small_cfg):
    m, C = 4, small_cfg.n_embd
    adapted = adapted_copy(small_model, bottleneck=m)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(adapted)}
    # per adapter: W_down (m, C) + b_down (m) + W_up (C, m) + b_up (C); two per block
    expected = small_cfg.n_layer * 2 * (2 * m * C + m + C)
    assert sum(p.numel() for p in trainable) == expected


def test_train_layer_norms_option_unfreezes_only_block_layer_norms(small_model):
    adapted = adapted_copy(small_model, bottleneck=4, train_layer_norms=True)
    names = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(".ln1." in n for n in names) and any(".ln2." in n for n in names)
    assert not any(n.startswith(("tok_emb", "pos_emb", "ln_f")) or "_proj" in n for n in names)


def test_gradients_reach_adapters_only_and_base_stays_unchanged(small_model, small_cfg):
    adapted = adapted_copy(small_model, bottleneck=4)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    x = tokens(small_cfg)
    adapted(x, targets=x)[1].backward()
    for name, p in adapted.named_parameters():
        if p.requires_grad:
            assert p.grad is not None
        else:
            assert p.grad is None, name
    # with W_up = 0 the first gradient reaches W_up (and b_up) but not W_down: dL/dW_down
    # passes through W_up^T = 0. That is why the down projection must not also start at zero.
    for _, layer in adapter_layers(adapted):
        assert layer.adapter.up.weight.grad.abs().sum() > 0
        assert torch.count_nonzero(layer.adapter.down.weight.grad) == 0
    examples = [('upper "cat" -> "', 'CAT"\n'), ('upper "dog" -> "', 'DOG"\n')] * 4
    splits = {"train": examples, "val": examples[:2]}
    cfg = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, eval_every=0, progress=False)
    finetune(adapted, splits, cfg, batch_size=4, device="cpu")
    for name, p in adapted.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    assert any(layer.adapter.up.weight.abs().sum() > 0 for _, layer in adapter_layers(adapted))


def test_a_trained_adapter_is_not_linear_so_it_cannot_be_merged():
    """A(h) - h = W_up gelu(W_down h + b) is not affine in h, so no matrix added to the
    sublayer's last projection can reproduce it (LoRA's dW = sBA can be folded; this cannot)."""
    torch.manual_seed(0)
    adapter = BottleneckAdapter(16, 4).double()
    torch.nn.init.normal_(adapter.up.weight)
    a, b = torch.randn(2, 16, dtype=torch.float64)
    zero = torch.zeros(16, dtype=torch.float64)
    affine_gap = adapter(a + b) - adapter(a) - adapter(b) + adapter(zero)  # 0 for an affine map
    assert affine_gap.abs().max() > 1e-3


def test_adapters_pass_extra_arguments_to_the_sublayer(small_model, small_cfg):
    """The attention's prefix_kv goes through the wrapper: at init, adapted + prefix == base +
    prefix exactly (so the two methods could even be combined)."""
    adapted = adapted_copy(small_model, bottleneck=4)
    hs = small_cfg.n_embd // small_cfg.n_head
    kv = [(torch.randn(3, small_cfg.n_head, 2, hs), torch.randn(3, small_cfg.n_head, 2, hs))
          for _ in range(small_cfg.n_layer)]
    x = tokens(small_cfg)
    assert torch.equal(adapted(x, prefix_kv=kv)[0], small_model(x, prefix_kv=kv)[0])


def test_works_with_gradient_checkpointing(small_model, small_cfg):
    adapted = adapted_copy(small_model, bottleneck=4)
    for _, layer in adapter_layers(adapted):
        torch.nn.init.normal_(layer.adapter.up.weight, std=0.1)
    x = tokens(small_cfg)
    adapted(x, targets=x)[1].backward()
    plain = [p.grad.clone() for p in adapter_parameters(adapted)]
    adapted.zero_grad(set_to_none=True)
    adapted.config.gradient_checkpointing = True
    adapted(x, targets=x)[1].backward()
    for g0, p in zip(plain, adapter_parameters(adapted)):
        torch.testing.assert_close(p.grad, g0, rtol=FP32_TOL, atol=FP32_TOL)


def test_bad_arguments_raise(small_model):
    adapted = adapted_copy(small_model, bottleneck=4)
    with pytest.raises(ValueError, match="already applied"):
        apply_adapter_tuning(adapted)
    with pytest.raises(ValueError, match="places"):
        adapted_copy(small_model, places=("ffn",))
    with pytest.raises(ValueError, match="bottleneck"):
        BottleneckAdapter(16, 0)
    with pytest.raises(ValueError, match="activation"):
        BottleneckAdapter(16, 4, activation="swish")
    assert isinstance(adapted.blocks[0].attn, AdaptedSublayer)
