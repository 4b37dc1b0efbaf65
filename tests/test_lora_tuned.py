"""The tuned LoRA function equals the reference, values and gradients, in every form the
selection can pick; and the one switch picks what it says."""
import itertools

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear
from lora.function import LoRAFunction
from lora.tuned import Tuning, TunedLoRAFunction, lora_function, tuning_for, use_reference
from lora.tuned.products import input_grad_and_v, summed_weight

# float64: the two compute the same sums in another order (a summed weight, batched runs over
# the tokens), so they differ by rounding, ~1e-15 relative; 1e-12 leaves margin for ~100 terms.
F64_TOL = 1e-12
FD_TOL = 1e-7  # gradcheck's central differences, eps = 1e-6 (see test_lora_function.py)

ALL_TUNINGS = [Tuning(*flags) for flags in itertools.product([False, True], repeat=3)]


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


@pytest.mark.parametrize("tuning", ALL_TUNINGS, ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compressed", [False, True])
def test_every_tuned_form_equals_the_reference(tuning, masked, compressed):
    x, W, b, A, B, mask = inputs(compressed=compressed)
    mask = mask if masked else None
    ref = values_and_grads(lambda: LoRAFunction.apply(x, W, b, A, B, 1.5, mask), x, A, B)
    got = values_and_grads(lambda: TunedLoRAFunction.apply(x, W, b, A, B, 1.5, mask, tuning),
                           x, A, B)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=F64_TOL, rtol=F64_TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_tuned_gradcheck(masked):
    x, W, b, A, B, mask = inputs(N=8, n_in=6)
    mask = mask if masked else None
    fn = lambda x, A, B: TunedLoRAFunction.apply(x, W, b, A, B, 1.5, mask, Tuning())  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=FD_TOL)


def test_the_shared_products_are_what_they_say():
    x, W, b, A, B, _ = inputs()
    torch.testing.assert_close(summed_weight(W, A, B, 1.5), W + 1.5 * B @ A)
    g = torch.randn(8, 5, dtype=torch.float64)
    grad_x, v = input_grad_and_v(g, W, A, B, 1.5)
    torch.testing.assert_close(grad_x, g @ (W + 1.5 * B @ A))
    torch.testing.assert_close(v, 1.5 * g @ B)


def test_the_rule_forms_the_summed_weight_only_where_it_costs_less():
    """Forming W0 + sBA costs out * in * r; it saves N * r * out in forward (N > in) and
    N * r * (in + out) in backward (N (in + out) > in * out)."""
    assert tuning_for(8192, 512, 512) == Tuning(True, True, True)
    assert tuning_for(256, 2048, 2048) == Tuning(False, False, True)
    assert tuning_for(512, 576, 576) == Tuning(False, True, True)


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
