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

What each process runs, section by section, is lessons/data_parallel_ranks.py; this file starts
the processes, and rank 0 prints the tables and judges the checks from what every rank measured.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from lessons.common import (Checks, get_base_model, lesson_dir, parse_args, print_table, run_main,
                            takeaway, write_summary)
from lessons.data_parallel_ranks import WORLD, rank_main
from lessons.plots import saved_figure
from tiny_gpt.parallel import (gather_over_ranks, launched_by_torchrun, rank_device,
                               run_like_torchrun)

NAME = "13_data_parallel"
STEPS = 20                  # AdamW steps of the equal-weights run
GRAD_TOL, WEIGHT_TOL = 1e-6, 1e-5   # relative to the largest |value|, fp32


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS      # AdamW steps of the equal-weights run (a)


QUICK = Budget(steps=4)


# --- what rank 0 prints, from every rank's results ---------------------------------------

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
    folder = Path(args.runs) / NAME / "adapter_from_rank0"  # (c3): rank 0 saves, all load
    rank, results = gather_over_ranks(lambda r: rank_main(r, args, device, folder), WORLD, device)
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
