"""LoRALinear: a frozen linear layer plus one or more named low-rank updates.

Conventions (microsoft/LoRA, `loralib/layers.py`; used everywhere in this package):

    base layer     y0 = W0 x + b,  W0 (out, in), frozen
    lora_A         (r, in)   Kaiming-uniform with a = sqrt(5), exactly like nn.Linear's weight
    lora_B         (out, r)  zeros, so dW = s B A = 0: the adapted model equals its base at step 0
    scaling s      alpha / r               (Hu et al. 2021, Sec. 4.1)
                   alpha / sqrt(r)         with use_rslora (Kalajdzievski 2023, "rank-stabilized"):
                                           keeps the update's scale from shrinking as r grows
    forward        y = base(x) + s B A dropout(x)          dropout on the adapter's input only

In the plain expression x goes through A then B, so the base can be anything with `in_features`,
`out_features` and a forward -- an nn.Linear, or the 4-bit Linear4bit of QLoRA that has no
float weight. With one active adapter on a frozen nn.Linear or 4-bit base, the forward and
backward run through LoRAFunction instead (lora/function.py, hand-derived backward, fewer passes
over the activations; a 4-bit weight is decoded in forward and again in backward, never saved);
every other case -- several active adapters, a base left trainable, autocast, mixed dtypes --
uses plain autograd on the same expression, the reference LoRAFunction is tested against.

merge() folds s B A into W0 for inference at zero extra latency; unmerge() takes it out again.
Both are explicit calls, never side effects of train() / eval().

DoRA (use_dora=True, lora/dora.py): the adapter also learns a length m per output row, and the
layer computes (m / ||W0 + sBA||) * (W0 + sBA) x + b through DoRAFunction; it needs a float base
weight (for the norms), is never stacked with other adapters, and has no dropout here.

Inside a lora.mixed_adapters block each row of the batch picks its own adapter instead of the
active ones: the layer hands its forward to the RowPlan that block installs (lora/mixed.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_gpt.util.checks import is_number, is_whole_number
from tiny_gpt.util.modules import is_compressed_weight, is_linear_like
from tiny_gpt.util.torch_compat import autocast_enabled

from .dora import DoRAFunction, dora_norm, dora_reference
from .function import LoRAFunction


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


def compressed_weight(base):
    """base.weight if the base stores it compressed -- an object with .dequantize(dtype), as a
    4-bit base's Quantized4bit -- and computes in `base.compute_dtype`; else None."""
    weight = getattr(base, "weight", None)
    return weight if is_compressed_weight(weight) and hasattr(base, "compute_dtype") else None


