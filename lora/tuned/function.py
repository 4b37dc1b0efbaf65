"""TunedLoRAFunction: the same function as the reference LoRAFunction (lora/function.py), with
fewer passes over the activations. Same shapes, same saved tensors, the same numbers up to the
order of float sums (tests/test_lora_tuned.py holds the two equal, values and gradients).

Three tuned forms, each switched by a field of `Tuning` (lora/tuned/__init__.py picks them):

summed_forward     y = x (W0 + sBA)^T + b: the frozen layer's one matmul on the summed weight
                   (lora/tuned/products.summed_weight) instead of x W0^T plus s u B^T. Forming
                   W0 + sBA costs out * in * r multiply-adds; it saves the s u B^T product,
                   N * r * out, and the pass that adds it into y: it pays when N > in. Only
                   without a dropout mask (the mask sits on the adapter's input alone), and
                   only for a float32 / float64 W0: a 16-bit W0 would round away an update
                   below its own step of ~1e-3.
one_pass_backward  dL/dx and v = s g B in one pass over g, g [W0 + sBA | sB]
                   (products.input_grad_and_v) instead of g W0, g sB and (v A) apart. Forming
                   costs out * in * r again; it saves N * r * (in + out) and two passes over an
                   (N, in) tensor: it pays when N (in + out) > in * out. Without a mask only.
token_split        dL/dA = v^T x_d and dL/dB = s g^T u as a few batched runs over the tokens
                   (products.token_sum_product), a work-around for a slow MKL shape.
"""
from dataclasses import dataclass

import torch

from tiny_gpt.util.modules import dense, is_compressed_weight

from .products import input_grad_and_v, summed_weight, token_sum_product

SUMMABLE = (torch.float32, torch.float64)  # dtypes whose W0 + sBA keeps the small update


@dataclass(frozen=True)
class Tuning:
    """Which tuned forms a call uses (see the module docstring); all False is the reference."""
    summed_forward: bool = True
    one_pass_backward: bool = True
    token_split: bool = True


class TunedLoRAFunction(torch.autograd.Function):
    """LoRAFunction's y = x W0^T + b + s (x_d A^T) B^T, computed the ways `tuning` says."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask=None, tuning=Tuning()):
        W0 = dense(weight, x.dtype)                                # (out, in)
        x_d = x if mask is None else x * mask                      # (N, in)
        u = x_d @ lora_A.t()                                       # (N, r)
        if tuning.summed_forward and mask is None and W0.dtype in SUMMABLE:
            y = torch.nn.functional.linear(x, summed_weight(W0, lora_A, lora_B, scaling), bias)
        else:  # s u B^T is y's initial value, written in the pass that broadcasts b anyway
            sBt = lora_B.t() * scaling                             # (r, out)
            y = u @ sBt if bias is None else torch.addmm(bias, u, sBt)  # (N, out)
            y.addmm_(x, W0.t())                                    # y += x W0^T, in place
        compressed = is_compressed_weight(weight)
        ctx.save_for_backward(x_d, None if compressed else W0, lora_A, lora_B, u, mask)
        ctx.compressed = weight if compressed else None
        ctx.scaling, ctx.tuning = scaling, tuning
        return y

    @staticmethod
    def backward(ctx, g):
        x_d, W0, lora_A, lora_B, u, mask = ctx.saved_tensors
        s, tuning = ctx.scaling, ctx.tuning
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        if need_x:
            W0 = dense(ctx.compressed, g.dtype) if ctx.compressed is not None else W0
        product = token_sum_product if tuning.token_split else (lambda a, b: a.t() @ b)
        grad_x = grad_A = grad_B = None
        if need_x and mask is None and tuning.one_pass_backward:
            grad_x, v = input_grad_and_v(g, W0, lora_A, lora_B, s)  # (N, in), (N, r)
        else:
            v = g @ (lora_B * s)                                   # (N, r)
            if need_x:
                grad_x = (g @ W0).addmm_(v, lora_A) if mask is None else \
                    torch.addcmul(g @ W0, v @ lora_A, mask)        # (N, in)
        if need_A:
            grad_A = product(v, x_d)                               # (r, in) = v^T x_d
        if need_B:
            grad_B = product(u, g).t() * s                         # (out, r) = s g^T u
        return grad_x, None, None, grad_A, grad_B, None, None, None
