"""Lesson 13 -- beyond one process: data-parallel LoRA and QLoRA on torch.distributed.

Run it either way (2 processes, gloo on CPU; nccl when there is a GPU per process):
    python lessons/13_data_parallel.py                    # spawns its 2 processes itself
    torchrun --nproc_per_node=2 lessons/13_data_parallel.py

Data parallelism: every rank holds the whole model, takes its own share of each batch, and after
backward the ranks average their gradients, so they all take the same optimizer step and stay
equal. torch's DistributedDataParallel (DDP) does it; tiny_gpt/parallel/by_hand.py does it in
two functions, as the explanation, and (a) shows the two agree.

(a) The same gradient as one process. With W ranks and N_r loss tokens on rank r, one process
would minimize S / N over the whole batch (S summed token losses, N = sum_r N_r). DDP averages
the ranks' gradients, so each rank must use  W * S_r / N, with N summed over the ranks -- not
its own mean S_r / N_r, which weights the tokens of a rank with short answers more (the
distributed form of the accumulation pitfall; see tiny_gpt/parallel/data_parallel.py).
tiny_gpt.train does this by itself once the model is wrapped in DDP, with no_sync() over the
micro-batches of a step. Shown: the gradient gap after one step, right and wrong, and the
adapter weights after 20 AdamW steps against one process with the whole batch.

(b) Bytes on the wire. DDP's reducer registers only the parameters that require grad, so under
LoRA only the adapters' gradients are all-reduced: 4 bytes x trainable parameters per step,
against the whole model for full fine-tuning. Once, at wrapping, rank 0 broadcasts the whole
model (frozen part too) -- and with broadcast_buffers=True, the buffers before every forward:
a 4-bit base keeps its codes in buffers, so QLoRA wants broadcast_buffers=False.

(c) The pitfalls: an adapter that gets no gradient (DDP's "Expected to have finished
reduction" error; fixes: find_unused_parameters at its cost, or freezing it); gradient
checkpointing under DDP (non-reentrant, reentrant, ours; static_graph); saving from rank 0
only, loading on every rank; the seed for the adapters' initialization.

(d) QLoRA: each rank holds the 4-bit base (buffers, never reduced nor cast); then FSDP shards
the frozen base across the ranks, with the packed codes held as float32 bytes the way
answer.ai's fsdp_qlora holds them, and the per-rank bytes are measured. This is FSDP2
(torch.distributed.fsdp.fully_shard), which runs on CPU with gloo and shards each parameter on
its own. FSDP1 (FullyShardedDataParallel), whose flattening into one buffer is what refuses
integer tensors ("Cannot flatten integer dtype tensors", peft #1432), does not run on CPU at all
in torch 2.13 ("FSDP needs a non-CPU accelerator device"), so that error is not reproduced here.
"""
import copy
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, write_summary)
from lessons.plots import saved_figure
from lessons.recipe import TASK_BATCH, short_config, task_splits
from lora import add_adapter, load_adapter, save_adapter, train_only_adapter
from quant.sharding import fully_shard_4bit
from tiny_gpt import sample_batch
from tiny_gpt.memory.checkpointing import enable_input_require_grads
from tiny_gpt.parallel import (gather_over_ranks, launched_by_torchrun, rank_device, rank_share,
                               run_like_torchrun, sharded_batches, sum_over_ranks, train_by_hand)
from tiny_gpt.parallel.measure import (coordinate_gap, ddp_outcome, own_mean_gradients,
                                       rank_spread, rel_gap, state_bytes, trainable_grads,
                                       trainable_values, wire_bytes, wrap_ddp)
from tiny_gpt.util.timing import round_robin_medians
from tiny_gpt.util.torch_compat import fully_shard_function, no_buffer_sync
from tiny_gpt.train import train
from tiny_gpt.step import accumulate_gradients, count_loss_tokens, micro_batch_loss, to_device

NAME = "13_data_parallel"
WORLD = 2
STEPS = 20                  # AdamW steps of the equal-weights run (the 20)
ACCUM = 2                   # micro-batches per step, each split across the ranks
GRAD_TOL, WEIGHT_TOL = 1e-6, 1e-5   # relative to the largest |value|, fp32


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS      # AdamW steps of the equal-weights run (a)


QUICK = Budget(steps=4)


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

def rank_main(rank, world, args, device):
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
    folder = Path(args.runs) / NAME / "adapter_from_rank0"
    loaded = save_on_rank0(rank, model, base, folder)
    out["loaded_gap"] = rel_gap(loaded, trainable_values(model)) if rank == 0 else None
    out["loaded_ranks"] = rank_spread(loaded)
    out["seeds"] = seeds_section(rank, base, splits, args, device)
    out["qlora_ddp"] = qlora_ddp(rank, base, shares, micro, device)
    out["fsdp"] = qlora_fsdp(rank, base, shares, micro, device)
    return out


