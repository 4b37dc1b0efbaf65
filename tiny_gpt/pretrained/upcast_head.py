"""The output layer of a tied model whose embedding is stored in 16 bits but used in 32.

A QLoRA base keeps what stays in float small too: the token embedding -- which a tied model
(SmolLM2, Llama 3.2) also uses as its output layer -- is frozen, so it can be stored in
bfloat16, as the QLoRA paper keeps it (Dettmers et al. 2023, Sec. 4). At Llama-3.2-1B's shape
E is 128,256 x 2,048: 1.05 GB in float32, 0.53 GB in bfloat16, more than all the 4-bit
projections together. The hidden states stay float32 (a CPU without bfloat16 matmul units
computes them far more slowly), so the head multiplies float32 h by a bfloat16 E:

    logits = h E^T                h (N, C) float32, E (V, C) stored in bfloat16
    dL/dh  = (dL/dlogits) E       E is frozen: it gets no gradient

F.linear(h, E.float()) would make a float32 copy of E (1.05 GB) and keep it for backward:
more than storing E in float32 in the first place. This Function upcasts a slice of E's rows
at a time, in forward and again in backward (QLoRA's decode-twice habit, as quant's
DequantMatmul), so at most one slice exists in float32:

    logits[:, v0:v1] = h E[v0:v1]^T
    dL/dh = sum over the slices of (dL/dlogits[:, v0:v1]) E[v0:v1]
"""
import torch
import torch.nn.functional as F

ROWS = 8192  # rows of E upcast at once: 8,192 x 2,048 x 4 bytes = 64 MB at Llama-3.2-1B's width


class UpcastLinear(torch.autograd.Function):
    """h @ weight^T for a frozen weight stored in another (lower) precision than h."""

    @staticmethod
    def forward(ctx, h, weight, rows):
        ctx.save_for_backward(weight)
        ctx.rows = rows
        logits = h.new_empty(*h.shape[:-1], weight.shape[0])  # (..., V)
        for v0 in range(0, weight.shape[0], rows):
            logits[..., v0:v0 + rows] = F.linear(h, weight[v0:v0 + rows].to(h.dtype))
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        weight, = ctx.saved_tensors
        grad_h = grad_logits.new_zeros(*grad_logits.shape[:-1], weight.shape[1])  # (..., C)
        for v0 in range(0, weight.shape[0], ctx.rows):
            grad_h += grad_logits[..., v0:v0 + ctx.rows] @ weight[v0:v0 + ctx.rows].to(
                grad_logits.dtype)
        return grad_h, None, None


def tied_logits(h, weight, rows=ROWS):
    """h @ weight^T, the tied output layer. A weight in h's dtype goes through F.linear (and
    gets its gradient when trained); a frozen one stored in another dtype, a slice at a time."""
    if weight.dtype == h.dtype:
        return F.linear(h, weight)
    if weight.requires_grad:
        raise ValueError(f"a trained embedding must be stored in the hidden states' dtype "
                         f"{h.dtype}, got {weight.dtype}; freeze it, or store it in {h.dtype}")
    return UpcastLinear.apply(h, weight, rows)
