"""Measuring a data-parallel run against one process: how far apart two sets of weights or
gradients are, whether the ranks agree, and what each rank holds and sends (lesson 13).

Imported as ``tiny_gpt.parallel.measure``, not from the package: it uses tiny_gpt.step, which
itself imports this package.
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..step import accumulate_gradients, count_loss_tokens, micro_batch_loss, to_device
from .comm_count import AllReduceCounter, count_broadcast_bytes
from .data_parallel import sync_unless_last


def wrap_ddp(model, device, **options) -> DistributedDataParallel:
    """DDP around `model` on `device`: a CUDA module names its device, a CPU module none."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **options)


def trainable_values(model) -> dict:
    """{name: a copy of the value} of every parameter that requires grad, the name as in the
    unwrapped model (DDP's "module." prefix dropped)."""
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


def trainable_grads(model) -> dict:
    """{name: a copy of .grad} of every parameter that requires grad (DDP's prefix dropped);
    an FSDP-sharded gradient (a DTensor) is gathered whole first."""
    return {n.removeprefix("module."): getattr(p.grad, "full_tensor", p.grad.clone)()
            for n, p in model.named_parameters() if p.requires_grad}


def rel_gap(a: dict, b: dict) -> float:
    """How far `a` is from the reference `b`, two {name: tensor} dicts with b's names:

        max_k max |a_k - b_k|  /  max_k max |b_k|

    one scale for all the tensors (the largest reference value), so a tensor that is near
    zero everywhere does not blow up the ratio."""
    largest = max(b[k].abs().max().item() for k in b)
    return max((a[k] - b[k]).abs().max().item() for k in b) / largest


def coordinate_gap(a: dict, b: dict, eps: float = 1e-8) -> float:
    """The gap coordinate by coordinate, each against its own size:

        max over coordinates i with |b_i| > eps of  |a_i - b_i| / |b_i|

    the error that Adam carries into its update, since it divides each coordinate by its own
    running size. Coordinates with |b_i| <= eps (AdamW's eps) are left out: B = 0 at step 0
    makes dL/dA exactly 0 in both runs."""
    diff = torch.cat([(a[k] - b[k]).reshape(-1) for k in b]).abs()
    size = torch.cat([b[k].reshape(-1) for k in b]).abs()
    return (diff / size)[size > eps].max().item()


def rank_spread(tensors: dict) -> float:
    """max |this rank's values - rank 0's| over every rank and coordinate: 0.0 exactly when all
    ranks hold the same values. Every rank must call it (a broadcast and an all-reduce)."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    rank0 = flat.clone()
    dist.broadcast(rank0, 0)
    gap = torch.tensor([(flat - rank0).abs().max().item()], device=flat.device)  # nccl: CUDA
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def state_bytes(model) -> int:
    """Bytes this rank holds of the model's parameters (only its shards, under FSDP: a sharded
    parameter's .to_local()) and buffers."""
    local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local + list(model.buffers()))


def own_mean_gradients(model, shares, device) -> dict:
    """The gradients when each rank uses its own mean S_r / N_r and DDP averages them -- what
    an unmodified training loop would do, wrong when the ranks hold unequal loss tokens
    (data_parallel.py): (1/W) sum_r S_r / N_r  !=  S / N."""
    own_tokens = count_loss_tokens(shares)
    for i, share in enumerate(shares):
        with sync_unless_last(model, i == len(shares) - 1):
            micro_batch_loss(model, *to_device(share, device), own_tokens).backward()
    return trainable_grads(model)


def wire_bytes(model, shares, device, **options) -> dict:
    """What one rank sends when `model` is wrapped in DDP (with `options`) and takes one step
    on `shares` (its micro-batches), each count beside the formula it should equal:
      "wrap":      bytes broadcast at wrapping; "wrap_formula": parameters + buffers, in bytes
      "allreduce": bytes all-reduced in the step; "allreduce_formula": 4 x trainable (fp32)
      "buffers":   bytes broadcast during the step (the buffers, before the forward)"""
    with count_broadcast_bytes() as at_wrap:
        ddp = wrap_ddp(model, device, **options)
    counter = AllReduceCounter()
    ddp.register_comm_hook(None, counter.hook)
    with count_broadcast_bytes() as per_step:
        accumulate_gradients(ddp, shares, device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"wrap": at_wrap["bytes"], "wrap_formula": state_bytes(model),
            "allreduce": counter.bytes, "allreduce_formula": 4 * n_trainable,
            "buffers": per_step["bytes"]}


def ddp_outcome(model, shares, device, reference_grads=None, steps=2, **options) -> str:
    """What `steps` steps of gradient code on `shares` do under DDP(model, **options): the
    first line of the RuntimeError when DDP refuses (at wrapping or in a step); else "ran", or
    with `reference_grads` (one process's {name: grad}) "gradient gap <rel_gap>" of the last
    step's gradients."""
    try:
        ddp = wrap_ddp(model, device, **options)
        for _ in range(steps):
            ddp.zero_grad(set_to_none=True)
            accumulate_gradients(ddp, shares, device)
    except RuntimeError as error:
        return "error: " + str(error).strip().splitlines()[0][:110]
    if reference_grads is None:
        return "ran"
    return f"gradient gap {rel_gap(trainable_grads(ddp), reference_grads):.1e}"
