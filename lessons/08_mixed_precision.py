"""Lesson 08 -- mixed precision: fp16 gradients, loss scaling, and why adapters stay fp32.

fp16 keeps 5 exponent bits and 10 stored mantissa bits: its largest value is (2 - 2^-10) 2^15
= 65504 and its smallest (subnormal) one 2^-24 ~ 6e-8; table (a) prints both from
torch.finfo. The gradient of a mean loss over thousands of tokens is tiny, and entries of at
most 2^-25 (half the smallest) round to 0 when stored in fp16. Loss scaling (Micikevicius et
al. 2018, "Mixed Precision Training", Sec. 3.2) runs the backward of S * loss instead: every
gradient is S times larger, the small ones survive fp16 storage, and dividing by S in fp32
afterwards (exact for S a power of two) gives back the gradient. S too large overflows to inf.

(a) fp16 gradient storage, simulated on a CPU: the gradient flowing back into every linear
    layer's output is rounded to float16 (tiny_gpt/memory/loss_scaling.py, ``Fp16Backward``),
    as fp16 autocast stores it. One batch's gradients of a tuned LoRA model, for S = 2^0 ..
    2^32: how many flush to zero, how many overflow, and the error left after unscaling.
(b) Loss scaling in training. A dynamic scaler (``DynamicLossScaler``, the algorithm of
    torch.amp.GradScaler) halves S and skips the step when a gradient is inf or nan, and
    doubles S after N finite steps in a row. The same short run with fp32, with S = 1 (no
    scaling), a static S = 2^32, and a dynamic S starting at 2^32.
(c) Real fp16 autocast on CUDA, torch's GradScaler against ours: the same scale history is
    expected. On a CPU this part prints a line saying it was skipped.
(d) Why the trainable adapters stay fp32 under autocast (fp32 "master weights", Sec. 3.1 of
    the same paper). An AdamW step of ~1e-4 relative to a weight is below half of bf16's
    spacing (2^-8 relative), so rounding undoes it: a bf16-stored weight stays put, all but the
    few entries far below the median |w|, for which the same step is relatively larger. An
    fp32 weight moves; the table also shows how much of that a bf16 copy of the fp32 master
    (what autocast multiplies with) keeps.

Run it: ``python lessons/08_mixed_precision.py`` (about a minute on a 2-core CPU once the base
model of lesson 00 is cached); ``--quick`` for a smoke run.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, write_summary)
from lessons.plots import plot_loss_curves, saved_figure
from lessons.recipe import DEFAULT_TASK, TASK_BATCH, fit, short_config, tail_mean, task_splits
from tiny_gpt import sample_batch
from tiny_gpt.memory.loss_scaling import DynamicLossScaler, Fp16Backward, scaled_fp16_grads
from tiny_gpt.train import make_optimizer, set_lr
from tiny_gpt.step import accumulate_gradients, lr_at, optimizer_step
from tiny_gpt.util.torch_compat import cuda_grad_scaler

NAME = "08_mixed_precision"
FP16 = torch.finfo(torch.float16)
FP16_SUBNORMAL = FP16.smallest_normal * FP16.eps  # 2^-14 * 2^-10: fp16's smallest value > 0


@dataclass(frozen=True)
class Budget:
    tune_steps: int = 300        # (a): LoRA steps before one batch's gradients are measured
    amp_steps: int = 60          # (b), (c): each training run


# --quick: every code path, a step or two each; the numbers mean nothing.
QUICK = Budget(tune_steps=2, amp_steps=3)


# --- (a) fp16 storage of one batch's gradients ---------------------------------------------
def tuned_model(args, base, splits):
    """A LoRA copy (r=8 on Q and V) trained tune_steps steps, so that both factors have
    gradients: a fresh copy's lora_B is zero, which leaves lora_A none."""
    model = lora_copy(base, args.seed)
    fit(model, splits["train"], short_config(args, args.budget.tune_steps, 0), args)
    return model


