"""What every rank of lesson 13 runs: the experiments of data-parallel LoRA and QLoRA.

Lesson 13 (lessons/13_data_parallel.py) starts WORLD processes; each calls rank_main, which runs
the sections below on its own share of every batch and returns what it measured, a dict per
section; rank 0 gathers them all and prints the lesson. Each function here is one experiment,
lettered as in the lesson's docstring:

    (a) same_gradient, same_weights   2 ranks against one process with the whole batch
    (b) wire_section                  the bytes DDP sends, per model
    (c) unused_adapter, checkpointing, save_on_rank0, seeds_section   the pitfalls
    (d) qlora_ddp, qlora_fsdp         the 4-bit base replicated, then sharded

Every function runs on every rank at once: the collectives inside (DDP's all-reduce, barriers,
sum_over_ranks) wait for all of them, so no rank may skip a section.
"""
import copy
import itertools
import warnings

import torch
import torch.distributed as dist

from lessons.common import get_base_model, lora_copy
from lessons.recipe import TASK_BATCH, short_config, task_splits
from lora import add_adapter, load_adapter, save_adapter, train_only_adapter
from quant.sharding import fully_shard_4bit
from tiny_gpt import sample_batch
from tiny_gpt.memory.checkpointing import enable_input_require_grads
from tiny_gpt.parallel import rank_share, sharded_batches, sum_over_ranks, train_by_hand
from tiny_gpt.parallel.measure import (coordinate_gap, ddp_outcome, own_mean_gradients,
                                       rank_spread, rel_gap, state_bytes, trainable_grads,
                                       trainable_values, wire_bytes, wrap_ddp)
from tiny_gpt.util.timing import round_robin_medians
from tiny_gpt.util.torch_compat import fully_shard_function, no_buffer_sync
from tiny_gpt.train import train
from tiny_gpt.step import accumulate_gradients, count_loss_tokens, micro_batch_loss, to_device

WORLD = 2                   # processes
ACCUM = 2                   # micro-batches per step, each split across the ranks


# --- (a) the same gradient, and the same weights, as one process --------------------------

