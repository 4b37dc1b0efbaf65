"""Probing one backward pass: the gradients it leaves, how they compare, what it warned about.

A memory recipe (checkpointing, accumulation, offload) must leave the same gradients as the plain
step; lesson 07 and ``python -m lessons.gpu_check`` hold each recipe to that with these:

- ``fresh_gradients``: one accumulated backward from zeroed gradients -> the loss and a copy of
  every trainable parameter's gradient, the model's gradients left cleared;
- ``max_abs_diff`` / ``max_rel_diff``: the largest element-wise gap between two such sets,
  absolute or relative to each reference tensor's largest element;
- ``backward_outcome``: one plain backward, with the warnings it raised and the error it hit;
- ``grad_norm``: how many of a list of parameters got no gradient, and the norm of the rest;
- ``block_saved_bytes``: what one transformer block saves for backward, the part that a
  checkpointed step rebuilds one block at a time;
- ``idle_sgd``: SGD at lr 0 (AdamW's is step_time.idle_adamw), for steps that must not move.
"""
import math
import warnings

import torch

from ..step import accumulate_gradients
from .ledger import SavedTensorMeter


def fresh_gradients(model, micro_batches, device, precision="fp32"):
    """Zero the gradients, accumulate one step's over ``micro_batches`` -> (mean token loss,
    {name: gradient copy} for every parameter that requires grad and got one), then clear them
    again. A parameter left without gradient is missing from the dict, so comparing it with a
    step that gave it one (max_abs_diff) is an error, not a silent match.

    Names drop wrapper modules (".module." -> "."), so that a checkpointed or offloaded model's
    gradients line up with the plain model's by name."""
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(model, micro_batches, device, precision)
    grads = {n.replace(".module.", "."): p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


def max_abs_diff(a, b):
    """max over names n and elements of |a[n] - b[n]|, for two {name: tensor} of the same names."""
    if a.keys() != b.keys():
        raise ValueError(f"the two sets of gradients name different tensors: only in the first "
                         f"{sorted(a.keys() - b.keys())}, only in the second "
                         f"{sorted(b.keys() - a.keys())}")
    return max((a[n] - b[n]).abs().max().item() for n in a)


def max_rel_diff(a, b):
    """max over names n of max|a[n] - b[n]| / max|b[n]|: each tensor's largest gap relative to
    the reference b's largest element, for two {name: tensor} of the same names. An all-zero
    reference (LoRA's A before B has moved) counts 0 if a[n] is zero too, else inf -- never
    the nan of 0 / 0, which max() would skip or keep depending on the order."""
    max_abs_diff(a, b)  # refuses two sets that name different tensors

    def gap(n):
        diff, scale = (a[n] - b[n]).abs().max().item(), b[n].abs().max().item()
        return diff / scale if scale else (0.0 if diff == 0 else math.inf)
    return max(gap(n) for n in b)


def backward_outcome(model, x, y):
    """loss.backward() of model(x, y) -> (warnings it raised, the first line of the
    RuntimeError it hit or None). A backward that cannot start (a loss without grad_fn) is an
    error; one that silently skips parameters shows only in the warnings and the gradients."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model(x, y)[1].backward()
        except RuntimeError as err:
            return caught, str(err).splitlines()[0]
    return caught, None


def grad_norm(params):
    """-> (how many of params have no .grad, sqrt(sum of |grad|^2) over those that have one)."""
    grads = [p.grad for p in params]
    norm = sum(0.0 if g is None else g.norm().item() ** 2 for g in grads) ** 0.5
    return sum(g is None for g in grads), norm


def idle_sgd(model, momentum=0.9):
    """SGD with momentum over the trainable parameters at lr 0, beside step_time.idle_adamw:
    every step does the full work (momentum buffers included) and the weights stay put, so the
    gradients of later steps can still be compared."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0,
                           momentum=momentum)


def block_saved_bytes(model, x):
    """Bytes of the tensors the first block saves for backward, fed the embedded tokens x
    (batch, time): the activations a checkpointed block rebuilds during backward."""
    h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1], device=x.device))  # (B, T, C)
    with SavedTensorMeter(model) as meter:
        model.blocks[0](h)
    return meter.bytes
