"""Lesson 06 -- QLoRA: LoRA on top of a 4-bit base.

QLoRA (Dettmers et al. 2023, Sec. 3) stores every linear layer of the frozen base in NF4
(lesson 05) and trains LoRA adapters in 16/32-bit on top:

    y = dequant(W_nf4) x + b + (alpha / r) B A x

The forward dequantizes W one layer at a time, just before its matmul, and throws it away. The
backward needs dL/dx = dL/dy W (adapters of earlier layers sit upstream), so it dequantizes W
again; it never needs dL/dW, because W is frozen -- and 4-bit codes have no gradient to take.
That is quant.DequantMatmul. The base's linear weights drop from 32 to about 4.1 bits each
(measured below); adapters, their gradients and their optimizer states stay as small as in
plain LoRA.

Measured below: DequantMatmul's backward (float64 gradcheck; equal to autograd through the
dense dequantized weight); the 4-bit base's loss and perplexity = exp(loss); the bytes of the
base; QLoRA vs LoRA with the same recipe over --seeds seeds (test accuracy); the adapter
re-loaded onto a freshly quantized base; deployment; quantize / dequantize / dequant-matmul speed.

QLoRA vs LoRA. The QLoRA paper (Sec. 4) finds that 4-bit NF4 + LoRA matches 16-bit LoRA. Here
each seed trains both from copies that start identical (the same lora_A), on the same batches,
scored on the same test prompts, so the two are paired seed by seed; "QLoRA within 3 points of
LoRA" is printed as shown, contradicted, or "cannot tell" by the 95% interval of the paired
difference (lessons/seeds.py), never from one run.

Deployment. The adapter was trained against the dequantized weights W_deq, not the original
W0, and is tied to them. Merged into a float copy of W_deq it is exact up to float32 rounding.
Merged into anything else -- re-quantizing W_deq + s B A to NF4, or adding s B A to the fp32
original -- the weights move by a fresh NF4-sized rounding error that the adapter never saw.
Default run: a LoRA and a QLoRA fine-tune (--steps each) per seed, 3 seeds, and a 4096 x 4096
benchmark: about five minutes on 2 cores.
"""
from dataclasses import dataclass

import torch

from lessons.common import (Checks, LORA_ALPHA, LORA_R, base_recipe, get_base_model, lesson_dir,
                            lora_copy, parse_args, print_table, run_main, takeaway, whole_number,
                            write_summary)
from lessons.plots import plot_grouped_bars, plot_seed_curves, saved_figure
from lessons.recipe import DEFAULT_TASK, short_config, tail_mean, task_splits, tuned_accuracy
from lessons.seeds import (Trials, add_seeds_flag, errorbars, in_words, paired_interval,
                           seeds_of, within)
from lora import check_qlora_stack, count_parameters, save_adapter
from lora.qlora_checks import (base_bytes, dequant_matmul_parity, forward_backward_medians,
                               merge_findings, nf4_lm_losses, reload_gap, shipped_models,
                               shipping_errors)
from quant import Linear4bit
from quant.bench import benchmark_nf4
from tiny_gpt import get_task, make_batch
from tiny_gpt.pretrain import corpus_ids
from tiny_gpt.util.timing import pinned_threads

NAME = "06_qlora"
METHODS = ("LoRA", "QLoRA")
# 3 seeds x (LoRA + QLoRA) x 400 steps keep the default run near five minutes on 2 cores. The
# paper compares runs trained to the end; here both are close to 100% on 'upper' by then,
# though their training loss is still falling (see the plot)
STEPS = 400
ACC_MARGIN = 0.03  # "within 3 points": |QLoRA - LoRA| test exact match <= 0.03, paired by seed
SPEED_TARGET = 1.15      # dequant-matmul time / float32 matmul time, 4096 x 4096, 2048 tokens
F64_TOL = 1e-12  # float64, the same products in the same order: equal up to rounding (~1e-16)
# one float32 forward through two code paths (merged vs unmerged weight): only the summation
# order differs, ~1e-7 relative per op, ~1e-6 after four blocks; relative to the largest logit
F32_REL_TOL = 1e-5


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS           # optimizer steps of each LoRA and QLoRA run (--steps)
    step_repeats: int = 15       # timed forward + backward passes per method, taking turns
    bench: dict = None           # quant.bench.benchmark_nf4's size (None: its default)


