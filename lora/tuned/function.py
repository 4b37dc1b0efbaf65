"""TunedLoRAFunction: the function of the reference LoRAFunction (lora/function.py) with fewer
passes over the activations. Same shapes, same saved tensors, the same numbers up to the order
of float sums (tests/test_lora_tuned.py holds the two equal, values and gradients).

Two changes, each kept because lora/bench.py measured it buying >= 10% where it runs:

in place       every "a + b" of the derivation whose b is a product is written as one
               addmm / addcmul into a: y starts as s u B^T (with b broadcast in the same
               pass) and x W0^T is added in place; dL/dx starts as g W0 and v A is added in
               place. No (N, out) or (N, in) temporary is made and read again.
token split    dL/dA = v^T x_d and dL/dB = s g^T u, sums over the N tokens with a small
               (r, d) result, run as `parts` batched runs of N / parts tokens each
               (token_sum_product): MKL runs the long thin product slowly on few cores. It
               pays only with enough tokens per run: split_tokens says when.

Tried and dropped (both measured slower or within noise of the above at every shape of the
bench): forming W0 + sBA for a one-matmul forward, and g [W0 + sBA | sB] for dL/dx and v in one
pass; DoRA, which forms W0 + sBA anyway for its norms, keeps both (lora/variants/dora.py).
"""
import torch

from tiny_gpt.util.modules import dense, is_compressed_weight

MIN_SPLIT_TOKENS = 512  # fewer tokens: the split measured no faster (2048 wide x 256 tokens)


def split_tokens(n_tokens):
    """Is token_sum_product worth it for N tokens? (lora/bench.py: 2x at 8192 tokens, ~1.3x at
    512, none at 256, on a 2-core CPU.)"""
    return n_tokens >= MIN_SPLIT_TOKENS


def token_sum_product(a, b, parts=4):
    """a^T b for a (N, r) and b (N, d): a sum over the N tokens, (r, d).

    Cutting the tokens into `parts` runs of N / parts, one batched matmul over the runs, then
    adding their (r, d) results: the same numbers, summed in another order."""
    n = a.shape[0]
    if n % parts:
        return a.t() @ b
    runs_a = a.reshape(parts, n // parts, a.shape[1]).transpose(1, 2)  # (parts, r, N / parts)
    return torch.bmm(runs_a, b.reshape(parts, n // parts, b.shape[1])).sum(0)  # (r, d)


class TunedLoRAFunction(torch.autograd.Function):
    """LoRAFunction's y = x W0^T + b + s (x_d A^T) B^T; split: use token_sum_product."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask=None, split=True):
        W0 = dense(weight, x.dtype)                                # (out, in)
        x_d = x if mask is None else x * mask                      # (N, in)
        u = x_d @ lora_A.t()                                       # (N, r)
        sBt = lora_B.t() * scaling                                 # (r, out): scale the small
        y = u @ sBt if bias is None else torch.addmm(bias, u, sBt)  # (N, out) = b + s u B^T
        y.addmm_(x, W0.t())                                        # y += x W0^T, in place
        compressed = is_compressed_weight(weight)
        ctx.save_for_backward(x_d, None if compressed else W0, lora_A, lora_B, u, mask)
        ctx.compressed = weight if compressed else None
        ctx.scaling, ctx.split = scaling, split
        return y

    @staticmethod
    def backward(ctx, g):
        x_d, W0, lora_A, lora_B, u, mask = ctx.saved_tensors
        s = ctx.scaling
        product = token_sum_product if ctx.split else (lambda a, b: a.t() @ b)
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        grad_x = grad_A = grad_B = None
        v = g @ (lora_B * s)                                       # (N, r) = s g B
        if need_x:
            W0 = dense(ctx.compressed, g.dtype) if ctx.compressed is not None else W0
            if mask is None:
                grad_x = (g @ W0).addmm_(v, lora_A)                # (N, in) = g W0 + v A
            else:
                grad_x = torch.addcmul(g @ W0, v @ lora_A, mask)   # g W0 + (v A) * m
        if need_A:
            grad_A = product(v, x_d)                               # (r, in) = v^T x_d
        if need_B:
            grad_B = product(u, g).t() * s                         # (out, r) = s g^T u
        return grad_x, None, None, grad_A, grad_B, None, None, None
