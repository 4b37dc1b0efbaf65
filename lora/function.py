"""The LoRA forward pass of a frozen linear layer and its hand-derived backward, as one
torch.autograd.Function: the reference, each line of the derivation right above the line that
computes it.

Shapes (the microsoft/LoRA convention of lora/layer.py), N = number of tokens, x in rows:

    x   (N, in)    input                    W0  (out, in)   frozen base weight
    A   (r, in)    lora_A                   b   (out,)      frozen base bias, or None
    B   (out, r)   lora_B                   s               scaling (alpha / r; rsLoRA: / sqrt(r))
    m   (N, in)    dropout mask, each entry 0 or 1/(1-p); None when dropout is off

Forward (Hu et al. 2021, Sec. 4.1: h = W0 x + dW x with dW = s B A; the paper's column vectors
written here as rows). dW itself is never formed: x goes through A, then B.

Backward. With g = dL/dy (N, out), write y element by element:

    y_nk = sum_j x_nj W0_kj + b_k + s sum_i u_ni B_ki,     u_ni = sum_j x_nj m_nj A_ij

and differentiate; each result is written below as a matrix product, with its shape, right
above the line of `backward` that computes it. W0 and b get no gradient: they are frozen, which
is the point of LoRA. No gradient needs W0 + sBA either.

Saved for backward: x_d (x itself when dropout is off, no copy), u, the mask, W0, A and B --
not the output y.

A compressed base (QLoRA): `weight` may also be a frozen weight stored in another form, anything
with .dequantize(dtype) -> (out, in) tensor, such as a 4-bit base's Quantized4bit. Then W0 is
decoded in forward, used and dropped; backward decodes it again instead of saving a float copy
(the memory QLoRA exists to save): tiny_gpt.util.modules.dense, the one home of that habit.

lora/tuned/ holds a faster form of the same function (fewer passes over the activations),
tested equal to this one; lora/tuned/__init__.py says which one a LoRALinear runs.
"""
import torch

from tiny_gpt.util.modules import dense, is_compressed_weight


class LoRAFunction(torch.autograd.Function):
    """y = x W0^T + b + s (x_d A^T) B^T for 2-D x; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask=None):
        W0 = dense(weight, x.dtype)                        # (out, in); decoded if compressed
        # x_d = x * m                        (N, in)     dropout acts on the adapter's input only
        x_d = x if mask is None else x * mask
        # u = x_d A^T                        (N, in)(in, r) = (N, r)
        u = x_d @ lora_A.t()
        # y = x W0^T + b + s u B^T           (N, in)(in, out) + (N, r)(r, out) = (N, out)
        y = torch.nn.functional.linear(x, W0, bias) + scaling * (u @ lora_B.t())
        compressed = is_compressed_weight(weight)
        ctx.save_for_backward(x_d, None if compressed else W0, lora_A, lora_B, u, mask)
        ctx.compressed = weight if compressed else None    # codes only: W0 itself is dropped
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x_d, W0, lora_A, lora_B, u, mask = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        grad_x = grad_A = grad_B = None
        # dL/dB_ki = s sum_n g_nk u_ni   ->  dL/dB = s g^T u     (out, N)(N, r) = (out, r)
        if need_B:
            grad_B = s * (g.t() @ u)
        # dL/du_ni = s sum_k g_nk B_ki   ->  v = s g B           (N, out)(out, r) = (N, r)
        v = s * (g @ lora_B)
        # dL/dA_ij = sum_n v_ni x_nj m_nj ->  dL/dA = v^T x_d    (r, N)(N, in) = (r, in)
        if need_A:
            grad_A = v.t() @ x_d
        # dL/dx_nj = sum_k g_nk W0_kj + m_nj sum_i v_ni A_ij
        #                                ->  dL/dx = g W0 + (v A) * m               (N, in)
        if need_x:
            W0 = dense(ctx.compressed, g.dtype) if ctx.compressed is not None else W0
            vA = v @ lora_A
            grad_x = g @ W0 + (vA if mask is None else vA * mask)
        return grad_x, None, None, grad_A, grad_B, None, None