def micro_batches(splits, gen, n):
    return [sample_batch(splits["train"], TASK_BATCH // ACCUM, gen) for _ in range(n)]


def same_gradient(rank, base, splits, device):
    micro = micro_batches(splits, torch.Generator().manual_seed(1), ACCUM)
    shares = [rank_share(b, rank, WORLD) for b in micro]
    reference = lora_copy(base, seed=0)
    accumulate_gradients(reference, micro, device)
    model = wrap_ddp(lora_copy(base, seed=0), device)
    accumulate_gradients(model, shares, device)
    right = rel_gap(trainable_grads(model), trainable_grads(reference))
    own_size = coordinate_gap(trainable_grads(model), trainable_grads(reference))
    model.zero_grad(set_to_none=True)
    wrong = rel_gap(own_mean_gradients(model, shares, device), trainable_grads(reference))
    tokens = [int(sum_over_ranks(count_loss_tokens(shares) if r == rank else 0, device))
              for r in range(WORLD)]
    return {"right": right, "wrong": wrong, "tokens": tokens, "own_size": own_size}


def same_weights(rank, base, splits, args, device):
    """args.budget.steps AdamW steps: one process with the whole batch, 2 ranks under DDP, and
    2 ranks by hand (tiny_gpt/parallel/by_hand.py)."""
    cfg = short_config(args, args.budget.steps, 0, grad_accum=ACCUM, seed=1)
    batches = lambda g: sample_batch(splits["train"], TASK_BATCH // ACCUM, g)  # noqa: E731
    reference = lora_copy(base, seed=0)
    train(reference, batches, cfg, device=device)
    model = wrap_ddp(lora_copy(base, seed=0), device)
    result = train(model, sharded_batches(batches, rank, WORLD), cfg, device=device)
    weights = trainable_values(model)
    by_hand = train_by_hand(lora_copy(base, seed=0), batches, cfg, rank, WORLD, device)
    return {"gap": rel_gap(weights, trainable_values(reference)), "ranks": rank_spread(weights),
            "by_hand_vs_ddp": rel_gap(by_hand, weights), "loss": result.losses[-1],
            "model": model}


# --- (b) bytes on the wire ----------------------------------------------------------------

def wire_section(rank, base, splits, device):
    shares = [rank_share(b, rank, WORLD) for b in micro_batches(
        splits, torch.Generator().manual_seed(2), 1)]
    full = copy.deepcopy(base).train()
    return {"LoRA r=8 (Q,V)": wire_bytes(lora_copy(base), shares, device),
            "full fine-tuning": wire_bytes(full, shares, device),
            "QLoRA, broadcast_buffers=True": wire_bytes(lora_copy(base, quantized=True), shares,
                                                        device),
            "QLoRA, broadcast_buffers=False": wire_bytes(lora_copy(base, quantized=True),
                                                         shares, device, **no_buffer_sync())}


# --- (c) the pitfalls ---------------------------------------------------------------------

def unused_adapter(base, shares, device):
    """A second adapter, trainable but not active: it never gets a gradient. The two set-ups
    that run are timed taking turns (median seconds of a step's gradient code)."""
    def with_spare():
        model = lora_copy(base)
        return add_adapter(model, "spare")

    def step(ddp):
        def run():
            accumulate_gradients(ddp, shares, device)
            ddp.zero_grad(set_to_none=True)
        return run
    outcome = {"plain DDP": ddp_outcome(with_spare(), shares, device)}
    frozen = wrap_ddp(train_only_adapter(with_spare(), "default"), device)
    unused = wrap_ddp(with_spare(), device, find_unused_parameters=True)
    return {**outcome, **round_robin_medians({"spare frozen": step(frozen),
                                              "find_unused_parameters": step(unused)}, 5)}


CHECKPOINTING = (("torch", False), ("torch_reentrant", False), ("torch_reentrant", True),
                 ("manual", False))  # (checkpoint_impl, with enable_input_require_grads)


def checkpointing(base, shares, reference_grads, device):
    """Two steps with every block checkpointed, under DDP with and without static_graph."""
    outcome = {}
    for (impl, input_grads), static in itertools.product(CHECKPOINTING, (False, True)):
        model = lora_copy(base)
        model.config.gradient_checkpointing, model.config.checkpoint_impl = True, impl
        if input_grads:
            enable_input_require_grads(model)
        key = f"{impl}{' + input grads' if input_grads else ''}|{static}"
        with warnings.catch_warnings():  # reentrant: "None of the inputs have requires_grad"
            warnings.simplefilter("ignore", UserWarning)
            outcome[key] = ddp_outcome(model, shares, device, reference_grads,
                                       static_graph=static)
    return outcome


def save_on_rank0(rank, model, base, folder):
    """Rank 0 writes (atomically); every rank waits, then loads into a fresh copy."""
    if rank == 0:
        save_adapter(model.module, folder)
    dist.barrier()
    return trainable_values(load_adapter(copy.deepcopy(base), folder))


def seeds_section(rank, base, splits, args, device):
    """Adapters initialized with a different seed on each rank: DDP's broadcast at wrapping
    makes them equal; by hand, without a broadcast, the ranks train different models."""
    cfg = short_config(args, 3, 0, grad_accum=1, seed=1)
    batches = lambda g: sample_batch(splits["train"], TASK_BATCH, g)  # noqa: E731
    before = rank_spread(trainable_values(lora_copy(base, seed=rank)))
    after_wrap = rank_spread(trainable_values(wrap_ddp(lora_copy(base, seed=rank), device)))
    by_hand_no = rank_spread(train_by_hand(lora_copy(base, seed=rank), batches, cfg, rank, WORLD,
                                           device, broadcast=False))
    by_hand_yes = rank_spread(train_by_hand(lora_copy(base, seed=rank), batches, cfg, rank,
                                            WORLD, device))
    return {"seed=rank, before wrapping": before, "seed=rank, after DDP wraps": after_wrap,
            "by hand, no broadcast, 3 steps": by_hand_no,
            "by hand, broadcast, 3 steps": by_hand_yes}


# --- (d) QLoRA: replicated 4-bit base, then sharded with FSDP -----------------------------

def qlora_ddp(rank, base, shares, micro, device):
    reference = lora_copy(base, quantized=True)
    accumulate_gradients(reference, micro, device)
    model = lora_copy(base, quantized=True)
    ddp = wrap_ddp(model, device, **no_buffer_sync())
    accumulate_gradients(ddp, shares, device)
    codes = torch.cat([b.reshape(-1).float() for n, b in model.named_buffers()
                       if n.endswith("codes")])
    return {"gap": rel_gap(trainable_grads(ddp), trainable_grads(reference)),
            "codes_ranks": rank_spread({"codes": codes})}


def qlora_fsdp(rank, base, shares, micro, device):
    """fully_shard every block and the root, the packed codes held as float32 parameters
    (quant/sharding.py)."""
    fully_shard = fully_shard_function(device.type)
    if fully_shard is None:
        return {"error": f"torch {torch.__version__} has no FSDP2 fully_shard for {device.type} "
                         "(torch >= 2.6; on CUDA >= 2.4)"}
    reference = lora_copy(base, quantized=True)
    accumulate_gradients(reference, micro, device)
    model = lora_copy(base, quantized=True)
    replicated = state_bytes(model)
    fully_shard_4bit(model, fully_shard)
    total = sum_over_ranks(count_loss_tokens(shares), device)
    # FSDP averages over ranks as DDP does: hence W * S_r / N
    for share in shares:
        (micro_batch_loss(model, *to_device(share, device), total) * WORLD).backward()
    return {"replicated": replicated, "sharded": state_bytes(model),
            "gap": rel_gap(trainable_grads(model), trainable_grads(reference))}


# --- one rank's whole lesson --------------------------------------------------------------

def rank_main(rank, args, device, folder):
    """Every section in turn, on this rank; the adapter of (a) is saved by rank 0 to folder."""
    torch.set_num_threads(1)  # two ranks on two cores
    if rank == 0:  # under torchrun the base may not be cached yet: one rank trains it
        get_base_model(args)
    dist.barrier()
    base, _ = get_base_model(args)
    base = base.to(device)
    splits = task_splits(args)
    out = {"gradient": same_gradient(rank, base, splits, device)}
    out["weights"] = same_weights(rank, base, splits, args, device)
    model = out["weights"].pop("model")
    out["wire"] = wire_section(rank, base, splits, device)
    micro = micro_batches(splits, torch.Generator().manual_seed(3), 1)
    shares = [rank_share(b, rank, WORLD) for b in micro]
    reference = lora_copy(base)
    accumulate_gradients(reference, micro, device)
    out["unused"] = unused_adapter(base, shares, device)
    out["checkpointing"] = checkpointing(base, shares, trainable_grads(reference), device)
    loaded = save_on_rank0(rank, model, base, folder)
    out["loaded_gap"] = rel_gap(loaded, trainable_values(model)) if rank == 0 else None
    out["loaded_ranks"] = rank_spread(loaded)
    out["seeds"] = seeds_section(rank, base, splits, args, device)
    out["qlora_ddp"] = qlora_ddp(rank, base, shares, micro, device)
    out["fsdp"] = qlora_fsdp(rank, base, shares, micro, device)
    return out
