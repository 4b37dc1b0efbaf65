"""Counting the bytes that data parallelism sends.

Per step, DDP all-reduces the gradients of the parameters that require grad, in buckets of
about 25 MiB; a communication hook is handed each bucket, so it can count the bucket's bytes
before doing what DDP would have done (sum over ranks, divide by W). Under LoRA only the
adapters' gradients travel: 4 bytes x (trainable parameters) per step, per rank, against 4 x
(all parameters) for full fine-tuning.

Once, at wrapping, DDP broadcasts rank 0's parameters *and buffers* so that every rank starts
from the same weights -- the whole model, frozen part included. With broadcast_buffers=True
(the default) it broadcasts the buffers again before every forward: for a 4-bit base, whose
codes and scales are buffers, that is the base re-sent every step. Both go through
torch.distributed._broadcast_coalesced, which count_broadcast_bytes watches.
"""
from contextlib import contextmanager

import torch.distributed as dist


class AllReduceCounter:
    """``ddp.register_comm_hook(None, counter.hook)``; .bytes and .buckets grow per bucket."""

    def __init__(self):
        self.bytes = 0
        self.buckets = 0

    def hook(self, process_group, bucket):
        buffer = bucket.buffer()  # the bucket's gradients, flattened into one tensor
        self.bytes += buffer.numel() * buffer.element_size()
        self.buckets += 1
        # imported here: torch builds without distributed support lack the module
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return allreduce_hook(process_group, bucket)


@contextmanager
def count_broadcast_bytes():
    """``with count_broadcast_bytes() as sent:`` ... ``sent["bytes"]``: the bytes DDP
    broadcast from rank 0 inside the block (module states at wrapping, buffers per forward)."""
    sent = {"bytes": 0, "calls": 0}
    original = dist._broadcast_coalesced

    def counting(process_group, tensors, buffer_size, src=0):
        sent["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        sent["calls"] += 1
        return original(process_group, tensors, buffer_size, src)

    dist._broadcast_coalesced = counting
    try:
        yield sent
    finally:
        dist._broadcast_coalesced = original
