"""The products the tuned LoRA forms share (lora/tuned/function.py, lora/variants/dora.py):
each one home for a mechanism that the reference (lora/function.py) does not need.

    summed_weight        W0 + s B A, (out, in): the weight the adapted layer computes with
    input_grad_and_v     dL/dx = g (W0 + sBA) and v = s g B in one pass over g
    token_sum_product    a^T b summed over the tokens, in a few runs (one slow MKL shape)
"""
import torch


def summed_weight(weight, lora_A, lora_B, scaling, dtype=None):
    """W0 + s B A, (out, in): out * in * r multiply-adds and one new (out, in) tensor.
    dtype: compute it in this dtype (default W0's); no gradient is meant to flow through it."""
    dtype = dtype or weight.dtype
    return torch.addmm(weight.to(dtype), lora_B.to(dtype), lora_A.to(dtype), alpha=scaling)


def input_grad_and_v(g, weight, lora_A, lora_B, scaling):
    """(g (W0 + sBA), s g B) from one pass over g (N, out): s B rides along as r extra columns,

        g [W0 + sBA | sB]      (N, out)(out, in + r) = (N, in + r)

    which is dL/dx when no dropout mask sits between the two terms, and v beside it."""
    in_features = weight.shape[1]
    sB = lora_B * scaling                                   # (out, r)
    fused = torch.cat([weight, sB], dim=1)                  # (out, in + r) = [W0 | sB]
    fused[:, :in_features].addmm_(sB, lora_A)               # [W0 + sBA | sB], in place
    both = g @ fused                                        # (N, in + r)
    return both[:, :in_features], both[:, in_features:]     # (N, in), (N, r)


def token_sum_product(a, b, parts=4):
    """a^T b for a (N, r) and b (N, d): a sum over the N tokens, (r, d).

    With r small, MKL runs this shape (a long sum, a small result) slowly and on few cores;
    cutting the tokens into `parts` runs of N / parts, one batched matmul over the runs, then
    adding their (r, d) results, is the work-around (lora/bench.py measures what it buys). The
    same numbers, summed in another order."""
    n = a.shape[0]
    if n % parts:
        return a.t() @ b
    runs_a = a.reshape(parts, n // parts, a.shape[1]).transpose(1, 2)  # (parts, r, N / parts)
    return torch.bmm(runs_a, b.reshape(parts, n // parts, b.shape[1])).sum(0)  # (r, d)
