"""DoRA (Liu et al. 2024): LoRA on the direction of each weight row, with its length learned apart.

Shapes as in lora/function.py: x (N, in), W0 (out, in), A (r, in), B (out, r), s the scaling,
and m (out,) the magnitudes, one per output feature:

    V  = W0 + s B A                     (out, in)   LoRA's weight
    n  = ||V||, row by row              (out,)      n_k = sqrt(sum_j V_kj^2)
    W' = (m / n)[:, None] * V           each row of V scaled to length m_k
    y  = x W'^T + b = c * (x V^T) + b,  c = m / n   (N, out), c broadcast over rows

At initialization m = ||W0|| row by row and B = 0, so V = W0, c = 1 and W' = W0: the model is
its base at step 0. Which norm: the paper writes W in (in, out) and normalizes its columns; in
the (out, in) layout of nn.Linear those are rows, one length per output feature -- as in the
authors' code (`weight.norm(p=2, dim=1)`) and PEFT's.

Forward: V is formed anyway for its row norms (out * in * r flops), so in float32 and float64
z = x V^T is one matmul, as the frozen layer's; a 16-bit W0 would round away the small update in
V, so there z = x W0^T + s (x A^T) B^T (lora/function.py says the same of LoRA). u = x A^T is kept
for dL/dB either way.

Backward, with g = dL/dy (N, out) and g_z = g * c (dL/dz):

    dL/dm_k   = (sum_n g_nk z_nk) / n_k                         = gc_k / n_k
    dL/dx     = g_z V, and v = g_z B beside it: one pass, g_z [V | B] (V formed again,
                input_grad_and_v)
    through z:  dL/dV = g_z^T x, so
                dL/dB = s (g_z^T x) A^T = s g_z^T u,  u = x A^T (N, r), saved
                dL/dA = s B^T g_z^T x   = s (g_z B)^T x
    through n (exact form only): dL/dn_k = -gc_k m_k / n_k^2 and dn_k/dV_k = V_k / n_k, so
                dL/dV += diag(d) V,   d = -gc m / n^3           (out,)
                dL/dB += s diag(d) V A^T = s diag(d) (W0 A^T + s B A A^T)
                dL/dA += s B^T diag(d) V = s (dB)^T W0 + s^2 ((dB)^T B) A,   dB = d[:, None] * B

The paper's memory-saving form (Sec. 4.3) treats n as a constant in backward: the "through n"
terms are dropped, and nothing about V beyond n is saved. The gradient of m is exact in both
forms; those of A and B differ by the dropped terms (measured in tests/test_dora.py). W0 and b
are frozen: no gradient. Saved for backward: x, u, z (N, out), n, and W0, A, B, m themselves.
"""
import torch
import torch.nn as nn

from tiny_gpt.util.modules import float_weight
from tiny_gpt.util.torch_compat import autocast_enabled

from ..layer import LoRALinear
from ..tuned import token_sum_product


def summed_weight(weight, lora_A, lora_B, scaling, dtype=None):
    """V = W0 + s B A, (out, in), in `dtype` (default W0's): the weight DoRA's direction is
    taken of; out * in * r multiply-adds and one new (out, in) tensor, no gradient through it."""
    dtype = dtype or weight.dtype
    return torch.addmm(weight.to(dtype), lora_B.to(dtype), lora_A.to(dtype), alpha=scaling)


def input_grad_and_v(g, weight, lora_A, lora_B, scaling):
    """(g V, s g B) from one pass over g (N, out): s B rides along as r extra columns,
    g [W0 + sBA | sB]  (N, out)(out, in + r) = (N, in + r)."""
    in_features = weight.shape[1]
    sB = lora_B * scaling                                   # (out, r)
    fused = torch.cat([weight, sB], dim=1)                  # (out, in + r) = [W0 | sB]
    fused[:, :in_features].addmm_(sB, lora_A)               # [W0 + sBA | sB], in place
    both = g @ fused                                        # (N, in + r)
    return both[:, :in_features], both[:, in_features:]     # (N, in), (N, r)


