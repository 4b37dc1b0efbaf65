"""QLoRA = quant's 4-bit base + lora's adapters (lessons/qlora.py), and the claims of lesson 06.

DequantMatmul's own gradcheck, finite differences and dense parity live in
test_quant_linear4bit.py; here the pieces are checked together, on a small GPT.
"""
import copy

import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, apply_lora, dequantized_float_model, load_adapter, lora_layers,
                  lora_state_dict, prepare_qlora, save_adapter)
from quant import NF4_CODE, Linear4bit, quantize_model, quantize_nf4
from quant.blockwise import to_blocks, unpack_nibbles

# float32, the same weights through two code paths (LoRAFunction vs plain autograd, merged vs
# unmerged weight): only the summation order differs, ~1e-7 relative per op over a few layers.
FP32_TOL = 1e-5
# bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); through two blocks of matmuls the
# logits' relative error stays around 1e-2.
BF16_REL_TOL = 3e-2


def tokens(batch=3, length=12, seed=1):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=2, scale=0.05):
    """Give every adapter a non-zero B, as after some training (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
    return model


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)[0]


def test_prepare_qlora_quantizes_every_linear_and_trains_only_the_adapters(small_model):
    model = prepare_qlora(small_model, r=4, alpha=8)
    linear_like = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert linear_like and all(isinstance(m, Linear4bit) for m in linear_like.values())
    wrapped = {p for p, _ in lora_layers(model)}
    assert wrapped == {f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 2 * 4 * 32


def test_qlora_at_step_zero_is_exactly_the_quantized_base(small_model):
    quantized = quantize_model(copy.deepcopy(small_model))
    qlora = prepare_qlora(small_model)  # B = 0: the adapters add exactly nothing
    assert torch.equal(logits(qlora, tokens()), logits(quantized, tokens()))


def test_qlora_gradients_equal_lora_on_the_dequantized_float_base(small_model):
    """The 4-bit path only replaces W by dequant(W_nf4): same loss and adapter gradients as
    LoRA on an nn.Linear that holds the dequantized weight."""
    qlora = prepare_qlora(small_model)
    dense = apply_lora(dequantized_float_model(qlora))  # B = 0, so this is just dequant(W)
    dense.load_state_dict(lora_state_dict(qlora), strict=False)  # the same A
    randomize_b(qlora), randomize_b(dense)
    x = tokens()
    grads = []
    for model in (qlora, dense):
        loss = model.train()(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                      if p.requires_grad}))
    (loss_q, grad_q), (loss_d, grad_d) = grads
    torch.testing.assert_close(loss_q, loss_d, atol=FP32_TOL, rtol=FP32_TOL)
    assert grad_q.keys() == grad_d.keys() and len(grad_q) == 8  # 4 layers x (A, B)
    for name in grad_q:
        torch.testing.assert_close(grad_q[name], grad_d[name], atol=FP32_TOL, rtol=1e-4)


def test_after_backward_only_the_adapters_have_gradients(small_model):
    model = randomize_b(prepare_qlora(small_model))
    x = tokens()
    model(x[:, :-1], x[:, 1:])[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith(("lora_A",
                                                                               "lora_B"))}
    assert all(b.grad is None and not b.requires_grad for b in model.buffers())


def test_adapter_reloaded_onto_a_fresh_quantized_base_gives_identical_outputs(small_model,
                                                                              tmp_path):
    base = copy.deepcopy(small_model)
    qlora = randomize_b(prepare_qlora(small_model))
    save_adapter(qlora, tmp_path / "adapter")
    fresh = load_adapter(quantize_model(base), tmp_path / "adapter")  # quantization is
    assert torch.equal(logits(fresh, tokens()), logits(qlora, tokens()))  # deterministic


def test_dequantized_float_model_merges_exactly_and_leaves_the_original_alone(small_model):
    qlora = randomize_b(prepare_qlora(small_model))
    before = logits(qlora, tokens())
    merged = dequantized_float_model(qlora)
    kinds = {type(m) for m in merged.modules()}
    assert nn.Linear in kinds and Linear4bit not in kinds and LoRALinear not in kinds
    torch.testing.assert_close(logits(merged, tokens()), before, atol=FP32_TOL, rtol=FP32_TOL)
    assert torch.equal(logits(qlora, tokens()), before)  # the 4-bit model is untouched
    assert any(isinstance(m, Linear4bit) for m in qlora.modules())


def test_requantizing_the_dequantized_weight_gives_the_same_codes():
    """So 'codes changed' after re-quantizing W_deq + s B A counts the update's effect alone."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_nf4(w)
    again = quantize_nf4(q.dequantize())
    assert torch.equal(again.codes, q.codes)


