"""Data parallelism on torch.distributed: starting the processes, sharding the batches, counting
what goes over the wire, and the same thing written out by hand (see lesson 13)."""
from .by_hand import all_reduce_gradients, broadcast_parameters, train_by_hand
from .comm_count import AllReduceCounter, count_broadcast_bytes
from .data_parallel import (global_sum, is_data_parallel, rank_share, sharded_batches,
                            sum_over_ranks, sync_unless_last, world_size)
from .launch import (backend_for, gather_over_ranks, launched_by_torchrun,
                     process_group_from_env, rank_device, run_like_torchrun, spawn)

__all__ = ["AllReduceCounter", "all_reduce_gradients", "backend_for", "broadcast_parameters",
           "count_broadcast_bytes", "gather_over_ranks", "global_sum", "is_data_parallel",
           "launched_by_torchrun", "process_group_from_env", "rank_device", "rank_share",
           "run_like_torchrun", "sharded_batches", "spawn", "sum_over_ranks", "sync_unless_last",
           "train_by_hand", "world_size"]