# --quick: 2 seeds x 2 methods, each 2 steps (under 20 s; numbers meaningless)
QUICK = Budget(steps=2, step_repeats=3, bench=dict(out_features=256, in_features=256,
                                                   tokens=128, repeats=3))

MERGES = {"float": "float copy, adapter merged", "requant": "  ... then re-quantized to NF4",
          "fp32": "adapter merged into the fp32 original W0"}
SHIPPED = {"trained": "QLoRA as trained (NF4 base + adapter)", **MERGES,
           "disabled": "NF4 base, adapter disabled"}


def dequant_matmul_check(base, seed):
    """DequantMatmul on a real layer of the base: gradcheck and parity with the dense path."""
    linear = base.blocks[0].attn.q_proj
    ok, diffs, dense_dw = dequant_matmul_parity(linear, seed)  # float64, x of (2, 2, 128)
    rows = [["gradcheck float64 (x, bias)", ok, "gradcheck's", "OK" if ok else "FAIL"]]
    rows += [[f"{what}: max |4-bit - dense|", f"{d:.1e}", f"{F64_TOL:.0e}",
              "OK" if d <= F64_TOL else "FAIL"] for what, d in zip(["y", "dL/dx", "dL/db"], diffs)]
    rows += [["dL/dW for the 4-bit weight", "none", f"dense: {dense_dw:,} floats", ""],
             ["Linear4bit's parameters", [n for n, _ in Linear4bit.from_linear(
                 linear).named_parameters()], "", ""]]
    print_table("DequantMatmul on blocks.0.attn.q_proj (float64, x of shape (2, 2, 128))",
                ["check", "result", "tolerance", ""], rows)
    return ok and max(diffs) <= F64_TOL, max(diffs)


def lm_loss_table(base, args):
    """Validation loss and perplexity of the base in fp32 and with every linear layer in NF4."""
    recipe = base_recipe(args)
    _, val_ids = corpus_ids(recipe)
    losses, nf4_model = nf4_lm_losses(base, val_ids, recipe.seq_len, recipe.eval_batches,
                                      recipe.batch_size)
    ref = torch.tensor(losses["fp32"])
    rows = [[k, f"{v:.4f}", f"{torch.tensor(v).exp():.4f}", f"{v - ref:+.4f}",
             f"{100 * (torch.tensor(v).exp() / ref.exp() - 1):+.2f}%"] for k, v in losses.items()]
    print_table(f"The base as a language model ({recipe.eval_batches} x {recipe.batch_size} "
                f"validation windows of {recipe.seq_len} characters)",
                ["linear weights", "val loss", "perplexity", "loss increase", "ppl increase"], rows)
    return losses, nf4_model


def add_args(parser):
    parser.add_argument("--steps", type=whole_number(1), default=STEPS,
                        help=f"optimizer steps of each LoRA and QLoRA run (default {STEPS})")
    add_seeds_flag(parser)


def finetune_both(base, args):
    """LoRA and QLoRA once per seed, with the same targets (Q, V), rank, initial A, data order
    and recipe. Returns ({name: Spread}, {method: [training losses per seed]}, the models of
    the first seed (--seed), on which the later sections work)."""
    cfg = short_config(args, args.budget.steps, eval_every=0)

    def train(method, seed):
        model = lora_copy(base, seed, quantized=method == "QLoRA")  # the same A for both
        acc, result = tuned_accuracy(args, model, cfg, seed)
        print(f"  seed {seed}: {method} {100 * acc:.1f}%", flush=True)
        return {"acc": acc, "loss": tail_mean(result.losses), "s": result.wall_time,
                "losses": result.losses, "model": model}

    print(f"fine-tuning LoRA and QLoRA, {args.budget.steps} steps each, on seeds "
          f"{seeds_of(args)} ...", flush=True)
    runs = Trials(seeds_of(args), train)
    spreads = {f"{m} {k}": v for m in METHODS
               for k, v in runs.spreads(m, ("acc", "loss", "s")).items()}
    curves = {m: [runs.one(m, s)["losses"] for s in runs.seeds] for m in METHODS}
    return spreads, curves, {m: runs.one(m, runs.seeds[0])["model"] for m in METHODS}


def step_times(models, args):
    """Median seconds of forward + backward on one batch of 32, the two models taking turns."""
    batch = [t.to(args.device) for t in make_batch(task_splits(args)["train"][:32])]
    return forward_backward_medians(models, batch, args.budget.step_repeats)


