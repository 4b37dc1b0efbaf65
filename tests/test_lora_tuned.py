"""The tuned LoRA function equals the reference, values and gradients, with and without the
token split, a dropout mask and a compressed weight; and the one switch picks what it says."""
import pytest
import torch
import torch.nn as nn

from lora import LoRALinear
from lora.function import LoRAFunction
from lora.tuned import (TunedLoRAFunction, lora_function, split_tokens, token_sum_product,
                        use_reference)
from tiny_gpt.util.finite_differences import central_differences

# float64: the two compute the same sums in another order (in place, batched runs over the
# tokens), so they differ by rounding, ~1e-16 relative per term; 1e-12 leaves room for ~100.
F64_TOL = 1e-12
FD_TOL = 1e-7  # gradcheck's central differences, eps = 1e-6 (see test_lora_function.py)


def inputs(N=8, n_in=64, n_out=5, r=2, compressed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    if compressed:
        from quant import quantize_nf4
        W = quantize_nf4(W)
    b = torch.randn(n_out, generator=gen, dtype=torch.float64)
    A = torch.randn(r, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(n_out, r, generator=gen, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(N, n_in, generator=gen) >= 0.5
    return x, W, b, A, B, keep.double() / 0.5


def values_and_grads(apply, x, A, B, seed=3):
    y = apply()
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y, *torch.autograd.grad((G * y).sum(), (x, A, B)))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_the_tuned_function_equals_the_reference(split, masked, compressed, bias):
    x, W, b, A, B, mask = inputs(compressed=compressed)
    b, mask = (b if bias else None), (mask if masked else None)
    ref = values_and_grads(lambda: LoRAFunction.apply(x, W, b, A, B, 1.5, mask), x, A, B)
    got = values_and_grads(lambda: TunedLoRAFunction.apply(x, W, b, A, B, 1.5, mask, split),
                           x, A, B)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=F64_TOL, rtol=F64_TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_tuned_gradcheck(masked):
    x, W, b, A, B, mask = inputs(N=8, n_in=6)
    mask = mask if masked else None
    fn = lambda x, A, B: TunedLoRAFunction.apply(x, W, b, A, B, 1.5, mask, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=FD_TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_tuned_central_differences_by_hand(masked):
    """dL/dθ ~ (L(θ + eps) - L(θ - eps)) / (2 eps) for every entry of x, A and B, split on."""
    x, W, b, A, B, mask = inputs(N=8, n_in=6)
    mask = mask if masked else None
    G = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tuned = lambda: TunedLoRAFunction.apply(x, W, b, A, B, 2.0, mask, True)  # noqa: E731
    loss = lambda: (G * tuned()).sum()  # noqa: E731
    loss().backward()
    for t in (x, A, B):
        numeric = central_differences(loss, t, eps=1e-6)
        assert torch.allclose(t.grad, numeric, atol=FD_TOL, rtol=0)


@pytest.mark.parametrize("N", [12, 7])  # split into 4 runs of 3 tokens; 7: the plain product
def test_token_sum_product_is_a_transposed_times_b(N):
    gen = torch.Generator().manual_seed(0)
    both = torch.randn(N, 3 + 5, generator=gen, dtype=torch.float64)
    a = both[:, 5:]  # a strided view, as v is in backward
    b = torch.randn(N, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(token_sum_product(a, b), a.t() @ b, rtol=1e-12, atol=1e-12)


def test_the_split_is_taken_from_512_tokens_on():
    assert not split_tokens(256) and split_tokens(512) and split_tokens(8192)


def test_the_switch_picks_the_reference_or_the_tuned_function():
    layer = LoRALinear(nn.Linear(6, 5), 2, 4)
    x = torch.randn(3, 6, requires_grad=True)
    before = use_reference(True)
    try:
        assert type(layer(x).grad_fn.next_functions[0][0]).__name__ == "LoRAFunctionBackward"
        use_reference(False)
        assert (type(layer(x).grad_fn.next_functions[0][0]).__name__
                == "TunedLoRAFunctionBackward")
        y = lora_function(x, layer.base.weight, None, layer.lora_A, layer.lora_B, 2.0)
        assert type(y.grad_fn).__name__ == "TunedLoRAFunctionBackward"
    finally:
        use_reference(before)
