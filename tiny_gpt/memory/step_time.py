"""How long the phases of one training step take: forward, backward and the optimizer.

The price of a memory saving is paid in time (a checkpointed block runs its forward twice), so
lesson 07 prints the phases next to the ledger's bytes (ledger.py). On CUDA every phase ends
with a synchronize: kernels run asynchronously, and without it the clock would stop when the
last kernel is *launched*, not when it finishes.
"""
import time

from ..step import autocast_context, count_loss_tokens, micro_batch_loss, to_device
import torch

from ..util.timing import round_robin_times, synchronize


def time_step(model, micro_batches, optimizer, precision="fp32",
              loss_fn=micro_batch_loss) -> dict:
    """Seconds of one training step: {"forward", "backward", "optimizer", "total"} (each phase
    synchronized on CUDA; forward and backward summed over the micro-batches)."""
    device = next(model.parameters()).device
    total = count_loss_tokens(micro_batches)
    phases = {"forward": 0.0, "backward": 0.0}
    for batch in micro_batches:
        x, y, mask = to_device(batch, device)
        synchronize()
        t0 = time.perf_counter()
        with autocast_context(device, precision):
            loss = loss_fn(model, x, y, mask, total)
        synchronize()
        t1 = time.perf_counter()
        loss.backward()
        synchronize()
        phases["forward"] += t1 - t0
        phases["backward"] += time.perf_counter() - t1
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize()
    phases["optimizer"] = time.perf_counter() - t2
    phases["total"] = sum(phases.values())
    return phases


def idle_adamw(model):
    """AdamW over the trainable parameters at lr 0: every step does the full work, and the
    weights stay put, so the steps timed in turn stay comparable."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)


def step_times(steps, repeats, warmup=1):
    """{name: [seconds of each round]} for time_step calls taking turns (their "total"):
    steps {name: () -> time_step(...)}, tiny_gpt/util/timing.round_robin_times."""
    return round_robin_times(steps, repeats, warmup=warmup, measure=lambda step: step()["total"])