def print_comparison(spreads, models, step, args):
    """The table over seeds (mean [min, max] n=seeds), the step-time ratio, and the verdict on
    the QLoRA paper's claim, computed from the paired interval."""
    n_test = len(task_splits(args)["test"])
    rows = [[m, f"{count_parameters(models[m])[0]:,}", spreads[f"{m} loss"].show(1, "{:.4f}"),
             spreads[f"{m} acc"].percent(), spreads[f"{m} s"].show(), f"{1e3 * step[m]:.1f}"]
            for m in METHODS]
    print_table(f"LoRA vs QLoRA on '{DEFAULT_TASK}' (Q and V, r={LORA_R}, alpha={LORA_ALPHA}, "
                f"same recipe; mean [min, max] over n seeds, each scored on its own {n_test} "
                "test prompts)", ["method", "trainable", "train loss (last 10%)",
                                   f"test acc (n={n_test} prompts)", "wall s", "fwd+bwd ms"],
                rows)
    verdict = within(spreads["QLoRA acc"], spreads["LoRA acc"], ACC_MARGIN, "QLoRA", "LoRA")
    paper = {True: "as the QLoRA paper finds (Sec. 4: NF4 + LoRA matches 16-bit LoRA)",
             False: "unlike the QLoRA paper, which finds NF4 + LoRA matching 16-bit LoRA "
                    "(Sec. 4)",
             None: "so this run neither confirms nor contradicts the QLoRA paper's claim "
                   "(Sec. 4) at this budget"}[verdict.holds]
    takeaway(in_words(verdict, f"QLoRA (a 4-bit NF4 base) scores within {100 * ACC_MARGIN:g} "
                               "points of LoRA", f"QLoRA (a 4-bit NF4 base) scores more than "
                                                 f"{100 * ACC_MARGIN:g} points from LoRA",
                      f"whether QLoRA scores within {100 * ACC_MARGIN:g} points of LoRA cannot "
                      "be told at this budget"))
    print(f"QLoRA - LoRA test accuracy, paired by seed: {verdict.text}\n  {paper}\n"
          f"QLoRA step / LoRA step: {step['QLoRA'] / step['LoRA']:.2f}x (median fwd+bwd on a "
          f"batch of 32, seed {args.seed}'s models; every layer dequantizes its weight in "
          "forward, and again in backward where an input gradient is needed)\n")
    return verdict


def bytes_table(base, nf4_model):
    """Bytes of the base's weights: linear layers alone, and the whole model. tensor_bytes
    counts each storage once; every Linear4bit holds its own copy of the 16-level code book
    (quant/linear4bit.py), so the code book is counted once per layer. What is stored is
    counted (the state dict); each layer holds besides 3 KiB of look-up tables derived from
    its code books, which a large weight does not notice and this tiny model does."""
    lin, whole, tables, n = base_bytes(base, nf4_model)  # NF4: codes, scales, code book
    parts = [(f"{n['layers']} linear weights ({n['linear']:,})", lin, n["linear"]),
             (f"whole model ({n['all']:,}; NF4: rest fp32)", whole, n["all"])]
    rows = [[what, *(f"{v:,}" for v in b.values()), f"{8 * b['NF4'] / count:.3f}",
             f"{b['fp32'] / b['NF4']:.2f}x"] for what, b, count in parts]
    print_table("Bytes of the frozen base, measured from the modules' tensors (NF4: packed codes"
                " + 8-bit scales + second-level scales + code book; held besides, not stored: "
                f"{tables:,} bytes of look-up tables)",
                ["what", "fp32", "bf16", "NF4 + dq", "bits / weight", "fp32 / NF4"], rows)
    return lin, whole


def reload_check(base, qlora_model, x, out):
    """Save the adapter, load it onto a freshly quantized base: identical outputs?"""
    directory = save_adapter(qlora_model, out / "qlora_adapter")
    same, diff = reload_gap(qlora_model, base, directory, x)
    files = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(directory.iterdir()))
    print(f"QLoRA adapter saved ({files}) and loaded onto a freshly quantized base: "
          f"outputs identical = {same} (max |diff| = {diff:.1e})\n")
    return same, directory


