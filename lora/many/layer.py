"""MultiLoRALinear: a frozen linear layer with several named adapters, some of them active.

The one-adapter LoRALinear (lora/layer.py) is the idea; this is the same layer when it carries
many updates, each a LoRAAdapter with its own r, alpha, scaling and dropout:

    y = base(x) + sum over the active adapters i of s_i B_i A_i dropout_i(x)     ("stacking")

It is a LoRALinear (a subclass with the same interface: lora_A, lora_B, scaling are those of
the one active adapter; merge, unmerge, delta_weight over the active ones), so lora_layers,
merge_lora and the rest of the reading path find it as they find any LoRALinear.
`to_many(layer)` turns a one-adapter LoRALinear into one, its adapter called "default" and
holding the same tensors (an optimizer that has them keeps training them).

Inside a lora.mixed_adapters block each row of the batch picks its own adapter instead of the
active ones: the layer hands its forward to the RowPlan that block installs (many/mixed.py).
A DoRA adapter (use_dora) runs through lora/variants/dora.py, alone.
"""
import math

import torch
import torch.nn as nn

from tiny_gpt.util.modules import factory_kind, float_weight

from ..layer import LoRALinear, check_lora_args, lora_scaling, lora_update
from ..variants.dora import check_dora_base, dora_forward, fold_dora


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
        if use_dora:  # set to ||W0|| row by row by MultiLoRALinear.add_adapter, which has W0
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device,
                                                                 dtype=dtype))

    delta_weight = LoRALinear.delta_weight
    dropout_mask = LoRALinear.dropout_mask

    def forward(self, x):
        """s B A dropout(x) by plain autograd: x (..., in) -> (..., out)."""
        return lora_update(x, self.lora_A, self.lora_B, self.scaling, self.dropout,
                           self.training)

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, "
                f"dropout={self.dropout}" + (", dora" if self.use_dora else ""))


def adapter_of(layer):
    """A LoRAAdapter holding `layer`'s own tensors (the same Parameter objects)."""
    use_dora = getattr(layer, "use_dora", False)
    adapter = LoRAAdapter(layer.in_features, layer.out_features, layer.r, layer.alpha,
                          layer.dropout, layer.use_rslora, device="meta", use_dora=use_dora)
    adapter.lora_A, adapter.lora_B = layer.lora_A, layer.lora_B
    if use_dora:
        adapter.lora_magnitude_vector = layer.lora_magnitude_vector
        adapter.dora_exact, adapter.merge_norm = layer.dora_exact, layer.merge_norm
    return adapter


class MultiLoRALinear(LoRALinear):
    """A frozen `base` plus named LoRA adapters; see the module docstring. Build it with
    to_many(layer); add more with add_adapter(name, ...)."""

    def __init__(self, layer, name="default"):
        nn.Module.__init__(self)  # not LoRALinear's: the factors come from `layer`
        self.base = layer.base
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.adapters = nn.ModuleDict({name: adapter_of(layer)})
        self.active = [name]           # names of the adapters used in forward, in order
        self.merged_adapters = (name,) if layer.merged else None  # folded into W0, or None
        self.disabled = layer.disabled
        self.row_plan = None           # set by lora.mixed_adapters: each row picks its adapter

    # --- adapters by name --------------------------------------------------------------
    def add_adapter(self, name, r, alpha, dropout=0.0, use_rslora=False, use_dora=False):
        """Add a new, inactive adapter; its factors live in the base weight's dtype (or fp32).
        A DoRA adapter's magnitudes start at ||W0|| row by row, so the layer is unchanged."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if use_dora:
            check_dora_base(self.base, dropout)
        adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                              **factory_kind(self.base), use_dora=use_dora)
        if use_dora:
            with torch.no_grad():
                adapter.lora_magnitude_vector.copy_(float_weight(self.base).norm(dim=1))
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
    r = property(lambda self: self._single().r)
    alpha = property(lambda self: self._single().alpha)
    dropout = property(lambda self: self._single().dropout)
    use_rslora = property(lambda self: self._single().use_rslora)

    # --- forward -----------------------------------------------------------------------
    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)  # a merged layer's base weight already holds the updates
        if self.row_plan is not None:
            return self.row_plan(self, x)  # many/mixed.py: adapter names[b] for row b
        if not self.active:
            return self.base(x)
        adapters = [self.adapters[n] for n in self.active]
        if any(a.use_dora for a in adapters):
            if len(adapters) != 1:
                raise RuntimeError(f"a DoRA adapter cannot be stacked with others; active: "
                                   f"{self.active}")
            return dora_forward(self.base, adapters[0], x)
        if len(adapters) == 1:  # lora_A, lora_B, scaling, dropout are the active adapter's
            return LoRALinear.forward(self, x)
        y = self.base(x)
        return y + sum(a(x) for a in adapters).to(y.dtype)  # stacked: the updates add up

    # --- merge / unmerge ---------------------------------------------------------------
    @property
    def merged(self):
        return self.merged_adapters is not None

    def delta_weight(self):
        """The sum of s B A over the active adapters, (out, in)."""
        deltas = [self.adapters[n].delta_weight() for n in self.active]
        if not deltas:
            return next(iter(self.adapters.values())).lora_A.new_zeros(self.out_features,
                                                                         self.in_features)
        return torch.stack(deltas).sum(0)

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
                    fold_dora(weight, adapter, sign)
                else:
                    weight.add_(adapter.delta_weight().to(weight.dtype), alpha=sign)

    def _check_unmerged(self, action):
        if self.merged:
            raise RuntimeError(f"cannot {action} while merged; call unmerge() first")

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active}, merged={self.merged}")


def to_many(layer, name="default"):
    """`layer` as a MultiLoRALinear: itself if it is one, else a new one holding its base and
    its adapter (called `name`, the same tensors)."""
    return layer if isinstance(layer, MultiLoRALinear) else MultiLoRALinear(layer, name)