def flushed_percent(ref, stored):
    """Percent of the nonzero fp32 gradient entries that are 0 in fp16 storage."""
    return 100 * ((ref != 0) & (stored == 0)).sum().item() / (ref != 0).sum().item()


def fp16_gradient_table(args, model, splits):
    batch = [t.to(args.device) for t in
             sample_batch(splits["train"], TASK_BATCH, torch.Generator().manual_seed(args.seed))]
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model(*batch)[1].backward()
    ref = torch.cat([p.grad.flatten() for p in params])  # fp32 reference gradients
    rows = []
    for log2 in (0, 8, 16, 24, 32):
        unscaled, stored, sim = scaled_fp16_grads(model, batch, 2.0 ** log2)
        finite = bool(torch.isfinite(unscaled).all())
        rel = ((unscaled - ref).norm() / ref.norm()).item() if finite else float("inf")
        rows.append([f"2^{log2}", f"{100 * sim.flushed / max(1, sim.nonzero):.2f}%",
                     f"{flushed_percent(ref, stored):.2f}%",
                     sim.overflowed + int(torch.isinf(stored).sum()), rel])
    model.zero_grad(set_to_none=True)
    print_table(f"(a) One batch's gradients with fp16 storage simulated, by loss scale S (LoRA "
                f"adapters after {args.budget.tune_steps} steps; max |fp32 grad| "
                f"{ref.abs().max():.2e}; fp16 max {FP16.max:g}, smallest subnormal "
                f"{FP16_SUBNORMAL:.2g})",
                ["S", "activation grads -> 0", "adapter grads -> 0", "entries -> inf",
                 "rel. error after unscaling"], rows)
    return rows


# --- (b), (c) loss scaling in training -------------------------------------------------------
def store_in_fp16(params):
    """fp16 training stores its gradients in fp16: round them to fp16 values (torch refuses an
    fp16 .grad on an fp32 parameter, so they stay fp32 tensors holding fp16 values)."""
    for p in params:
        p.grad = p.grad.to(torch.float16).to(p.dtype)


def amp_run(args, base, splits, scaler, simulate=True, precision="fp32"):
    """A short LoRA run of tiny_gpt.train's steps (schedule, scaled backward, unscale, clip,
    step) with fp16 gradients in between: simulated (rounded to fp16 on the way back and as
    stored), or real with precision='fp16' on CUDA. Counts the steps that left the weights
    unchanged -- those the scaler skipped."""
    model = lora_copy(base, args.seed).to(args.device).train()
    cfg = short_config(args, args.budget.amp_steps, 0)
    gen, optimizer = torch.Generator().manual_seed(cfg.seed), make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, scales, skipped = [], [], 0
    for step in range(cfg.max_steps):
        set_lr(optimizer, lr_at(step, cfg))
        batch = [sample_batch(splits["train"], TASK_BATCH, gen)]
        with Fp16Backward(model) if simulate else nullcontext():
            loss, _ = accumulate_gradients(model, batch, args.device, precision, scaler)
        if simulate:
            store_in_fp16(params)
        losses.append(loss)
        if scaler is not None:
            scales.append(scaler.get_scale())
        before = [p.detach().clone() for p in params]
        optimizer_step(model, optimizer, scaler, cfg.grad_clip)
        skipped += all(torch.equal(b, p) for b, p in zip(before, params))
    return {"losses": losses, "scales": scales, "skipped": skipped, "model": model}


