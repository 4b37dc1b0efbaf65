"""LoRAFunction's hand-derived backward: gradcheck, hand-written finite differences, and
agreement with autograd on the plain expression."""
import pytest
import torch

from lora.function import LoRAFunction
from tiny_gpt.util.finite_differences import central_differences
from conftest import lora_inputs

# float64 finite differences with eps = 1e-6 agree with the exact gradient to about eps^2 plus
# rounding (1e-16 / eps): 1e-7 leaves margin for sums over a few dozen terms.
FD_TOL = 1e-7
# float32 carries ~7 digits; sums of ~100 products of O(1) numbers differ by order 1e-6.
F32_TOL = 1e-5


def fixed_mask(shape, p=0.5, dtype=torch.float64, seed=1):
    """A dropout mask of 0 and 1/(1-p), fixed so the function is deterministic."""
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p
    return keep.to(dtype) / (1 - p)


def plain(x, W, b, A, B, s, mask=None):
    x_d = x if mask is None else x * mask
    y = x @ W.t() + s * (x_d @ A.t()) @ B.t()
    return y if b is None else y + b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("N", [5, 8])
def test_gradcheck(bias, dropout, N):
    x, W, b, A, B = lora_inputs(N=N, bias=bias)
    mask = fixed_mask(x.shape) if dropout else None
    fn = lambda x, A, B: LoRAFunction.apply(x, W, b, A, B, 1.5, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=FD_TOL)


@pytest.mark.parametrize("dropout", [False, True])
def test_central_differences_by_hand(dropout):
    """dL/dθ ~ (L(θ + eps) - L(θ - eps)) / (2 eps) for every entry of x, A and B."""
    x, W, b, A, B = lora_inputs()
    mask = fixed_mask(x.shape) if dropout else None
    G = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)  # L = sum(G * y)
    loss = lambda: (G * LoRAFunction.apply(x, W, b, A, B, 2.0, mask)).sum()  # noqa: E731
    loss().backward()
    for t in (x, A, B):
        numeric = central_differences(loss, t, eps=1e-6)
        assert torch.allclose(t.grad, numeric, atol=FD_TOL, rtol=0)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_matches_autograd_float32(dropout, x_needs_grad):
    x, W, b, A, B = lora_inputs(N=64, n_in=32, n_out=48, r=4, dtype=torch.float32)
    x.requires_grad_(x_needs_grad)
    mask = fixed_mask(x.shape, dtype=torch.float32) if dropout else None
    G = torch.randn(64, 48)
    y = LoRAFunction.apply(x, W, b, A, B, 0.5, mask)
    grads = torch.autograd.grad((y * G).sum(), [t for t in (x, A, B) if t.requires_grad])
    y_ref = plain(x, W, b, A, B, 0.5, mask)
    refs = torch.autograd.grad((y_ref * G).sum(), [t for t in (x, A, B) if t.requires_grad])
    assert torch.allclose(y, y_ref, atol=F32_TOL)
    for got, want in zip(grads, refs):
        assert torch.allclose(got, want, atol=F32_TOL)


def test_frozen_weight_and_bias_get_no_gradient():
    """Even when asked for, W0 and b get none: LoRAFunction is for a frozen base only."""
    x, W, b, A, B = lora_inputs()
    W.requires_grad_(True)
    b.requires_grad_(True)
    LoRAFunction.apply(x, W, b, A, B, 1.0, None).sum().backward()
    assert W.grad is None and b.grad is None
    assert A.grad is not None and B.grad is not None


# --- a compressed base weight (QLoRA): decoded in forward, decoded again in backward -----------

def compressed_inputs(dtype=torch.float64):
    """lora_inputs with W replaced by its NF4 form, which LoRAFunction decodes itself."""
    from quant import quantize_nf4
    x, W, b, A, B = lora_inputs(N=6, n_in=64, n_out=5, r=2, dtype=dtype)
    return x, quantize_nf4(W), b, A, B


@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck_with_a_compressed_weight(dropout):
    x, q, b, A, B = compressed_inputs()
    mask = fixed_mask(x.shape) if dropout else None
    fn = lambda x, A, B: LoRAFunction.apply(x, q, b, A, B, 1.5, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=FD_TOL)


def test_a_compressed_weight_computes_what_its_decoded_tensor_computes():
    """The same numbers as LoRAFunction on the dense dequantized W: only where W comes from
    differs, so outputs and gradients are equal to float32 rounding."""
    x, q, b, A, B = compressed_inputs(torch.float32)
    G = torch.randn(x.shape[0], q.shape[0])
    results = []
    for weight in (q, q.dequantize(torch.float32)):
        y = LoRAFunction.apply(x, weight, b, A, B, 0.5, None)
        results.append((y, *torch.autograd.grad((y * G).sum(), (x, A, B))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=F32_TOL, rtol=F32_TOL)


def test_a_compressed_weight_is_not_saved_as_a_float_tensor():
    """Saving the decoded (out, in) weight for backward would keep a float copy of the base
    alive through the step -- the memory QLoRA exists to save."""
    x, q, b, A, B = compressed_inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        LoRAFunction.apply(x, q, b, A, B, 0.5, None)
    assert saved and tuple(q.shape) not in [tuple(s) for s in saved], saved