def deployment_table(base, qlora_model, directory, x, splits, args):
    """Test accuracy, logit difference and weight distance of the ways to ship the model."""
    shipped = shipped_models(base, qlora_model, directory)
    found = shipping_errors(qlora_model, shipped, x, splits["test"], args.device)
    results = {SHIPPED[key]: r for key, r in found.items()}
    print_table(f"Deployment of seed {args.seed}'s QLoRA model: test accuracy (one seed), max "
                f"|logit diff| from the QLoRA model ({len(x)} test prompts), distance of the "
                "adapted layers' weights from W_deq + sBA",
                ["model", f"test acc (n={len(splits['test'])} prompts)", "max |diff|",
                 "|W - (W_deq + sBA)| / |.|"],
                [[k, f"{100 * r['acc']:.1f}%", f"{r['diff']:.2e}", f"{r['dist']:.4f}"]
                 for k, r in results.items()])
    rel, changed, err_ratio = merge_findings(qlora_model, shipped, found, x)
    print(f"float merge equals the QLoRA model: max |diff| / max |logit| = {rel:.1e} "
          f"(tolerance {F32_REL_TOL:g})\n"
          f"re-quantizing changes {100 * changed:.1f}% of the adapted layers' 4-bit codes; its "
          f"rounding error is {err_ratio:.2f}x the base's own NF4 error |W_deq - W0|\n")
    return results, rel, changed, err_ratio


def speed_table(args):
    """quant.bench.benchmark_nf4 on 2 threads; --quick: a small size, threads left alone."""
    with pinned_threads(None if args.budget.bench else 2):
        r = benchmark_nf4(**(args.budget.bench or {}))
    rows = [["quantize float32 -> NF4 + dq", f"{r['quantize_MB_per_s']:.4g} MB/s", ""],
            ["dequantize NF4 -> float32", f"{r['dequantize_MB_per_s']:.4g} MB/s", ""],
            ["float32 matmul x W^T", f"{1e3 * r['matmul_s']:.2f} ms", ""],
            ["DequantMatmul (4-bit W)", f"{1e3 * r['dequant_matmul_s']:.2f} ms", ""],
            ["ratio", f"{r['ratio']:.3f}x", f"<= {SPEED_TARGET} (see Checks)"]]
    print_table(f"NF4 speed on CPU: W {r['shape'][0]} x {r['shape'][1]}, {r['tokens']} tokens, "
                f"{r['threads']} threads, medians of alternating runs (MB of float32 weight)",
                ["operation", "measured", "target"], rows)
    print("Ours next to bitsandbytes' kernels, where it is installed: python -m lessons.speed\n")
    return r


def plot(curves, spreads, lin, whole, out, window=25):
    """Every seed's loss curve of LoRA and QLoRA (thin), their test accuracies over the seeds
    (bars at the mean, whiskers min to max, a dot per seed), and the bytes of the frozen base."""
    colors = ("tab:blue", "tab:green")
    with saved_figure(out / "qlora_loss_and_bytes.png", ncols=3, figsize=(15, 4),
                      width_ratios=(2, 1, 2)) as (ax, cx, bx):
        plot_seed_curves(ax, {f"{m} train": runs for m, runs in curves.items()}, window, colors)
        ax.set(ylabel="answer-token loss", title=f"LoRA vs QLoRA on '{DEFAULT_TASK}', one line "
                                                  "per seed")
        errorbars(cx, list(METHODS), [spreads[f"{m} acc"] for m in METHODS], color=colors)
        cx.set(ylabel="test exact match (%)", title="Test accuracy over seeds")
        plot_grouped_bars(bx, {"linear weights": lin, "whole model": whole},
                          ("tab:gray",) + colors, scale=1e-6)
        bx.set(ylabel="MB", title="Bytes of the frozen base: fp32 vs bf16 vs NF4 + dq")


def stack_check(base, args):
    """Before training: three SGD steps of QLoRA and of its float twin (the same adapters, the
    base in float) on three batches of the task -- the usual advice to validate numeric
    stability on a small subset first (lora/stack_check.py). Returns the list of problems."""
    train = get_task(DEFAULT_TASK).splits(n_train=96, n_val=1, n_test=1, seed=args.seed)["train"]
    batches = [make_batch(train[i:i + 32]) for i in range(0, 96, 32)]
    report = check_qlora_stack(lora_copy(base, args.seed, quantized=True),
                               lora_copy(base, args.seed), batches, raise_on_failure=False)
    print_table("Before training: QLoRA next to its float twin, 3 SGD steps on 96 task examples",
                ["step", "loss, 4-bit base", "loss, float base", "gap", "grad cosine"],
                [[i + 1, round(q, 4), round(f, 4), f"{g:.2%}", round(c, 4)] for i, (q, f, g, c)
                 in enumerate(zip(report.loss_4bit, report.loss_float, report.loss_gaps,
                                  report.grad_cosine))])
    print("problems: " + ("; ".join(report.problems()) or "none") + "\n")
    return report.problems()