def float_weight(base):
    """base.weight if it is a float tensor (nn.Linear), else None (e.g. a 4-bit base)."""
    weight = getattr(base, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def check_dora_base(base, dropout, where="this layer"):
    """Raise unless a DoRA adapter can go on `base`: a float weight (for the norms), no dropout."""
    if float_weight(base) is None:
        raise TypeError(f"{where}: DoRA needs a float base weight for its norms; "
                        f"{type(base).__name__} has none (a 4-bit base is not supported with "
                        "DoRA here)")
    if dropout:
        raise ValueError(f"{where}: DoRA adapters take no dropout here, got {dropout!r}")


def check_adapter_name(name):
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


class LoRAAdapter(nn.Module):
    """One named update dW = s B A for a layer mapping in_features -> out_features."""

    def __init__(self, in_features, out_features, r, alpha, dropout=0.0, use_rslora=False,
                 device=None, dtype=None, use_dora=False):
        super().__init__()
        check_lora_args(r, alpha, dropout, in_features, out_features)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.use_dora, self.dora_exact = bool(use_dora), False
        self.merge_norm = None  # DoRA: ||W0 + sBA|| at merge time, for unmerge
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        if use_dora:  # set to ||W0|| row by row by LoRALinear.add_adapter, which has W0
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device,
                                                                 dtype=dtype))

    def delta_weight(self):
        """dW = s B A, (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x):
        """s B A dropout(x) by plain autograd: x (..., in) -> (..., out)."""
        x = F.dropout(x.to(self.lora_A.dtype), self.dropout, self.training)
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def dropout_mask(self, x):
        """(N, in) mask of 0 and 1/(1-p) for LoRAFunction, or None when dropout is off."""
        if not (self.training and self.dropout > 0):
            return None
        keep = 1.0 - self.dropout
        return torch.empty_like(x).bernoulli_(keep).div_(keep)

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, "
                f"dropout={self.dropout}" + (", dora" if self.use_dora else ""))


class LoRALinear(nn.Module):
    """A frozen `base` layer plus named LoRA adapters; see the module docstring.

    base: any module with `in_features`, `out_features` and forward(x (..., in)) -> (..., out).
    r, alpha, dropout, use_rslora: the first adapter, called `adapter_name` and made active.
    `.lora_A` (r, in), `.lora_B` (out, r) and `.scaling` are those of the one active adapter.
    """

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False, adapter_name="default",
                 use_dora=False):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear needs a base with integer in_features and out_features; "
                            f"got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active = []               # names of the adapters used in forward, in order
        self.merged_adapters = None    # names folded into the base weight, or None if unmerged
        self.disabled = False          # set by lora.disable_adapters: forward gives base(x)
        self.row_plan = None           # set by lora.mixed_adapters: each row picks its adapter
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, use_dora)
        self.set_active([adapter_name])

    # --- adapters by name --------------------------------------------------------------
    def add_adapter(self, name, r, alpha, dropout=0.0, use_rslora=False, use_dora=False):
        """Add a new, inactive adapter; its factors live in the base weight's dtype (or fp32).
        A DoRA adapter's magnitudes start at ||W0|| row by row, so the layer is unchanged."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = float_weight(self.base)
        if use_dora:
            check_dora_base(self.base, dropout)
        tensors = [*self.base.parameters(), *self.base.buffers()]
        adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                              device=tensors[0].device if tensors else None,
                              dtype=torch.float32 if weight is None else weight.dtype,
                              use_dora=use_dora)
        if use_dora:
            with torch.no_grad():
                adapter.lora_magnitude_vector.copy_(weight.norm(dim=1))
        self.adapters[name] = adapter

    def delete_adapter(self, name):
        self._check_unmerged(f"delete adapter {name!r}")
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def set_active(self, names):
        self._check_unmerged("change the active adapters")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this layer has {list(self.adapters)}")
        self.active = list(dict.fromkeys(names))

    def _single(self):
        if len(self.active) != 1:
            # not AttributeError: nn.Module.__getattr__ would replace this message with its own
            raise RuntimeError(f"lora_A / lora_B / scaling need exactly one active adapter, "
                               f"active: {self.active}; use .adapters[name] instead")
        return self.adapters[self.active[0]]

    lora_A = property(lambda self: self._single().lora_A)
    lora_B = property(lambda self: self._single().lora_B)
    scaling = property(lambda self: self._single().scaling)

    # --- forward -----------------------------------------------------------------------
    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)  # a merged layer's base weight already holds the updates
        if self.row_plan is not None:
            return self.row_plan(self, x)  # lora/mixed.py: adapter names[b] for row b
        if not self.active:
            return self.base(x)
        adapters = [self.adapters[n] for n in self.active]
        if any(a.use_dora for a in adapters):
            return self._dora_forward(x, adapters)
        if len(adapters) == 1 and self._fast_path_ok(x, adapters[0]):
            return self._fused_forward(x, adapters[0])
        y = self.base(x)
        return y + sum(a(x) for a in adapters).to(y.dtype)  # stacked: the updates add up

    def _fast_path_ok(self, x, adapter):
        """LoRAFunction computes exactly what the plain expression would: the base is frozen,
        one dtype throughout, no autocast, and the base computes y = x W0^T + b with W0 either
        a float tensor (nn.Linear) or compressed (a 4-bit base: see compressed_weight)."""
        base, bias = self.base, getattr(self.base, "bias", None)
        if isinstance(base, nn.Linear):
            dtype, frozen = base.weight.dtype, not base.weight.requires_grad
        elif compressed_weight(base) is not None:
            dtype, frozen = base.compute_dtype, True
        else:
            return False
        return (frozen and (bias is None or (not bias.requires_grad and bias.dtype == dtype))
                and x.dtype == dtype == adapter.lora_A.dtype
                and not (dtype == torch.float16 and x.device.type != "cuda")
                and not autocast_enabled(x.device.type))

    def _fused_forward(self, x, adapter):
        x2 = x.reshape(-1, self.in_features)  # (N, in), N = all leading dims
        weight = self.base.weight  # a float tensor, or a 4-bit base's compressed weight
        y = LoRAFunction.apply(x2, weight, self.base.bias, adapter.lora_A, adapter.lora_B,
                               adapter.scaling, adapter.dropout_mask(x2))
        return y.view(*x.shape[:-1], self.out_features)

    def _dora_forward(self, x, adapters):
        if len(adapters) != 1:
            raise RuntimeError(f"a DoRA adapter cannot be stacked with others; active: "
                               f"{self.active}")
        a, weight, bias = adapters[0], self.base.weight, self.base.bias
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        args = (a.lora_A, a.lora_B, a.lora_magnitude_vector, a.scaling)
        if x.dtype == weight.dtype == a.lora_A.dtype and not autocast_enabled(x.device.type):
            y = DoRAFunction.apply(x2, weight, bias, *args, a.dora_exact)
        else:  # mixed dtypes or autocast: the same formula by autograd, in the adapter's dtype
            cast = a.lora_A.dtype
            y = dora_reference(x2.to(cast), weight.to(cast), None if bias is None else
                               bias.to(cast), *args, a.dora_exact).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    # --- merge / unmerge ---------------------------------------------------------------
    @property
    def merged(self):
        return self.merged_adapters is not None

    def check_can_merge(self, where="this layer"):
        """Raise (changing nothing) unless merge() would succeed."""
        if self.merged:
            raise RuntimeError(f"{where}: already merged ({self.merged_adapters}); call "
                               "unmerge() first")
        if self.row_plan is not None:
            raise RuntimeError(f"{where}: cannot merge inside a mixed_adapters block (its rows "
                               "use different adapters)")
        if len(self.active) > 1 and any(self.adapters[n].use_dora for n in self.active):
            raise RuntimeError(f"{where}: a DoRA adapter merges alone; active: {self.active}")
        self._float_weight("merge")

    def check_can_unmerge(self, where="this layer"):
        """Raise (changing nothing) unless unmerge() would succeed."""
        if not self.merged:
            raise RuntimeError(f"{where}: not merged: there is nothing to unmerge")
        self._float_weight("unmerge")

    def merge(self):
        """W0 <- W0 + sum of s B A over the active adapters, in W0's dtype."""
        self.check_can_merge()
        self._fold(self.active, +1)
        self.merged_adapters = tuple(self.active)

    def unmerge(self):
        """W0 <- W0 - the updates merge() added (equal to the original up to rounding)."""
        self.check_can_unmerge()
        self._fold(self.merged_adapters, -1)
        self.merged_adapters = None

    def _fold(self, names, sign):
        """W0 <- W0 + sign * (sum of s B A over the adapters `names`)."""
        weight = self._float_weight("merge" if sign > 0 else "unmerge")
        with torch.no_grad():
            for name in names:
                adapter = self.adapters[name]
                if adapter.use_dora:
                    _fold_dora(weight, adapter, sign)
                else:
                    weight.add_(adapter.delta_weight().to(weight.dtype), alpha=sign)

    def _float_weight(self, action):
        weight = float_weight(self.base)
        if weight is None:
            raise TypeError(f"cannot {action}: the base {type(self.base).__name__} has no float "
                            ".weight (a 4-bit base keeps the adapter separate; dequantize it "
                            "into an nn.Linear first)")
        return weight

    def _check_unmerged(self, action):
        if self.merged:
            raise RuntimeError(f"cannot {action} while merged; call unmerge() first")

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active}, merged={self.merged}")


def _fold_dora(weight, adapter, sign):
    """merge: W0 <- (m / n) * (W0 + sBA), remembering n = ||W0 + sBA||; unmerge: the inverse,
    W0 <- W' * (n / m) - sBA with the n of the merge (W0 itself is gone by then)."""
    delta = adapter.delta_weight().to(weight.dtype)
    if sign > 0:
        adapter.merge_norm = dora_norm(weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
        weight.add_(delta).mul_((adapter.lora_magnitude_vector / adapter.merge_norm)[:, None])
    else:
        weight.mul_((adapter.merge_norm / adapter.lora_magnitude_vector)[:, None]).sub_(delta)
        adapter.merge_norm = None
