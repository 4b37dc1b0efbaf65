"""LoRALinear: initialisation, scaling, argument errors, fast path vs plain autograd, a base
without a float weight, and merge / unmerge."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear

F32_TOL = 1e-5  # float32 sums of a few hundred O(1) products: rounding of order 1e-6


def make_layer(n_in=24, n_out=16, r=4, alpha=8, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n_in, n_out), r, alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero update, as after training
    return layer


class NoFloatWeight(nn.Module):
    """Stands in for a 4-bit base: in/out features and a forward, but no float `.weight`."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.register_buffer("packed", torch.randn(n_out, n_in))

    def forward(self, x):
        return F.linear(x, self.packed)


def test_init_follows_microsoft_convention():
    layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (32, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64)  # Kaiming-uniform, a = sqrt(5)
    assert layer.scaling == 16 / 8
    assert LoRALinear(nn.Linear(64, 32), 4, 16, use_rslora=True).scaling == 16 / 2


def test_zero_init_gives_base_output():
    base = nn.Linear(24, 16)
    x = torch.randn(3, 5, 24)
    assert torch.equal(LoRALinear(base, 4, 8)(x), base(x))


def test_base_is_frozen_and_adapter_trainable():
    layer = make_layer()
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0, alpha=8), "r must"), (dict(r=-1, alpha=8), "r must"),
    (dict(r=17, alpha=8), "min\\(in_features, out_features\\) = 16"),
    (dict(r=4, alpha=0), "alpha must be > 0"), (dict(r=4, alpha=-2), "alpha must be > 0"),
    (dict(r=4, alpha=8, dropout=1.0), "dropout must be in \\[0, 1\\)"),
    (dict(r=4, alpha=8, dropout=-0.1), "dropout must be in \\[0, 1\\)"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(24, 16), **kwargs)


def test_fast_path_matches_plain_autograd():
    """Forward and gradients of LoRAFunction equal the plain expression on a 3-D input."""
    layer = make_layer()
    x = torch.randn(2, 7, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    W, b, A, B, s = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling
    y_ref = F.linear(x, W, b) + s * (x @ A.t()) @ B.t()
    want = torch.autograd.grad(y_ref, (x, A, B), g)
    assert torch.allclose(y, y_ref, atol=F32_TOL)
    for a, b_ in zip(got, want):
        assert torch.allclose(a, b_, atol=F32_TOL)


def test_dropout_acts_on_adapter_input_only():
    layer = make_layer(dropout=0.5)
    x = torch.randn(6, 24)
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer.train()(x), layer.base(x))  # the base path is never dropped
    with torch.no_grad():
        layer.lora_B.normal_()
    y_eval = layer.eval()(x)
    assert torch.allclose(y_eval, layer.base(x) + layer.scaling * x @ layer.lora_A.t()
                          @ layer.lora_B.t(), atol=F32_TOL)  # eval: no dropout


def test_base_without_float_weight_uses_autograd_and_cannot_merge():
    base = NoFloatWeight(24, 16)
    layer = LoRALinear(base, 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24, requires_grad=True)
    y = layer(x)
    ref = base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.allclose(y, ref, atol=F32_TOL)
    y.sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None
    with pytest.raises(TypeError, match="no float .weight"):
        layer.merge()


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(9, 24)
    w0 = layer.base.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), before, atol=F32_TOL)
    assert torch.allclose(layer.base.weight, w0 + layer.scaling * layer.lora_B @ layer.lora_A,
                          atol=F32_TOL)
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base.weight, w0, atol=F32_TOL)
    assert torch.allclose(layer(x), before, atol=F32_TOL)


def test_merge_errors_and_train_eval_do_not_merge():
    layer = make_layer()
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        layer.unmerge()
    layer.eval()
    layer.train()
    assert not layer.merged
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.train()
    layer.eval()
    assert layer.merged


def test_linear_base_takes_the_hand_written_backward():
    """Guards the fast path: a silent fall-back to autograd would still be correct, only slower."""
    y = make_layer()(torch.randn(4, 24, requires_grad=True))
    nodes = [y.grad_fn, *(node for node, _ in y.grad_fn.next_functions)]
    names = {type(node).__name__ for node in nodes}
    assert names & {"LoRAFunctionBackward", "TunedLoRAFunctionBackward"}, names


def test_autocast_falls_back_to_autograd():
    layer, x = make_layer(), torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x), atol=0.1, rtol=2e-2)  # bf16 keeps ~3 digits
