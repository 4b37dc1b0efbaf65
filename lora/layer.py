"""LoRALinear: a frozen linear layer plus one low-rank update, the whole of LoRA's layer.

Conventions (microsoft/LoRA, `loralib/layers.py`; used everywhere in this package):

    base layer     y0 = W0 x + b,  W0 (out, in), frozen
    lora_A         (r, in)   Kaiming-uniform with a = sqrt(5), exactly like nn.Linear's weight
    lora_B         (out, r)  zeros, so dW = s B A = 0: the adapted model equals its base at step 0
    scaling s      alpha / r               (Hu et al. 2021, Sec. 4.1)
                   alpha / sqrt(r)         with use_rslora (Kalajdzievski 2023, "rank-stabilized"):
                                           keeps the update's scale from shrinking as r grows
    forward        y = base(x) + s B A dropout(x)          dropout on the adapter's input only

x goes through A, then B: dW is never formed, so the base can be anything with `in_features`,
`out_features` and a forward -- an nn.Linear, or QLoRA's 4-bit Linear4bit with no float weight.
On a frozen nn.Linear or 4-bit base, in one dtype and without autocast, forward and backward run
through LoRAFunction (lora/function.py, the hand-derived backward; lora/tuned picks the
reference or its tuned form); otherwise plain autograd runs the same expression.

merge() folds s B A into W0 for inference at zero extra latency; unmerge() takes it out again.
Both are explicit calls, never side effects of train() / eval().
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_gpt.util.checks import is_number, is_whole_number
from tiny_gpt.util.modules import (factory_kind, float_weight, is_compressed_weight,
                                   is_linear_like)
from tiny_gpt.util.torch_compat import autocast_enabled

from .tuned import lora_function


def check_lora_args(r, alpha, dropout, in_features, out_features):
    """Raise ValueError unless 0 < r <= min(in, out), alpha is finite and > 0, and
    0 <= dropout < 1 (each a number, not a string or a bool)."""
    if not (is_whole_number(r, 1) and r <= min(in_features, out_features)):
        raise ValueError(f"r must be an integer with 1 <= r <= min(in_features, out_features) = "
                         f"{min(in_features, out_features)}, got {r!r}")
    if not (is_number(alpha) and 0 < alpha < math.inf):
        raise ValueError(f"alpha must be > 0 and finite (a number), got {alpha!r}")
    if not (is_number(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1) (a number), got {dropout!r}")


def lora_scaling(r, alpha, use_rslora=False):
    """s = alpha / r (Hu et al. 2021, Sec. 4.1), or alpha / sqrt(r) with rank-stabilized LoRA
    (Kalajdzievski 2023), which keeps the update's size from shrinking as r grows."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def lora_update(x, lora_A, lora_B, scaling, dropout, training):
    """s B A dropout(x) by plain autograd, in the factors' dtype: x (..., in) -> (..., out)."""
    x_d = F.dropout(x.to(lora_A.dtype), dropout, training)
    return scaling * F.linear(F.linear(x_d, lora_A), lora_B)


def function_applies(base, x, factor):
    """Does the base compute y = x W0^T + b, frozen, in x's and the factors' dtype, without
    autocast -- so that LoRAFunction computes exactly what the plain expression would? W0 is a
    float tensor (nn.Linear) or compressed (a 4-bit base, computing in its compute_dtype)."""
    bias = getattr(base, "bias", None)
    if isinstance(base, nn.Linear):
        dtype, frozen = base.weight.dtype, not base.weight.requires_grad
    elif is_compressed_weight(getattr(base, "weight", None)) and hasattr(base, "compute_dtype"):
        dtype, frozen = base.compute_dtype, True
    else:
        return False
    return (frozen and (bias is None or (not bias.requires_grad and bias.dtype == dtype))
            and x.dtype == dtype == factor.dtype
            and not (dtype == torch.float16 and x.device.type != "cuda")
            and not autocast_enabled(x.device.type))


class LoRALinear(nn.Module):
    """A frozen `base` layer plus dW = s B A; see the module docstring.

    base: any module with integer `in_features`, `out_features` and forward(x (..., in)).
    The factors live beside it: its device, its float weight's dtype (float32 otherwise).
    """

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear needs a base with integer in_features and out_features; "
                            f"got {type(base).__name__}")
        check_lora_args(r, alpha, dropout, base.in_features, base.out_features)
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        kind = factory_kind(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kind))       # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kind))      # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        self.merged = False    # s B A folded into the base weight
        self.disabled = False  # set by lora.disable_adapters: forward gives base(x)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)  # a merged base weight already holds the update
        if not function_applies(self.base, x, self.lora_A):  # y = base(x) + s B A dropout(x)
            y = self.base(x)
            return y + lora_update(x, self.lora_A, self.lora_B, self.scaling, self.dropout,
                                   self.training).to(y.dtype)
        x2 = x.reshape(-1, self.in_features)                  # (N, in), N = all leading dims
        y = lora_function(x2, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                          self.scaling, self.dropout_mask(x2))
        return y.view(*x.shape[:-1], self.out_features)

    def dropout_mask(self, x):
        """(N, in) mask of 0 and 1/(1-p) for LoRAFunction, or None when dropout is off."""
        if not (self.training and self.dropout > 0):
            return None
        keep = 1.0 - self.dropout
        return torch.empty_like(x).bernoulli_(keep).div_(keep)

    def delta_weight(self):
        """dW = s B A, (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    # --- merge / unmerge: explicit calls, checked before anything changes --------------------
    def check_can_merge(self, where="this layer"):
        """-> the float base weight that merge() will change."""
        if self.merged:
            raise RuntimeError(f"{where}: already merged; call unmerge() first")
        return self._float_weight("merge")

    def check_can_unmerge(self, where="this layer"):
        if not self.merged:
            raise RuntimeError(f"{where}: not merged: there is nothing to unmerge")
        return self._float_weight("unmerge")

    def merge(self):
        """W0 <- W0 + s B A, in W0's dtype."""
        weight = self.check_can_merge()
        with torch.no_grad():
            weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    def unmerge(self):
        """W0 <- W0 - s B A (the original up to rounding)."""
        weight = self.check_can_unmerge()
        with torch.no_grad():
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def _float_weight(self, action):
        weight = float_weight(self.base)
        if weight is None:
            raise TypeError(f"cannot {action}: the base {type(self.base).__name__} has no float "
                            ".weight (a 4-bit base keeps the adapter separate; dequantize it "
                            "into an nn.Linear first)")
        return weight

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"merged={self.merged}")
