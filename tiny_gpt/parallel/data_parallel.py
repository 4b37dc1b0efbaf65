"""Data parallelism with torch's DistributedDataParallel: what each rank sees, and how the loss
must be normalized so that W ranks compute the gradient of one process with the whole batch.

Each optimizer step draws one global batch (every rank draws the same one, from generators
seeded alike) and rank r keeps its own contiguous slice of the rows: the shares are disjoint
and together they are the batch. DDP then sums the ranks' gradients and divides by W.

The normalization. The one-process loss of a step is  L = S / N,  S the summed token loss and
N the loss tokens of the whole batch. Rank r holds S_r and N_r with  sum_r S_r = S,
sum_r N_r = N. If each rank uses its own mean S_r / N_r, DDP's average gives
(1/W) sum_r S_r / N_r, which is L only when every N_r = N / W -- answers differ in length, so
they are not. The right per-rank loss is  W * S_r / N,  with N summed over ranks (one
all-reduce of a count): DDP's (1/W) sum_r W S_r / N = S / N. With gradient accumulation N
also sums over the micro-batches, exactly as in tiny_gpt/train.py, and DDP's all-reduce is
held back (``no_sync``) until the last micro-batch, so each step all-reduces once.

The equality holds (up to the order of float sums) without dropout. With dropout, train()
seeds torch's global generator alike on every rank, so row b of every rank draws the mask that
row b of rank 0 draws, where one process would draw a fresh mask for every row of the batch.
"""
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..util.checks import is_whole_number


def ddp_of(model):
    """The DistributedDataParallel wrapper of `model`, looking through torch.compile's
    OptimizedModule (TrainConfig.compile), or None when the model is not data parallel."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DistributedDataParallel) else None


def is_data_parallel(model) -> bool:
    return ddp_of(model) is not None


def world_size(model) -> int:
    """W: the ranks DDP averages over (1 for a model that is not wrapped)."""
    ddp = ddp_of(model)
    return 1 if ddp is None else dist.get_world_size(ddp.process_group)


def sum_over_ranks(value: float, device="cpu", group=None) -> float:
    """The sum of `value` over the ranks of `group` (default: all), in one all-reduce of a
    number; nccl reduces CUDA tensors only, hence the device."""
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    return total.item()


def global_sum(value: float, model) -> float:
    """The sum of `value` over the ranks of a DDP model (the value itself otherwise)."""
    ddp = ddp_of(model)
    if ddp is None:
        return value
    return sum_over_ranks(value, next(ddp.parameters()).device, ddp.process_group)


def sync_unless_last(model, is_last: bool):
    """DDP's no_sync() for every micro-batch but the step's last: the gradients accumulate
    locally and the last backward all-reduces their sum once."""
    ddp = ddp_of(model)
    return ddp.no_sync() if ddp is not None and not is_last else nullcontext()


def rank_share(tensors, rank: int, world: int):
    """Rank `rank`'s rows of a batch (x, y, mask...): contiguous, disjoint, covering it all.
    (B, ...) -> (B_r, ...) with the B_r differing by at most one."""
    check_rank(rank, world)
    batch_rows = next(t for t in tensors if t is not None).shape[0]
    if batch_rows < world:
        raise ValueError(f"a batch of {batch_rows} rows cannot give each of {world} ranks a row")
    return tuple(None if t is None else t.tensor_split(world)[rank] for t in tensors)


def sharded_batches(get_batch, rank: int, world: int):
    """get_batch(generator) -> the whole batch, turned into one that returns this rank's
    share of it (the generator advances the same way on every rank)."""
    check_rank(rank, world)
    return lambda generator: rank_share(get_batch(generator), rank, world)


def check_rank(rank, world):
    if not (is_whole_number(world, 1) and is_whole_number(rank) and rank < world):
        raise ValueError(f"rank must be a whole number in [0, world) with world >= 1; got "
                         f"rank {rank!r}, world {world!r}")
