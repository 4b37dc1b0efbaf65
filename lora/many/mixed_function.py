"""Many adapters in one batch: the low-rank term when every row of the batch picks its own
adapter, as one torch.autograd.Function with its backward derived by hand.

Shapes (the convention of lora/function.py, with a leading row index b and an adapter index j):

    x      (N, T, in)     N rows (requests) of T tokens
    A      (n, R, in)     the n adapters' lora_A, stacked; R = the largest rank among them
    B      (n, out, R)    their lora_B, stacked
    s      (n,)           their scalings (alpha / r, or alpha / sqrt(r) with rsLoRA)
    rows   (N,)           rows[b] = j: row b uses adapter j
    m      (N, T, in)     dropout mask (0 or 1/(1-p_j) with row b's own p), or None

An adapter of rank r < R sits in its slot with zero rows in A (R - r of them) and zero columns
in B: B_j A_j is unchanged, and the zeros stay zero in training (their gradients, below, vanish).
Padding keeps every row's factors the same shape, so all N rows go through one batched matmul
(torch.bmm); grouping the rows by rank instead would cost one matmul per group, which is the
per-adapter loop that this function exists to avoid. The price is R - r wasted columns per row,
small next to the base layer's in * out per token while ranks stay small.

Forward, row b with j = rows[b] (row b's gathered factors A_b = A[j], sB_b = s_j B[j]):

    x_d = x * m                                  (N, T, in)
    u_b = x_d,b A_b^T                            (T, in)(in, R)  = (T, R)     one bmm
    d_b = u_b sB_b^T                             (T, R)(R, out)  = (T, out)   one bmm

The base layer's W0 x runs outside, once for the whole batch: this returns only d, so that the
base can be anything (an nn.Linear, a 4-bit Linear4bit).

Backward, with g_b = dL/dd_b (T, out). Row b's formula is lora/function.py's with its own factors:

    v_b        = g_b sB_b                        (T, out)(out, R) = (T, R)
    dL/dx_b    = (v_b A_b) * m_b                 (T, R)(R, in)    = (T, in)
    dL/dA_b    = v_b^T x_d,b                     (R, T)(T, in)    = (R, in)
    dL/dsB_b   = g_b^T u_b                       (out, T)(T, R)   = (out, R)

A_b is A[j] for every row b with rows[b] = j, so adapter j's gradient is the sum over its own
rows and over no other (index_add_), and dL/dB_j = s_j dL/dsB_j. A padded slot gets zero
gradient: its zero column of B makes that column of v zero (so dL/dA's padded row is zero), and
its zero row of A makes that column of u zero (so dL/dB's padded column is zero).
"""
import torch


class MixedLoRAFunction(torch.autograd.Function):
    """d = s_j B_j A_j dropout(x_b) for every row b with j = rows[b]; see the module docstring.
    The scalings and row indices are constants (no gradient)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scalings, rows, mask=None):
        x_d = x if mask is None else x * mask                      # (N, T, in)
        A_rows = lora_A.index_select(0, rows)                      # (N, R, in)
        sB_rows = (lora_B * scalings[:, None, None]).index_select(0, rows)  # (N, out, R)
        u = torch.bmm(x_d, A_rows.transpose(1, 2))                 # (N, T, R)
        d = torch.bmm(u, sB_rows.transpose(1, 2))                  # (N, T, out)
        ctx.save_for_backward(x_d, A_rows, sB_rows, u, scalings, rows, mask)
        ctx.n_adapters = lora_A.shape[0]
        return d

    @staticmethod
    def backward(ctx, g):
        x_d, A_rows, sB_rows, u, scalings, rows, mask = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = None
        v = torch.bmm(g, sB_rows)                                  # (N, T, R)
        if need_x:
            grad_x = torch.bmm(v, A_rows)                          # (N, T, in)
            if mask is not None:
                grad_x = grad_x * mask
        if need_A:
            per_row = torch.bmm(v.transpose(1, 2), x_d)            # (N, R, in)
            grad_A = per_row.new_zeros((ctx.n_adapters, *per_row.shape[1:]))
            grad_A.index_add_(0, rows, per_row)                    # (n, R, in): own rows only
        if need_B:
            per_row = torch.bmm(g.transpose(1, 2), u)              # (N, out, R)
            grad_sB = per_row.new_zeros((ctx.n_adapters, *per_row.shape[1:]))
            grad_sB.index_add_(0, rows, per_row)                   # (n, out, R)
            grad_B = grad_sB * scalings[:, None, None]
        return grad_x, grad_A, grad_B, None, None, None


def mixed_delta_autograd(x, lora_A, lora_B, scalings, rows, mask=None):
    """The same d by plain autograd (gather, then two bmm): the reference the hand-derived
    backward is tested against, and the path taken under autocast."""
    x_d = x if mask is None else x * mask
    A_rows = lora_A[rows]                                          # (N, R, in)
    sB_rows = (lora_B * scalings[:, None, None])[rows]             # (N, out, R)
    return torch.bmm(torch.bmm(x_d, A_rows.transpose(1, 2)), sB_rows.transpose(1, 2))
