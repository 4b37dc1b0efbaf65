"""DoRAFunction's hand-derived backward: exact form by gradcheck, finite differences and
autograd on the formula; the memory-saving form (Sec. 4.3) against autograd with the norm
detached, and how far the two forms' gradients differ."""
import copy
import json

import pytest
import torch

from lora import (add_adapter, apply_lora, combine_adapters, load_adapter, lora_layers,
                  merge_lora, mixed_adapters, prepare_qlora, save_adapter, set_active_adapters,
                  unmerge_lora)
from tiny_gpt.util.safetensors import load_file, save_file
from lora.variants.dora import DoRAFunction, dora_norm, dora_reference
from tiny_gpt.util.finite_differences import central_differences
from conftest import lora_inputs, small_gpt

FD_TOL = 1e-7


def inputs(N=5, n_in=4, n_out=3, r=2, seed=0, dtype=torch.float64, bias=True):
    """lora_inputs, and the magnitude m (n_out,) near W's row norms, drawn after them."""
    gen = torch.Generator().manual_seed(seed)
    x, W, b, A, B = lora_inputs(N, n_in, n_out, r, dtype, bias, gen=gen)
    m = (W.norm(dim=1) * (1 + 0.1 * torch.randn(n_out, generator=gen, dtype=dtype)))
    return x, W, b, A, B, m.requires_grad_(True)


@pytest.mark.parametrize("bias", [True, False])
def test_exact_form_gradcheck(bias):
    x, W, b, A, B, m = inputs(bias=bias)
    fn = lambda x, A, B, m: DoRAFunction.apply(x, W, b, A, B, m, 1.5, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B, m), eps=1e-6, atol=FD_TOL)


def test_exact_form_by_central_differences():
    x, W, b, A, B, m = inputs()
    G = torch.randn(5, 3, dtype=torch.float64)
    loss = lambda: (G * DoRAFunction.apply(x, W, b, A, B, m, 2.0, True)).sum()  # noqa: E731
    loss().backward()
    for t in (x, A, B, m):
        assert torch.allclose(t.grad, central_differences(loss, t), atol=FD_TOL, rtol=0)


@pytest.mark.parametrize("exact", [True, False])
def test_both_forms_equal_autograd_on_the_formula(exact):
    x, W, b, A, B, m = inputs()
    G = torch.randn(5, 3, dtype=torch.float64)
    y = DoRAFunction.apply(x, W, b, A, B, m, 2.0, exact)
    (G * y).sum().backward()
    ours = [t.grad.clone() for t in (x, A, B, m)]
    for t in (x, A, B, m):
        t.grad = None
    y_ref = dora_reference(x, W, b, A, B, m, 2.0, exact)
    (G * y_ref).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-12)
    for mine, ref in zip(ours, (x.grad, A.grad, B.grad, m.grad)):
        assert torch.allclose(mine, ref, atol=1e-10, rtol=0)


def test_the_memory_saving_form_differs_only_in_A_and_B():
    x, W, b, A, B, m = inputs()
    G = torch.randn(5, 3, dtype=torch.float64)
    grads = {}
    for exact in (True, False):
        for t in (x, A, B, m):
            t.grad = None
        (G * DoRAFunction.apply(x, W, b, A, B, m, 2.0, exact)).sum().backward()
        grads[exact] = [t.grad.clone() for t in (x, A, B, m)]
    assert torch.allclose(grads[True][0], grads[False][0]) and torch.allclose(
        grads[True][3], grads[False][3])
    assert (grads[True][1] - grads[False][1]).abs().max() > 1e-3  # the dropped norm terms


def test_at_initialization_the_layer_is_its_base():
    x, W, b, A, _, _ = inputs()
    B = torch.zeros(3, 2, dtype=torch.float64)
    m = W.norm(dim=1)
    y = DoRAFunction.apply(x, W, b, A, B, m, 2.0, False)
    assert torch.allclose(y, x @ W.t() + b, atol=1e-12)
    assert torch.allclose(dora_norm(W, A, B, 2.0), m)


# --- DoRA in the model: apply_lora(use_dora=True) -------------------------------------------


def logits(model):
    idx = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(idx)[0]


