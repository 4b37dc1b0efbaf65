"""The LoRA forward pass of a frozen nn.Linear and its hand-derived backward, as one
torch.autograd.Function.

Shapes (the microsoft/LoRA convention of lora/layer.py), N = number of tokens, x in rows:

    x   (N, in)    input                    W0  (out, in)   frozen base weight
    A   (r, in)    lora_A                   b   (out,)      frozen base bias, or None
    B   (out, r)   lora_B                   s               scaling (alpha / r; rsLoRA: / sqrt(r))
    m   (N, in)    dropout mask, each entry 0 or 1/(1-p); None when dropout is off

Forward (Hu et al. 2021, Sec. 4.1: h = W0 x + dW x with dW = s B A; the paper's column vectors
written here as rows; "Why it is fast" below says when the code sums W0 + sBA first):

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

A compressed base (QLoRA): `weight` may also be a frozen weight stored in another form, anything
with .dequantize(dtype) -> (out, in) tensor, such as a 4-bit base's Quantized4bit. Then W0 is
decoded in forward, used, and dropped; backward decodes it again instead of saving a float copy
(the memory QLoRA exists to save), and the same two products run on it.

Why it is fast: the frozen layer alone costs two big matmuls (x W0^T forward, g W0 backward);
with r = 8 each rank-r product costs about one pass over an activation. The code adds as few
passes as it can; the comments in forward and backward say where, and lora/bench.py measures
the result against the frozen layer alone. Both big matmuls run on the summed weight W0 + sBA
(it costs out * in * r flops, nothing next to N * out * in): in backward without a mask, and in
forward when there is no dropout mask and W0 is in float32 or float64, where rounding the sum
costs ~1e-7 of W0. A 16-bit W0 would round away an update below its own step of ~1e-3, so there
the forward keeps the two products apart; the gradients, checked at bf16 tolerance, take the
sum either way.
"""
import torch


class LoRAFunction(torch.autograd.Function):
    """y = x W0^T + b + s (x_d A^T) B^T for 2-D x; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask=None):
        compressed = None if isinstance(weight, torch.Tensor) else weight
        if compressed is not None:
            weight = compressed.dequantize(x.dtype)            # (out, in), dropped after use
        x_d = x if mask is None else x * mask                  # (N, in)
        sB = lora_B * scaling                                  # (out, r): scale the small factor
        u = x_d @ lora_A.t()                                   # (N, r): one read of x
        if mask is None and weight.dtype in (torch.float32, torch.float64):
            # y = x (W0 + sBA)^T + b: the frozen layer's one matmul, on the summed weight
            summed = torch.addmm(weight, sB, lora_A)           # (out, in), a new tensor
            y = torch.nn.functional.linear(x, summed, bias)    # (N, out)
        else:
            # s u B^T is y's initial value, written in the pass that broadcasts b anyway
            y = u @ sB.t() if bias is None else torch.addmm(bias, u, sB.t())  # (N, out)
            y.addmm_(x, weight.t())                            # y += x W0^T, in place
        ctx.save_for_backward(x_d, None if compressed else weight, lora_A, sB, u, mask)
        ctx.scaling, ctx.compressed = scaling, compressed
        return y

    @staticmethod
    def backward(ctx, g):
        x_d, weight, lora_A, sB, u, mask = ctx.saved_tensors
        if ctx.compressed is not None:
            weight = ctx.compressed.dequantize(g.dtype)        # (out, in), decoded again
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        grad_x = grad_A = grad_B = None
        if need_x and mask is None:
            grad_x, v = _input_grad_and_v(g, weight, lora_A, sB)
        else:
            v = g @ sB                                         # (N, r) = s g B
            if need_x:  # the mask sits between the two terms, so they are summed explicitly
                grad_x = torch.addcmul(g @ weight, v @ lora_A, mask)  # (N, in)
        if need_A:
            grad_A = token_sum_product(v, x_d)                 # (r, in) = v^T x_d: one read of x
        if need_B:
            grad_B = token_sum_product(u, g).t() * ctx.scaling  # (out, r) = s g^T u: one of g
        return grad_x, None, None, grad_A, grad_B, None, None


def token_sum_product(a, b, parts=4):
    """a^T b for a (N, r) and b (N, d): a sum over the N tokens, (r, d).

    With r small, MKL runs this shape (a long sum, a small result) slowly and on few cores;
    cutting the tokens into `parts` runs of N / parts, one batched matmul over the runs, then
    adding their (r, d) results, measured 2-3x faster on 2 cores (4096 x 128 and 8192 x 512
    tokens x features, r = 8). The same numbers, summed in another order."""
    n = a.shape[0]
    if n % parts:
        return a.t() @ b
    runs_a = a.view(parts, n // parts, a.shape[1]).transpose(1, 2)  # (parts, r, N / parts)
    return torch.bmm(runs_a, b.view(parts, n // parts, b.shape[1])).sum(0)  # (r, d)


def _input_grad_and_v(g, weight, lora_A, sB):
    """One pass over g for both dL/dx = g W0 + v A = g (W0 + sBA) and v = s g B (no dropout):
    s B rides along as r extra columns, g [W0 + sBA | sB]. Forming W0 + sBA costs out * in * r
    flops, and no gradient flows through it (unlike the naive F.linear(x, W0 + sBA))."""
    in_features = weight.shape[1]
    fused = torch.cat([weight, sB], dim=1)                 # (out, in + r) = [W0 | sB]
    fused[:, :in_features].addmm_(sB, lora_A)              # [W0 + sBA | sB], in place
    both = g @ fused                                       # (N, in + r)
    return both[:, :in_features], both[:, in_features:]    # (N, in), (N, r)