def test_an_update_well_below_an_nf4_step_is_mostly_rounded_away():
    gen = torch.Generator().manual_seed(0)
    w_deq = quantize_nf4(torch.randn(128, 256, generator=gen) * 0.02).dequantize()
    step = (NF4_CODE[1:] - NF4_CODE[:-1]).mean() * to_blocks(w_deq, 64).abs().amax(1).mean()
    b, a = torch.randn(128, 8, generator=gen), torch.randn(8, 256, generator=gen)
    delta = b @ a
    delta *= 0.05 * step / delta.abs().mean()  # mean |update| = 5% of a typical NF4 step
    q = quantize_nf4(w_deq + delta)
    kept = q.dequantize() - w_deq
    lost = ((kept - delta).norm() / delta.norm()).item()
    changed = (unpack_nibbles(q.codes) != unpack_nibbles(quantize_nf4(w_deq).codes)).float()
    assert changed.mean() < 0.1 and lost > 0.8, (changed.mean(), lost)


def test_bf16_compute_tracks_fp32_compute(small_model):
    q32 = randomize_b(prepare_qlora(copy.deepcopy(small_model)))
    q16 = prepare_qlora(small_model, compute_dtype=torch.bfloat16)
    q16.load_state_dict(q32.state_dict())
    assert all(m.compute_dtype == torch.bfloat16 for m in q16.modules()
               if isinstance(m, Linear4bit))
    ref, out = logits(q32, tokens()), logits(q16, tokens())
    assert ((out - ref).norm() / ref.norm()).item() < BF16_REL_TOL


@pytest.mark.parametrize("shape", [(128, 128), (512, 128), (128, 512)])  # the default GPT's
def test_nf4_linear_layers_cost_about_4_13_bits_per_weight(shape):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(shape[1], shape[0]))
    stored = sum(b.numel() * b.element_size() for name, b in layer.state_dict().items()
                 if name != "bias")  # codes, scales, + the 64 B code book
    n = shape[0] * shape[1]
    assert layer.weight.bits_per_param <= 4.13
    assert 8 * stored / n <= 4.13 + 8 * NF4_CODE.numel() * 4 / n
    # held besides, never saved: the look-up tables, a fixed 3 KiB whatever the weight's size
    tables = sum(b.numel() * b.element_size() for b in layer.buffers()) - stored
    assert tables == (256 * 2 + 256) * 4


def test_bad_targets_leave_the_model_untouched(small_model):
    with pytest.raises(ValueError, match="q_prj"):
        prepare_qlora(small_model, targets=("q_prj",))
    assert not any(isinstance(m, Linear4bit) for m in small_model.modules())


@pytest.mark.parametrize("reference", [True, False])
def test_lora_on_a_4bit_base_runs_the_fused_function_and_equals_the_plain_expression(
        monkeypatch, reference):
    """A LoRALinear over a Linear4bit takes LoRAFunction (the weight decoded in forward and
    again in backward; the reference or the tuned one, as lora.tuned picks) and computes what
    base(x) + s B A x by plain autograd computes."""
    from lora.function import LoRAFunction
    from lora.tuned import TunedLoRAFunction, use_reference
    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 48)), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    calls = []
    function = LoRAFunction if reference else TunedLoRAFunction
    real_apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or real_apply(*a))
    before = use_reference(reference)
    x = torch.randn(2, 7, 64, requires_grad=True)
    G = torch.randn(2, 7, 48)
    results = []
    plain = lambda x: layer.base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()  # noqa: E731
    try:
        for forward in (layer, plain):
            y = forward(x)
            results.append((y, *torch.autograd.grad((y * G).sum(),
                                                    (x, layer.lora_A, layer.lora_B))))
    finally:
        use_reference(before)
    assert len(calls) == 1
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=FP32_TOL, rtol=1e-4)
