"""LoRA dropout while training, in both of LoRALinear's paths: the fused LoRAFunction (one
adapter on an nn.Linear) and plain autograd (a base without a float weight, stacked adapters,
autocast). Each must drop entries of the adapter's input -- never the base's -- with the right
statistics, in training only, with gradients equal to autograd's for the same mask."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear, apply_lora

F32_TOL = 1e-5  # float32 sums of a few dozen O(1) products
P = 0.3


class PlainBase(nn.Module):
    """A base LoRALinear cannot fuse (no float .weight): it takes the plain autograd path."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("w", linear.weight.detach().clone())
        self.register_buffer("b", linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.w, self.b)


def make(path, n_in=24, n_out=16, r=4, p=P):
    torch.manual_seed(0)
    linear = nn.Linear(n_in, n_out)
    layer = LoRALinear(linear if path == "fused" else PlainBase(linear), r, 8, dropout=p)
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero update, so that dropping its input shows
    return layer


def reference(layer, x, mask):
    """W0 x + b + s B A (x * mask), by plain autograd."""
    base = layer.base
    W, b = (base.weight, base.bias) if isinstance(base, nn.Linear) else (base.w, base.b)
    return F.linear(x, W, b) + layer.scaling * ((x * mask) @ layer.lora_A.t()) @ layer.lora_B.t()


def forward_with_mask(layer, x, seed=7):
    """layer(x) in training mode and the dropout mask it used, recovered by replaying the RNG:
    both paths draw one Bernoulli per entry of x from torch's global generator."""
    torch.manual_seed(seed)
    y = layer.train()(x)
    torch.manual_seed(seed)
    mask = F.dropout(torch.ones_like(x), layer.dropout, True)
    return y, mask


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_training_output_is_the_reference_with_the_same_mask(path):
    layer = make(path)
    x = torch.randn(40, 24, requires_grad=True)
    y, mask = forward_with_mask(layer, x)
    assert torch.allclose(y, reference(layer, x, mask), atol=F32_TOL)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    want = torch.autograd.grad(reference(layer, x, mask), (x, layer.lora_A, layer.lora_B), g)
    for name, a, b in zip(("x", "A", "B"), got, want):
        assert torch.allclose(a, b, atol=F32_TOL), name


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_the_mask_keeps_1_minus_p_of_the_entries_scaled_by_1_over_1_minus_p(path):
    layer = make(path)
    x = torch.randn(2000, 24)
    _, mask = forward_with_mask(layer, x)
    values = mask.unique()
    assert len(values) == 2 and values[0] == 0
    assert torch.isclose(values[1], torch.tensor(1 / (1 - P)))
    kept = (mask != 0).float().mean().item()
    # 48,000 Bernoulli(0.7) draws: standard error sqrt(0.21 / 48000) = 0.0021; 5 of them
    assert abs(kept - (1 - P)) < 5 * 0.0021
    assert abs(mask.mean().item() - 1.0) < 5 * 0.0021 / (1 - P)  # E[mask] = 1: unbiased


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_training_differs_from_eval_and_eval_is_deterministic(path):
    layer = make(path)
    x = torch.randn(40, 24)
    no_dropout = reference(layer, x, torch.ones_like(x))
    y_train, _ = forward_with_mask(layer, x)
    assert (y_train - no_dropout).abs().max() > 0.1  # dropping inputs moves the output
    assert torch.allclose(layer.eval()(x), no_dropout, atol=F32_TOL)
    assert torch.equal(layer.eval()(x), layer.eval()(x))


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_the_base_path_is_never_dropped(path):
    layer = make(path)
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(40, 24)
    assert torch.allclose(layer.train()(x), layer.base(x), atol=0)


def test_a_model_with_lora_dropout_gives_different_losses_in_train_mode_only(small_model):
    model = apply_lora(small_model, r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    x = torch.randint(96, (4, 16))
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
