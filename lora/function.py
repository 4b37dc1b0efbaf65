"""The LoRA forward pass of a frozen nn.Linear and its hand-derived backward, as one
torch.autograd.Function.

Shapes (the microsoft/LoRA convention of lora/layer.py), N = number of tokens, x in rows:

    x   (N, in)    input                    W0  (out, in)   frozen base weight
    A   (r, in)    lora_A                   b   (out,)      frozen base bias, or None
    B   (out, r)   lora_B                   s               scaling (alpha / r; rsLoRA: / sqrt(r))
    m   (N, in)    dropout mask, each entry 0 or 1/(1-p); None when dropout is off

Forward (Hu et al. 2021, Sec. 4.1: h = W0 x + dW x with dW = s B A, never formed; the paper's
column vectors written here as rows):

    x_d = x * m                     (N, in)     dropout acts on the adapter's input only
    u   = x_d A^T                   (N, r)
    y   = x W0^T + b + s u B^T      (N, out)

Backward. With g = dL/dy (N, out), write y element-wise:
    y_nk = sum_j x_nj W0_kj + b_k + s sum_i u_ni B_ki,    u_ni = sum_j x_nj m_nj A_ij.
    dL/dB_ki = s sum_n g_nk u_ni               ->  dL/dB = s g^T u        (out, N)(N, r) = (out, r)
    dL/du_ni = s sum_k g_nk B_ki               ->  v     = s g B          (N, out)(out, r) = (N, r)
    dL/dA_ij = sum_n v_ni x_nj m_nj            ->  dL/dA = v^T x_d        (r, N)(N, in)  = (r, in)
    dL/dx_nj = sum_k g_nk W0_kj + m_nj sum_i v_ni A_ij
                                               ->  dL/dx = g W0 + (v A) * m               (N, in)
    W0 and b get no gradient: they are frozen, which is the point of LoRA.

Saved for backward: x_d (x itself when dropout is off, no copy), u, the mask, s B (out, r), and
W0 and A themselves -- not the output y.

Why it is fast: the frozen layer alone costs two big matmuls (x W0^T forward, g W0 backward);
with r = 8 each rank-r product costs about one pass over an activation. The code adds as few
passes as it can; the comments in forward and backward say where, and lora/bench.py measures
the result against the frozen layer alone.
"""
import torch


class LoRAFunction(torch.autograd.Function):
    """y = x W0^T + b + s (x_d A^T) B^T for 2-D x; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask=None):
        x_d = x if mask is None else x * mask                  # (N, in)
        sB = lora_B * scaling                                  # (out, r): scale the small factor
        u = x_d @ lora_A.t()                                   # (N, r): one read of x
        # s u B^T is y's initial value, written in the pass that broadcasts b anyway
        if bias is None:
            y = u @ sB.t()                                     # (N, out)
        else:
            y = torch.addmm(bias, u, sB.t())                   # (N, out) = b + s u B^T
        y.addmm_(x, weight.t())                                # y += x W0^T, in place: no add pass
        ctx.save_for_backward(x_d, weight, lora_A, sB, u, mask)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x_d, weight, lora_A, sB, u, mask = ctx.saved_tensors
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        grad_x = grad_A = grad_B = None
        if need_x and mask is None:
            grad_x, v = _input_grad_and_v(g, weight, lora_A, sB)
        else:
            v = g @ sB                                         # (N, r) = s g B
            if need_x:  # the mask sits between the two terms, so they are summed explicitly
                grad_x = torch.addcmul(g @ weight, v @ lora_A, mask)  # (N, in)
        if need_A:
            grad_A = v.t() @ x_d                               # (r, in): one read of x
        if need_B:
            # (u^T g)^T rather than g^T u: the same numbers, but this way round MKL reads g
            # row by row; measured several times faster here for r = 8.
            grad_B = (u.t() @ g).t() * ctx.scaling             # (out, r): one read of g
        return grad_x, None, None, grad_A, grad_B, None, None


def _input_grad_and_v(g, weight, lora_A, sB):
    """One pass over g for both dL/dx = g W0 + v A = g (W0 + sBA) and v = s g B (no dropout):
    s B rides along as r extra columns, g [W0 + sBA | sB]. Forming W0 + sBA costs out * in * r
    flops, and no gradient flows through it (unlike the naive F.linear(x, W0 + sBA))."""
    in_features = weight.shape[1]
    fused = torch.cat([weight, sB], dim=1)                 # (out, in + r) = [W0 | sB]
    fused[:, :in_features].addmm_(sB, lora_A)              # [W0 + sBA | sB], in place
    both = g @ fused                                       # (N, in + r)
    return both[:, :in_features], both[:, in_features:]    # (N, in), (N, r)