def trained_dora(exact=False):
    model = apply_lora(small_gpt(), r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            a = layer
            a.dora_exact = exact
            torch.nn.init.normal_(a.lora_B, std=0.2)
            a.lora_magnitude_vector.mul_(1.1)
    return model


def test_dora_model_starts_at_its_base_and_trains_m_A_B():
    base = small_gpt()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, use_dora=True)
    ref = logits(base)
    assert (logits(model) - ref).abs().max() / ref.abs().max() < 1e-6
    trainable = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
                        if p.requires_grad})
    assert trainable == ["lora_A", "lora_B", "lora_magnitude_vector"]


@pytest.mark.parametrize("exact", [False, True])
def test_dora_layer_equals_the_formula_and_merges(exact):
    model = trained_dora(exact)
    layer = model.blocks[0].attn.q_proj
    a = layer
    x = torch.randn(2, 5, layer.in_features)
    expected = dora_reference(x, layer.base.weight, layer.base.bias, a.lora_A, a.lora_B,
                              a.lora_magnitude_vector, a.scaling)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    before, weights = logits(model), [layer.base.weight.clone() for _, layer in lora_layers(model)]
    merge_lora(model)
    assert (logits(model) - before).abs().max() / before.abs().max() < 1e-5
    unmerge_lora(model)
    assert all((layer.base.weight - w).abs().max() < 1e-5
               for (_, layer), w in zip(lora_layers(model), weights))


def test_dora_saves_and_loads_in_peft_layout(tmp_path):
    model = trained_dora()
    folder = save_adapter(model, tmp_path / "dora")
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors, _ = load_file(folder / "adapter_model.safetensors")
    assert config["use_dora"] is True
    key = "base_model.model.blocks.0.attn.q_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,)
    fresh = load_adapter(small_gpt(), folder)
    assert torch.equal(logits(fresh), logits(model))
    del tensors[key]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="missing keys .*lora_magnitude_vector"):
        load_adapter(small_gpt(), folder)


def test_dora_refusals_change_nothing():
    with pytest.raises(TypeError, match="4-bit base is not supported"):
        add_adapter(prepare_qlora(small_gpt(), r=2, alpha=4), "d", use_dora=True)
    with pytest.raises(ValueError, match="no dropout"):
        apply_lora(small_gpt(), use_dora=True, dropout=0.1)
    model = trained_dora()
    add_adapter(model, "plain", r=2, alpha=4)
    set_active_adapters(model, ["default", "plain"])
    with pytest.raises(RuntimeError, match="cannot be stacked"):
        logits(model)
    with pytest.raises(RuntimeError, match="merges alone"):
        merge_lora(model)
    with pytest.raises(ValueError, match="cannot be combined"):
        combine_adapters(model, {"default": 1.0, "plain": 1.0}, "c", method="cat")
    with pytest.raises(ValueError, match="DoRA adapters .* rescale"):
        with mixed_adapters(model, ["default", "plain", None]):
            pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_16_bit_forward_equals_the_float64_formula_within_16_bit_rounding(dtype):
    """In 16 bits V = W0 + sBA would round the update away, so the forward computes
    x W0^T + s (x A^T) B^T instead (the module docstring): held against the formula in
    float64 on the same (16-bit-representable) values. Tolerance: bf16 keeps 8 significant
    bits (relative rounding 2^-8 ~ 0.4% per value, a few roundings deep), fp16 11; 2% of the
    output's norm is a few times that -- while a lost factor s = 4 on an update about as large
    as W0 x is off by far more."""
    if dtype == torch.float16 and not fp16_matmul_on_cpu():
        pytest.skip("this torch has no float16 matmul on CPU")
    x, W, b, A, B, m = (t.detach().to(dtype) for t in inputs(N=16, n_in=32, n_out=24, r=4))
    B = B / 4  # s B A with s = 4 about as large as W0
    y = DoRAFunction.apply(x, W, b, A, B, m, 4.0, False)
    assert y.dtype == dtype
    ref = dora_reference(*(t.double() for t in (x, W, b, A, B, m)), 4.0)
    assert (y.double() - ref).norm() / ref.norm() < 2e-2


def fp16_matmul_on_cpu():
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False
