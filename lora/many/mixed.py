"""Per-row adapters: one batch in which row b uses adapter names[b], or the base model for None.

    with mixed_adapters(model, ["upper", None, "swap", "upper"]):
        logits, _ = model(idx)                 # idx (4, T): row 1 sees the base model alone

On entering, every LoRA layer (made a MultiLoRALinear, many/layer.py) gets a RowPlan: the
adapters in play on that layer, each in a slot, one more slot of zeros for the rows that want no adapter there (the base rows, and rows
whose adapter does not sit on this layer: they see the base layer, as set_active_adapters would
give them), and `rows` (N,), each row's slot. The layer's forward then calls the plan:

    y = base(x) + MixedLoRAFunction(x, A (n, R, in), B (n, out, R), s (n,), rows)

so the base layer runs once for the whole batch and the low-rank terms are two batched matmuls
(lora/mixed_function.py, with its hand-derived backward). The stacks are built from the
adapters' parameters at every call, by torch.stack, so gradients reach each adapter's own
lora_A and lora_B and an optimizer step is seen at the next call: one batch can train several
adapters at once, each from its own rows only.

way="grouped" is PEFT's mixed batch instead (`_mixed_batch_forward` in peft's LoRA layer): the
base once, then a loop over the adapters, each running its own rows' sub-batch. Same numbers, one
pair of small matmuls (and a gather and a scatter) per adapter per layer; the lesson measures it.

Inside the block the active adapters are not used (each row says what it wants). Bad names, a
merged layer or a nested block are refused before any layer changes; on leaving, even by an
exception, every layer is back as it was.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tiny_gpt.util.torch_compat import autocast_enabled

from ..inject import adapter_names, lora_layers, named_adapters
from .mixed_function import MixedLoRAFunction, mixed_delta_autograd
from .multi import as_many

WAYS = ("gathered", "grouped")


class RowPlan:
    """Which adapter each row of the batch uses on one layer; called by LoRALinear.forward."""

    def __init__(self, layer, names, way, device):
        self.names = tuple(n for n in dict.fromkeys(names) if n in layer.adapters)
        slot = {name: j for j, name in enumerate(self.names)}
        base_slot = len(self.names)  # the zero slot, stacked only when some row needs it
        self.n_rows, self.way = len(names), way
        self.needs_base_slot = any(n not in slot for n in names)
        self.rows = torch.tensor([slot.get(n, base_slot) for n in names], device=device)
        self.groups = {name: torch.tensor([b for b, n in enumerate(names) if n == name],
                                          device=device) for name in self.names}

    def __call__(self, layer, x):
        if x.shape[0] != self.n_rows:
            raise ValueError(f"mixed_adapters was given {self.n_rows} names, one per row, but "
                             f"the batch has {x.shape[0]} rows")
        y = layer.base(x)
        if not self.names:
            return y
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])                # (N, T, in)
        adapters = [layer.adapters[n] for n in self.names]
        delta = (self._grouped(x3, adapters) if self.way == "grouped"
                 else self._gathered(x3, adapters, layer.training))
        return y + delta.reshape(y.shape).to(y.dtype)

    def _gathered(self, x, adapters, training):
        A, B, scalings = stacked_factors(adapters, self.needs_base_slot)
        x = x.to(A.dtype)
        mask = self._dropout_mask(x, adapters) if training else None
        if autocast_enabled(x.device.type):
            return mixed_delta_autograd(x, A, B, scalings, self.rows, mask)
        return MixedLoRAFunction.apply(x, A, B, scalings, self.rows, mask)

    def _dropout_mask(self, x, adapters):
        """(N, T, in): 0 or 1/(1 - p) with each row's own adapter's p; None when all p are 0."""
        p = [a.dropout for a in adapters] + [0.0] * self.needs_base_slot
        if not any(p):
            return None
        keep = (1.0 - torch.tensor(p, dtype=x.dtype, device=x.device))[self.rows]  # (N,)
        keep = keep[:, None, None].expand_as(x)
        return torch.bernoulli(keep) / keep

    def _grouped(self, x, adapters):
        delta = x.new_zeros((*x.shape[:2], adapters[0].lora_B.shape[0]),
                            dtype=adapters[0].lora_A.dtype)        # (N, T, out)
        for name, adapter in zip(self.names, adapters):
            rows = self.groups[name]
            delta = delta.index_add(0, rows, adapter(x.index_select(0, rows)))
        return delta


def stacked_factors(adapters, base_slot=False):
    """The adapters' factors padded to the largest rank R and stacked: A (n, R, in),
    B (n, out, R), scalings (n,); base_slot adds one slot of zeros (scaling 0) at the end."""
    R = max(a.r for a in adapters)
    As = [F.pad(a.lora_A, (0, 0, 0, R - a.r)) if a.r < R else a.lora_A for a in adapters]
    Bs = [F.pad(a.lora_B, (0, R - a.r)) if a.r < R else a.lora_B for a in adapters]
    scalings = [a.scaling for a in adapters]
    if base_slot:
        As.append(As[0].new_zeros(As[0].shape))
        Bs.append(Bs[0].new_zeros(Bs[0].shape))
        scalings.append(0.0)
    A, B = torch.stack(As), torch.stack(Bs)
    return A, B, torch.tensor(scalings, dtype=A.dtype, device=A.device)


def check_row_names(model, names, way="gathered"):
    """Raise ValueError unless names is a non-empty list of known adapter names or None."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"names must be a non-empty list with one adapter name (or None for "
                         f"the base) per row, got {names!r}")
    known = adapter_names(model)
    unknown = sorted({repr(n) for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapters {', '.join(unknown)}; the model has {known} "
                         "(or None for the base)")


@contextmanager
def mixed_adapters(model, names, way="gathered"):
    """Inside the block, row b of every batch uses adapter names[b] (None: the base model).
    way: "gathered" (one batched matmul for all rows) or "grouped" (a loop over adapters)."""
    check_row_names(model, names, way)
    named = lora_layers(model)
    layers = [layer for _, layer in named]
    merged = [path for path, layer in named if layer.merged]
    if merged:
        raise RuntimeError(f"cannot mix adapters per row: {merged} are merged (one weight for "
                           "every row); call unmerge_lora first")
    dora = sorted({n for layer in layers for n in names if n in named_adapters(layer)
                   and getattr(named_adapters(layer)[n], "use_dora", False)})
    if dora:
        raise ValueError(f"DoRA adapters {dora} rescale W0 itself, per adapter: they cannot "
                         "share a base matmul with other rows")
    if any(getattr(layer, "row_plan", None) is not None for layer in layers):
        raise RuntimeError("mixed_adapters blocks do not nest: leave the outer one first")
    layers = [layer for _, layer in as_many(model)]  # each row plan needs named adapters
    device = next(model.parameters()).device
    plans = [RowPlan(layer, list(names), way, device) for layer in layers]
    try:
        for layer, plan in zip(layers, plans):
            layer.row_plan = plan
        yield model
    finally:
        for layer in layers:
            layer.row_plan = None