def growth_interval(args):
    return max(2, args.budget.amp_steps // 6)  # short for a short run (torch's default: 2000)


def loss_scaler_runs(args, base, splits):
    g = growth_interval(args)
    runs = {"fp32, no scaler": (None, False),
            "fp16 sim, S = 1 (no scaling)": (DynamicLossScaler(1.0, 1.0, 1.0), True),
            "fp16 sim, static S = 2^32": (DynamicLossScaler(2.0 ** 32, 1.0, 1.0), True),
            f"fp16 sim, dynamic from 2^32, growth every {g}":
                (DynamicLossScaler(2.0 ** 32, growth_interval=g), True)}
    results = {label: amp_run(args, base, splits, scaler, sim)
               for label, (scaler, sim) in runs.items()}
    ref = torch.tensor(results["fp32, no scaler"]["losses"])
    rows = []
    for label, r in results.items():
        diff = (torch.tensor(r["losses"]) - ref).abs()
        rows.append([label, r["skipped"], f"{r['scales'][-1]:.3g}" if r["scales"] else "-",
                     tail_mean(r["losses"]), diff.mean().item()])
    print_table(f"(b) Loss scaling in training ({args.budget.amp_steps} steps each, same batches)",
                ["run", "steps skipped", "final S", "last-10% loss", "mean |loss - fp32 loss|"],
                rows)
    say_what_s1_did(rows[1][-1])
    return results, rows


def say_what_s1_did(unscaled_gap):
    """Say what the run showed, whichever way it went."""
    if unscaled_gap < 0.01:
        print(f"Here S = 1 trained like fp32 (mean |loss difference| {unscaled_gap:.1e}): the "
              "gradients that fp16 flushed to zero (table a) were not the ones this task "
              "needed. The smaller a model's gradients (a mean over more tokens, deeper "
              f"networks), the more of them fall below fp16's {FP16_SUBNORMAL:.2g}, and "
              "scaling is what keeps them.\n")
    else:
        print(f"S = 1 drifted from fp32 (mean |loss difference| {unscaled_gap:.2g}): the "
              "gradients flushed to zero in table a were missed.\n")


def cuda_fp16(args, base, splits):
    """Real fp16 autocast on CUDA with torch's GradScaler and with ours, side by side."""
    if args.device.type != "cuda":
        print(f"(c) real fp16 autocast: skipped -- it needs a CUDA device and this run is on "
              f"'{args.device}'; the simulation in (a)/(b) stands in for it.\n")
        return None
    g = growth_interval(args)
    scalers = {"torch.amp.GradScaler": cuda_grad_scaler(init_scale=2.0 ** 32, growth_interval=g),
               "DynamicLossScaler (ours)": DynamicLossScaler(2.0 ** 32, growth_interval=g)}
    results = {k: amp_run(args, base, splits, s, simulate=False, precision="fp16")
               for k, s in scalers.items()}
    theirs, ours = results.values()
    same = theirs["scales"] == ours["scales"]
    layer = theirs["model"].blocks[0].attn.q_proj
    rows = [[k, r["skipped"], f"{r['scales'][-1]:.3g}", tail_mean(r["losses"])]
            for k, r in results.items()]
    print_table(f"(c) Real fp16 autocast on {args.device} ({args.budget.amp_steps} steps; "
                f"same scale history: {'yes' if same else 'no'}; adapters stay "
                f"{layer.lora_A.dtype} under autocast)",
                ["scaler", "steps skipped", "final S", "last-10% loss"], rows)
    return same


# --- (d) fp32 master weights -------------------------------------------------------------
def master_weights(args, base, steps=100, relative_step=1e-4):
    """AdamW on a real weight matrix, stored in fp32 and in bf16. Adam's step is ~lr per entry,
    set to relative_step times the median |w|; the gradient is a fixed random direction."""
    w0 = base.blocks[0].attn.q_proj.weight.detach().float().cpu().clone()  # (128, 128)
    lr = relative_step * w0.abs().median().item()
    grad = torch.randn(w0.shape, generator=torch.Generator().manual_seed(args.seed))
    final, rows, unmoved = {}, [], {}
    for label, dtype in (("fp32 weight", torch.float32), ("bf16 weight", torch.bfloat16)):
        p = nn.Parameter(w0.to(dtype, copy=True))  # a copy: w0 stays the start point
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
        for t in range(steps):
            p.grad = grad.to(dtype)
            opt.step()
            if t == 0:
                unmoved[label] = int((p.detach() == w0.to(dtype)).sum())
        final[label] = p.detach()
        moved = (p.detach().float() - w0.to(dtype).float()).abs().mean().item()
        rows.append([label, f"{w0.numel() - unmoved[label]:,} of {w0.numel():,}", moved])
    start16, copy16 = w0.to(torch.bfloat16), final["fp32 weight"].to(torch.bfloat16)
    rows.append(["bf16 copy of the fp32 master (what autocast multiplies with)", "-",
                 (copy16.float() - start16.float()).abs().mean().item()])
    print_table(f"(d) Why adapters stay fp32: AdamW steps of {relative_step:g} x median |w| "
                f"(lr {lr:.2e}) on blocks.0.attn.q_proj.weight, {steps} steps "
                f"(ideal movement {steps * lr:.2e})",
                ["storage", "entries changed by step 1", f"mean |w_{steps} - w_0|"], rows)
    return rows, unmoved


# --- plot, summary and main ----------------------------------------------------------------
def plot_scaling(out, results):
    """Training loss of the runs of (b), and each scaler's S over the steps, in one color each."""
    with saved_figure(out / "loss_scaling.png", ncols=2, figsize=(11, 3.8)) as (left, right):
        plot_loss_curves(left, {label: r["losses"] for label, r in results.items()})
        left.set(title="(b) training loss with fp16 gradients")
        for i, (label, r) in enumerate(results.items()):
            if r["scales"]:
                right.plot(range(1, len(r["scales"]) + 1), r["scales"], lw=1, color=f"C{i}",
                           label=label)
        right.set(xlabel="step", ylabel="loss scale S", yscale="log", title="(b) loss scale")
        right.legend(fontsize=7)


def summarize(args, fp16_rows, scaler_rows, cuda_same, unmoved):
    write_summary(args, NAME, {
        "adapter_grads_flushed_S1": fp16_rows[0][2], "S1_vs_fp32_loss_gap": scaler_rows[1][-1],
        "scaler_skipped_steps": scaler_rows[-1][1], "bf16_entries_unmoved": unmoved["bf16 weight"],
        "cuda_scalers_agree": cuda_same})


def judge(args, cuda_same, unmoved):
    checks = Checks(args)
    if cuda_same is not None:
        checks.must("our DynamicLossScaler = torch.amp.GradScaler (scale history)", cuda_same)
    checks.must("an fp32 master weight moves on every entry", unmoved["fp32 weight"] == 0,
                f"{unmoved['fp32 weight']} entries unmoved")
    return checks.report()


def conclude(fp16_rows, unmoved, n=128 * 128):
    """(d)'s unmoved entries and (a)'s flushed gradients, as the lesson's takeaway."""
    bf16, fp32 = unmoved["bf16 weight"], unmoved["fp32 weight"]
    said = ("so adapters and master weights stay fp32" if bf16 > fp32 else
            "so here bf16 storage lost no step")
    takeaway(f"one AdamW step of 1e-4 x |w| leaves {bf16:,} of {n:,} entries of a bf16 weight "
             f"unchanged and {fp32:,} of an fp32 one, {said}",
             f"stored in fp16 without loss scaling, {fp16_rows[0][2]} of the adapters' gradient "
             "entries flush to zero")


def main(argv=None):
    args = parse_args(__doc__, argv, budget=(Budget(), QUICK))
    out = lesson_dir(args, NAME)
    base, _ = get_base_model(args)
    base.eval().requires_grad_(False)
    splits = task_splits(args, DEFAULT_TASK)

    fp16_rows = fp16_gradient_table(args, tuned_model(args, base, splits), splits)
    scaler_results, scaler_rows = loss_scaler_runs(args, base, splits)
    plot_scaling(out, scaler_results)
    cuda_same = cuda_fp16(args, base, splits)
    _, unmoved = master_weights(args, base)
    summarize(args, fp16_rows, scaler_rows, cuda_same, unmoved)
    conclude(fp16_rows, unmoved)
    return judge(args, cuda_same, unmoved)


if __name__ == "__main__":
    run_main(main)