def dora_norm(weight, lora_A, lora_B, scaling):
    """n = ||W0 + s B A|| row by row, (out,), computed in at least float32."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # a 16-bit V would lose the update
    return summed_weight(weight, lora_A, lora_B, scaling, dtype).norm(dim=1)


class DoRAFunction(torch.autograd.Function):
    """y = (m / ||W0 + sBA||)[None, :] * (x (W0 + sBA)^T) + b for 2-D x; see the module
    docstring. exact=False is the paper's memory-saving backward (the norm a constant)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, exact=False):
        V = summed_weight(weight, lora_A, lora_B, scaling,
                          torch.promote_types(weight.dtype, torch.float32))  # (out, in)
        n = V.norm(dim=1).to(x.dtype)                                    # (out,)
        u = x @ lora_A.t()                                               # (N, r)
        if V.dtype == x.dtype:                                           # float32 / float64
            z = x @ V.t()                                                # (N, out) = x V^T
        else:                                                            # 16-bit: V rounded
            z = torch.addmm(x @ weight.t(), u, lora_B.t(), alpha=scaling)
        c = magnitude / n                                                # (out,)
        y = z * c if bias is None else torch.addcmul(bias, z, c)
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, u, z, n)
        ctx.scaling, ctx.exact = scaling, exact
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_A, lora_B, magnitude, u, z, n = ctx.saved_tensors
        s = ctx.scaling
        c = magnitude / n
        g_z = g * c                                                      # (N, out)
        gc = (g * z).sum(0)                                              # (out,)
        grad_x = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:  # g_z [V | sB]: dL/dx and s v in one pass over g_z
            grad_x, sv = input_grad_and_v(g_z, weight.to(g.dtype), lora_A, lora_B, s)
        else:
            sv = s * (g_z @ lora_B)                                      # (N, r)
        if ctx.needs_input_grad[5]:
            grad_m = gc / n
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_B = s * token_sum_product(u, g_z).t()                   # (out, r)
            grad_A = token_sum_product(sv, x)                            # (r, in)
            if ctx.exact:
                d = -gc * magnitude / n ** 3                             # (out,)
                dB = d[:, None] * lora_B                                 # (out, r)
                VAt = torch.addmm(weight @ lora_A.t(), lora_B, lora_A @ lora_A.t(), alpha=s)
                grad_B = grad_B + s * d[:, None] * VAt                   # (out, r)
                grad_A = grad_A + s * (dB.t() @ weight) + s * s * ((dB.t() @ lora_B) @ lora_A)
        return grad_x, None, None, grad_A, grad_B, grad_m, None, None


def dora_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling, exact=True):
    """The same layer by plain autograd on the formula (W' formed): the reference the
    hand-derived backward is tested against. exact=False detaches the norm, as Sec. 4.3."""
    V = weight + scaling * lora_B @ lora_A
    n = V.norm(dim=1)
    n = n if exact else n.detach()
    y = x @ ((magnitude / n)[:, None] * V).t()
    return y if bias is None else y + bias


def check_dora_base(base, dropout, where="this layer"):
    """Raise unless a DoRA adapter can go on `base`: a float weight (for the norms), no dropout."""
    if float_weight(base) is None:
        raise TypeError(f"{where}: DoRA needs a float base weight for its norms; "
                        f"{type(base).__name__} has none (a 4-bit base is not supported with "
                        "DoRA here)")
    if dropout:
        raise ValueError(f"{where}: DoRA adapters take no dropout here, got {dropout!r}")


def dora_forward(base, adapter, x):
    """y (..., out) of a DoRA adapter (lora_A, lora_B, scaling, lora_magnitude_vector,
    dora_exact) on a float `base`: DoRAFunction, or the formula by autograd where dtypes mix or
    autocast is on (in the adapter's dtype)."""
    weight, bias = base.weight, base.bias
    x2 = x.reshape(-1, weight.shape[1])                                  # (N, in)
    a = adapter
    args = (a.lora_A, a.lora_B, a.lora_magnitude_vector, a.scaling)
    if x.dtype == weight.dtype == a.lora_A.dtype and not autocast_enabled(x.device.type):
        y = DoRAFunction.apply(x2, weight, bias, *args, a.dora_exact)
    else:
        cast = a.lora_A.dtype
        y = dora_reference(x2.to(cast), weight.to(cast), None if bias is None else
                           bias.to(cast), *args, a.dora_exact).to(x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def fold_dora(weight, adapter, sign):
    """merge: W0 <- (m / n) * (W0 + sBA), remembering n = ||W0 + sBA|| on the adapter;
    unmerge: the inverse, W0 <- W' * (n / m) - sBA with the n of the merge (W0 is gone)."""
    delta = adapter.delta_weight().to(weight.dtype)
    if sign > 0:
        adapter.merge_norm = dora_norm(weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
        weight.add_(delta).mul_((adapter.lora_magnitude_vector / adapter.merge_norm)[:, None])
    else:
        weight.mul_((adapter.merge_norm / adapter.lora_magnitude_vector)[:, None]).sub_(delta)
        adapter.merge_norm = None


class DoRALinear(LoRALinear):
    """LoRALinear with DoRA's magnitudes: y = (m / ||W0 + sBA||) * (W0 + sBA) x + b.
    A float base (for the norms), no dropout; m starts at ||W0|| row by row, so the layer starts
    as its base. dora_exact: the exact backward instead of the paper's memory-saving one."""

    use_dora = True

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        check_dora_base(base, dropout)
        super().__init__(base, r, alpha, dropout, use_rslora)
        self.dora_exact, self.merge_norm = False, None
        self.lora_magnitude_vector = nn.Parameter(base.weight.detach().norm(dim=1))  # (out,)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)
        return dora_forward(self.base, self, x)

    def merge(self):
        self.check_can_merge()
        with torch.no_grad():
            fold_dora(self.base.weight, self, +1)
        self.merged = True

    def unmerge(self):
        self.check_can_unmerge()
        with torch.no_grad():
            fold_dora(self.base.weight, self, -1)
        self.merged = False
