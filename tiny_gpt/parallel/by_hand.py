"""Data parallelism written out by hand: what DistributedDataParallel does, in two functions.

    broadcast_parameters(model)      once, before training: every rank takes rank 0's weights
    (each rank: forward and backward on its own share of the batch)
    all_reduce_gradients(params)     after backward: g <- sum_r g_r on every rank
    (each rank: the same optimizer step on the same gradient, so the weights stay equal)

The gradients are flattened into one bucket first, so the ranks exchange one message instead
of one per tensor (DDP does the same with ~25 MiB buckets, and overlaps them with backward as
each bucket's gradients become ready; this version waits for the whole backward).
train_by_hand puts the two into a training loop, the reference that lesson 13 holds DDP to.
"""
import itertools

import torch
import torch.distributed as dist


def broadcast_parameters(model, src: int = 0) -> None:
    """Every tensor of the model's state (parameters and buffers) set to rank src's values."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):  # unsaved ones too
            dist.broadcast(tensor, src)


def all_reduce_gradients(params, average: bool = False) -> int:
    """Sum the .grad of `params` over the ranks, in one all-reduce (average=True: then divide
    by W, DDP's convention). Summing is right when each rank's loss is already its share of
    the global mean, S_r / N with N counted over all ranks; DDP averages instead, which is why
    its ranks multiply their loss by W (data_parallel.py). A parameter with no gradient on
    this rank counts as zero: every rank must send a bucket of the same layout (so one that no
    rank used ends with a zero gradient, where DDP's find_unused_parameters leaves it None).
    Returns the bytes this rank put into the all-reduce."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("all_reduce_gradients: no parameter requires grad")
    if len({p.dtype for p in params}) > 1:
        raise ValueError(f"all_reduce_gradients: one bucket needs one dtype; the parameters "
                         f"hold {sorted(str(d) for d in {p.dtype for p in params})}")
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    bucket = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(bucket)
    if average:
        bucket /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = bucket[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return bucket.numel() * bucket.element_size()


def train_by_hand(model, batches, cfg, rank: int, world: int, device, broadcast: bool = True):
    """cfg.max_steps optimizer steps of data parallelism by hand; returns
    {name: value} of the trainable weights after them. broadcast=False skips the first
    broadcast: ranks that started from different weights then stay apart. Per step, with
    cfg.grad_accum micro-batches drawn by batches(generator) (the same on every rank) and
    this rank's share of each:

        N = sum over ranks and micro-batches of the loss tokens      (one all-reduce)
        backward of S_r / N on each of this rank's shares             (S_r: summed token loss)
        g <- sum_r g_r                                                (all_reduce_gradients)
        clip, optimizer step                                          (the same on every rank)
    """
    # imported here: tiny_gpt.step and tiny_gpt.train import this package
    from ..step import count_loss_tokens, lr_at, micro_batch_loss, optimizer_step, to_device
    from ..train import make_optimizer, set_lr
    from .data_parallel import rank_share, sum_over_ranks
    if broadcast:
        broadcast_parameters(model)
    optimizer, gen = make_optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.max_steps):
        set_lr(optimizer, lr_at(step, cfg))
        shares = [rank_share(batches(gen), rank, world) for _ in range(cfg.grad_accum)]
        total = sum_over_ranks(count_loss_tokens(shares), device)
        for share in shares:
            micro_batch_loss(model, *to_device(share, device), total).backward()
        all_reduce_gradients(model.parameters())
        optimizer_step(model, optimizer, None, cfg.grad_clip)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
