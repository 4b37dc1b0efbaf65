"""Where the bytes of a training step go, measured from the tensors themselves.

A training step holds four kinds of memory (Rajbhandari et al. 2020, "ZeRO", Sec. 3, splits
them the same way):

    weights       every parameter and buffer: frozen ones (the base) and trainable ones
    gradients     one .grad per trainable parameter, alive from backward to optimizer.step
    optimizer     AdamW keeps exp_avg and exp_avg_sq (2 floats per trainable parameter) and a
                  step counter per tensor; SGD with momentum keeps one buffer per parameter
    activations   the tensors autograd saves in forward to use in backward

The first three are read straight off the model and the optimizer. Activations are invisible
from outside, so we listen in: ``torch.autograd.graph.saved_tensors_hooks`` calls our ``pack``
with every tensor that autograd saves for backward. Several saved tensors can share one storage
(x and its transpose, one input saved by three projections), so each storage is counted once;
tensors that live in a parameter's or buffer's storage are weights, already counted, not
activations. Frozen layers save no input at all (their weight needs no gradient), which is one
reason LoRA's activations are smaller than full fine-tuning's.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..step import autocast_context, count_loss_tokens, micro_batch_loss, to_device

MB = 2 ** 20


def storage_key(t: torch.Tensor):
    """One key per storage: views and aliases of a tensor share it."""
    return (t.device, t.untyped_storage().data_ptr())


def dtype_name(t):
    return str(t.dtype).replace("torch.", "")


def weight_storages(model):
    """Keys of every parameter's and buffer's storage."""
    return {storage_key(t) for t in [*model.parameters(), *model.buffers()]}


class SavedTensorMeter:
    """Context manager: counts the bytes of the storages that autograd saves for backward,
    each storage once, skipping the model's own weights.

    ``then``: an optional (pack, unpack) pair to chain (e.g. FrozenBaseOffload's); a saved
    tensor that it packs into something other than a tensor is not held, so not counted."""

    def __init__(self, model, then=None):
        self.weights = weight_storages(model)
        self.then = then
        self.storages = {}  # key -> (bytes, dtype name)

    def pack(self, t):
        held = self.then[0](t) if self.then else t
        if isinstance(held, torch.Tensor):
            key = storage_key(held)
            if key not in self.weights:
                self.storages[key] = (held.untyped_storage().nbytes(), dtype_name(held))
        return held

    def unpack(self, packed):
        return self.then[1](packed) if self.then else packed

    @property
    def bytes(self):
        return sum(n for n, _ in self.storages.values())

    def by_dtype(self):
        out = {}
        for n, dtype in self.storages.values():
            out[dtype] = out.get(dtype, 0) + n
        return out

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def tensor_bytes(tensors):
    """Bytes of distinct storages among tensors."""
    seen = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


@dataclass
class Ledger:
    """Bytes held by one training step, by kind (see the module docstring)."""
    frozen: int = 0                    # parameters and buffers that get no gradient
    trainable: int = 0                 # parameters that do
    by_dtype: dict = field(default_factory=dict)  # weight bytes per dtype name
    grads: int = 0                     # .grad tensors after backward
    optimizer: int = 0                 # optimizer.state tensors after one step
    activations: int = 0               # saved for backward (peak over micro-batches)
    activations_by_dtype: dict = field(default_factory=dict)  # of that peak micro-batch
    device_peak: Optional[int] = None  # torch.cuda.max_memory_allocated over the step (CUDA)

    @property
    def weights(self):
        return self.frozen + self.trainable

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + self.activations

    def megabytes(self):
        """The main fields in MiB, for tables."""
        names = ["frozen", "trainable", "grads", "optimizer", "activations", "total"]
        return {n: getattr(self, n) / MB for n in names}


def weight_ledger(model) -> Ledger:
    """Frozen / trainable / per-dtype bytes of the model's parameters and buffers."""
    ledger, seen = Ledger(), set()
    for t in [*model.parameters(), *model.buffers()]:
        key = storage_key(t)
        if key in seen:  # a tied weight is one tensor, stored once
            continue
        seen.add(key)
        n = t.untyped_storage().nbytes()
        if t.requires_grad:
            ledger.trainable += n
        else:
            ledger.frozen += n
        ledger.by_dtype[dtype_name(t)] = ledger.by_dtype.get(dtype_name(t), 0) + n
    return ledger


def measure_step(model, micro_batches, optimizer, precision="fp32", hooks=None,
                 loss_fn=micro_batch_loss) -> Ledger:
    """Run one training step over micro_batches [(x, y, mask or None), ...] on the model's
    device and fill a Ledger. Activations: the largest saved-tensor total of one micro-batch
    (each micro-batch's are freed by its backward before the next forward). hooks: a
    (pack, unpack) pair for SavedTensorMeter to chain. loss_fn(model, x, y, mask, total)."""
    device = next(model.parameters()).device
    total = count_loss_tokens(micro_batches)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ledger = weight_ledger(model)
    optimizer.zero_grad(set_to_none=True)
    for batch in micro_batches:
        x, y, mask = to_device(batch, device)
        with SavedTensorMeter(model, then=hooks) as meter, autocast_context(device, precision):
            loss = loss_fn(model, x, y, mask, total)
        if meter.bytes >= ledger.activations:
            ledger.activations, ledger.activations_by_dtype = meter.bytes, meter.by_dtype()
        loss.backward()
    ledger.grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    ledger.optimizer = tensor_bytes(optimizer_state_tensors(optimizer))
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        ledger.device_peak = torch.cuda.max_memory_allocated(device)
    return ledger