def weights_vs_gradients(g, w, steps) -> str:
    """Why the weights end further apart than the gradients -- said only where they do."""
    if w["gap"] <= g["right"]:
        return (f"The weights after {steps} steps ({w['gap']:.1e}) are no further apart than "
                f"the first gradients ({g['right']:.1e}): the summation order's rounding did "
                "not grow here.\n")
    return (f"The weights after {steps} steps are {w['gap'] / max(g['right'], 1e-30):.0f}x "
            f"further apart ({w['gap']:.1e}) than the first gradients ({g['right']:.1e} of the "
            f"largest), which differ only in the order of their sums: AdamW divides each "
            f"coordinate by its own running size, so what enters its update is the error "
            f"relative to each coordinate's own gradient, here up to {g['own_size']:.1e} "
            f"(coordinates above AdamW's eps; B = 0 at step 0 makes dL/dA exactly 0 in both "
            f"runs); and each step's gap changes the next step's forward.\n")


def report(results, args, checks):
    r0, steps = results[0], args.budget.steps
    g, w = r0["gradient"], r0["weights"]
    print_table("(a) 2 ranks vs 1 process with the whole batch (fp32)", ["measure", "value"], [
        ["loss tokens per rank, first step", " / ".join(map(str, g["tokens"]))],
        ["gradient gap, loss W*S_r/N (right)", f"{g['right']:.1e}"],
        ["gradient gap, loss S_r/N_r (wrong)", f"{g['wrong']:.1e}"],
        ["right, per coordinate vs its own size", f"{g['own_size']:.1e}"],
        [f"adapter weights gap after {steps} AdamW steps",
         f"{w['gap']:.1e}"],
        ["weights, rank 1 vs rank 0 (max |diff|)", f"{w['ranks']:.1e}"],
        ["by hand vs DDP, weights gap", f"{w['by_hand_vs_ddp']:.1e}"]])
    print(weights_vs_gradients(g, w, steps))
    checks.must(f"gradients after one step = one process's (relative {GRAD_TOL:g})",
                g["right"] <= GRAD_TOL, f"{g['right']:.1e}")
    checks.must("the per-rank mean gives a different gradient (unequal tokens)",
                g["wrong"] > 100 * max(g["right"], 1e-9) and g["tokens"][0] != g["tokens"][1],
                f"{g['wrong']:.1e}, tokens {g['tokens']}")
    checks.target(f"adapter weights after {steps} AdamW steps = one process's (relative "
                  f"{WEIGHT_TOL:g})", w["gap"] <= WEIGHT_TOL, f"{w['gap']:.1e}")
    checks.must("the ranks hold identical weights", w["ranks"] == 0.0, f"{w['ranks']:.1e}")
    checks.must("by hand = DDP (relative 1e-6)", w["by_hand_vs_ddp"] <= 1e-6,
                f"{w['by_hand_vs_ddp']:.1e}")
    wire = r0["wire"]
    print_table("(b) bytes on the wire, per rank", ["model", "broadcast at wrapping",
                "= parameters + buffers", "all-reduced per step", "= 4 x trainable",
                "broadcast per step (buffers)"],
                [[k, v["wrap"], v["wrap_formula"], v["allreduce"], v["allreduce_formula"],
                  v["buffers"]] for k, v in wire.items()])
    lora, full = wire["LoRA r=8 (Q,V)"], wire["full fine-tuning"]
    checks.must("all-reduced bytes = 4 x trainable parameters, LoRA and full",
                all(v["allreduce"] == v["allreduce_formula"] for v in wire.values()),
                f"LoRA {lora['allreduce']:,} B, full {full['allreduce']:,} B "
                f"({full['allreduce'] / lora['allreduce']:.0f}x)")
    takeaway(f"{WORLD} processes with DDP {'give' if g['right'] <= GRAD_TOL else 'do NOT give'} "
             f"one process's gradient (relative gap {g['right']:.1e}) when each rank's loss is "
             f"W * S_r / N; its own mean S_r / N_r is off by {g['wrong']:.1e}",
             f"under LoRA a step all-reduces {lora['allreduce']:,} bytes, "
             f"{full['allreduce'] / lora['allreduce']:.0f}x fewer than full fine-tuning")
    q_off = wire["QLoRA, broadcast_buffers=False"]
    checks.must("QLoRA with broadcast_buffers=False sends no buffers per step",
                q_off["buffers"] == 0 and wire["QLoRA, broadcast_buffers=True"]["buffers"] > 0,
                f"{wire['QLoRA, broadcast_buffers=True']['buffers']:,} B -> 0")
    return wire