def judge(args, grad_ok, grad_diff, same, merge_rel, verdict, speed_ratio, stack_problems):
    checks = Checks(args)
    checks.must("the 4-bit stack is sound on a small subset (loss gap <= 10%, finite, gradient "
                "cosine >= 0.9)", not stack_problems, "; ".join(stack_problems) or "sound")
    checks.must("DequantMatmul: gradcheck, and the dense path's values and gradients", grad_ok,
                f"max |diff| {grad_diff:.1e}")
    checks.must("QLoRA adapter reloaded on a fresh 4-bit base: identical outputs", same)
    checks.must(f"float merge equals the QLoRA model (relative {F32_REL_TOL:g})",
                merge_rel <= F32_REL_TOL, f"{merge_rel:.1e}")
    checks.verdict(f"QLoRA within {100 * ACC_MARGIN:g} points of LoRA (QLoRA paper, Sec. 4)",
                   verdict)
    checks.shown(f"dequant-matmul <= {SPEED_TARGET}x the float32 matmul",
                 speed_ratio <= SPEED_TARGET, f"{speed_ratio:.3f}x")
    return checks.report()


def summary(spreads, verdict, losses, lin, grad_ok, grad_diff, same, merge_rel, deploy, changed,
            err_ratio, step, speed):
    gap = paired_interval(spreads["QLoRA acc"], spreads["LoRA acc"])
    accs = {f"{m.lower()}_acc{end}": getattr(spreads[f"{m} acc"], key) for m in METHODS
            for end, key in (("", "mean"), ("_lo", "lo"), ("_hi", "hi"))}
    return {
        **accs, "seeds": spreads["LoRA acc"].n, "qlora_minus_lora_points": 100 * gap.mean,
        "qlora_minus_lora_ci_lo": None if gap.lo is None else 100 * gap.lo,
        "qlora_minus_lora_ci_hi": None if gap.hi is None else 100 * gap.hi,
        "qlora_within_3_points": verdict.holds, "val_loss_fp32": losses["fp32"],
        "val_loss_nf4": losses["NF4"], "val_loss_nf4_dq": losses["NF4 + double quant"],
        "linear_bytes_fp32": lin["fp32"], "linear_bytes_nf4": lin["NF4"],
        "dequant_matmul_grad_ok": grad_ok, "dequant_matmul_max_diff": grad_diff,
        "adapter_reload_identical": same, "float_merge_rel_diff": merge_rel,
        "requant_merge_acc": deploy[MERGES["requant"]]["acc"],
        "fp32_merge_acc": deploy[MERGES["fp32"]]["acc"],
        "requant_codes_changed": changed, "requant_err_vs_base_err": err_ratio,
        "qlora_step_ratio": step["QLoRA"] / step["LoRA"], "dequant_matmul_ratio": speed["ratio"],
        "quantize_MB_per_s": speed["quantize_MB_per_s"],
        "dequantize_MB_per_s": speed["dequantize_MB_per_s"]}


def main(argv=None):
    args = parse_args(__doc__, argv, add_args,
                      budget=(lambda a: Budget(steps=a.steps), QUICK))
    out = lesson_dir(args, NAME)
    base = get_base_model(args)[0].eval()
    grad_ok, grad_diff = dequant_matmul_check(base, args.seed)
    losses, nf4_model = lm_loss_table(base, args)
    stack_problems = stack_check(base, args)
    lin, whole = bytes_table(base, nf4_model)
    spreads, curves, models = finetune_both(base, args)
    step = step_times(models, args)
    verdict = print_comparison(spreads, models, step, args)
    splits = task_splits(args)  # the first seed's, on which its models were scored
    x = make_batch(splits["test"][:64])[0].to(args.device)  # prompts + answers, for logits
    same, directory = reload_check(base, models["QLoRA"], x, out)
    deploy, merge_rel, changed, err_ratio = deployment_table(base, models["QLoRA"], directory,
                                                             x, splits, args)
    speed = speed_table(args)
    plot(curves, spreads, lin, whole, out)
    write_summary(args, NAME, summary(spreads, verdict, losses, lin, grad_ok, grad_diff, same,
                                      merge_rel, deploy, changed, err_ratio, step, speed))
    return judge(args, grad_ok, grad_diff, same, merge_rel, verdict, speed["ratio"],
                 stack_problems)


if __name__ == "__main__":
    run_main(main)