def report_pitfalls(results, checks):
    r0 = results[0]
    u = r0["unused"]
    print_table("(c1) an adapter that gets no gradient", ["set-up", "outcome"], [
        ["plain DDP", u["plain DDP"]],
        ["spare adapter frozen", f"runs, {1e3 * u['spare frozen']:.0f} ms/step"],
        ["find_unused_parameters=True", f"runs, {1e3 * u['find_unused_parameters']:.0f} "
         f"ms/step ({u['find_unused_parameters'] / u['spare frozen']:.2f}x)"]])
    checks.must("DDP refuses a trainable adapter that gets no gradient",
                u["plain DDP"].startswith("error"), u["plain DDP"][:60])
    rows = [[*k.split("|"), v] for k, v in r0["checkpointing"].items()]
    print_table("(c2) gradient checkpointing under DDP (2 steps)",
                ["checkpoint_impl", "static_graph", "outcome"], rows)
    ok = [v for k, v in r0["checkpointing"].items() if k.split("|")[0] != "torch_reentrant"]
    fine = all(v.startswith("gradient gap") for v in ok)
    checks.must("non-reentrant and our checkpointing give one process's gradient",
                fine and max(float(v.split()[-1]) for v in ok) <= GRAD_TOL,
                f"largest gap {max(float(v.split()[-1]) for v in ok):.1e} in {len(ok)} runs"
                if fine else "; ".join(ok))
    print_table("(c3) save on rank 0, load on every rank", ["measure", "value"], [
        ["loaded vs trained (rank 0)", f"{r0['loaded_gap']:.1e}"],
        ["loaded, rank 1 vs rank 0", f"{r0['loaded_ranks']:.1e}"]])
    checks.must("the adapter saved by rank 0 loads identically on every rank",
                r0["loaded_gap"] == 0.0 and r0["loaded_ranks"] == 0.0)
    s = r0["seeds"]
    print_table("(c4) the adapters' initial seed (max |rank 1 - rank 0|)", ["case", "spread"],
                [[k, f"{v:.1e}"] for k, v in s.items()])
    checks.must("DDP's broadcast equalizes different initial adapters; by hand one must",
                s["seed=rank, before wrapping"] > 0 and s["seed=rank, after DDP wraps"] == 0
                and s["by hand, no broadcast, 3 steps"] > 0
                and s["by hand, broadcast, 3 steps"] == 0)


def report_qlora(results, checks):
    q, f = results[0]["qlora_ddp"], results[0]["fsdp"]
    rows = [["QLoRA under DDP, gradient gap vs one process", f"{q['gap']:.1e}"],
            ["4-bit codes, rank 1 vs rank 0 (max |diff|)", f"{q['codes_ranks']:.1e}"]]
    if "error" in f:
        rows.append(["FSDP", f["error"]])
    else:
        rows += [["FSDP: bytes per rank, replicated", f"{f['replicated']:,}"],
                 ["FSDP: bytes per rank, sharded (rank 0 / rank 1)",
                  f"{f['sharded']:,} / {results[1]['fsdp']['sharded']:,}"],
                 ["FSDP: gradient gap vs one process", f"{f['gap']:.1e}"]]
    print_table("(d) QLoRA: the 4-bit base replicated (DDP) and sharded (FSDP)",
                ["measure", "value"], rows)
    checks.must(f"QLoRA under DDP = one process (relative {GRAD_TOL:g}), the same codes on "
                "every rank", q["gap"] <= GRAD_TOL and q["codes_ranks"] == 0.0,
                f"{q['gap']:.1e}")
    if "error" not in f:
        share = max(f["sharded"], results[1]["fsdp"]["sharded"]) / f["replicated"]
        checks.must(f"FSDP holds about 1/{WORLD} of the QLoRA model per rank, same gradient",
                    share <= 0.6 and f["gap"] <= GRAD_TOL, f"{share:.2f}, gap {f['gap']:.1e}")


def plot(wire, path):
    with saved_figure(path) as ax:
        names = list(wire)
        ax.barh(names, [wire[n]["allreduce"] for n in names], label="all-reduced per step")
        ax.barh(names, [wire[n]["buffers"] for n in names], left=[wire[n]["allreduce"]
                for n in names], label="buffers broadcast per step")
        ax.scatter([wire[n]["wrap"] for n in names], names, color="k", marker="|", s=200,
                   label="broadcast once, at wrapping")
        ax.set(xscale="log", xlabel="bytes per rank")
        ax.legend(fontsize=7)


def main(argv=None):
    args = parse_args("Lesson 13: data-parallel LoRA and QLoRA.", argv,
                      budget=(Budget(), QUICK))
    if not launched_by_torchrun():
        get_base_model(args)  # pretrain (once) here, not in two processes at a time
        argv = ["--runs", str(Path(args.runs).resolve()), "--seed", str(args.seed),
                "--device", str(args.device)] + (
            ["--quick"] if args.quick else []) + (["--compile"] if args.compile else [])
        return run_like_torchrun(Path(__file__).resolve(), WORLD, argv)
    device = rank_device(args.device, int(os.environ["LOCAL_RANK"]), WORLD)
    rank, results = gather_over_ranks(lambda r: rank_main(r, WORLD, args, device), WORLD, device)
    if rank != 0:
        return 0
    out = lesson_dir(args, NAME)
    checks = Checks(args)
    wire = report(results, args, checks)
    report_pitfalls(results, checks)
    report_qlora(results, checks)
    plot(wire, out / "bytes_on_the_wire.png")
    write_summary(args, NAME, {"grad_gap": results[0]["gradient"]["right"],
                               "weight_gap": results[0]["weights"]["gap"],
                               "lora_allreduce_bytes": wire["LoRA r=8 (Q,V)"]["allreduce"]})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
