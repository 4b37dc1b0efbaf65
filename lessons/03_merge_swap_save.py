"""Lesson 03 -- merge, swap, save: what a low-rank update buys after training.

(a) Merging: zero extra latency. An unmerged LoRA layer computes W0 x + s B (A x): two extra
skinny matmuls per adapted layer. Because the update is linear, it can be folded into the
weight once training is over (Hu et al. 2021, Sec. 4.1, "No Additional Inference Latency"):

    W_merged = W0 + s B A        then  h = W_merged x, the base layer's own cost

and unmerged again by subtracting the same s B A. Merged and unmerged outputs agree up to
float32 rounding; the timing shows the merged model running at the base model's speed.

(b) Saving: an adapter is only A and B. For our model that is 16,384 numbers -- 64 KiB in
float32, against 3.2 MiB for the whole model's 838,400 -- written as safetensors plus an
adapter_config.json in the PEFT layout (lora/io.py). Loading it onto a fresh copy of the base
gives the *bit-identical* model; loading it onto a different architecture is refused with a
message, because the config records a fingerprint of the base's module paths and shapes.

(c) Swapping, stacking, combining. One frozen base can carry several named adapters: here
"upper" (upper-case the words) and "swap" (swap two words), each trained with only its own
A, B unfrozen. Switching the active adapter switches the task, at no cost. Stacking both,

    h = W0 x + s B_up A_up x + s B_sw A_sw x,

need not be a model that does both: each update was trained with the other absent, and the
sum pushes every input in both directions -- adapter conflicts when stacking, measured below.
A "cat" combination (lora/multi.py) builds one adapter whose update is exactly
w1 dW_up + w2 dW_sw (rank 16): with weights 1, 1 it *is* the stack -- same logits, same
conflicts -- and 0.5, 0.5 halves both updates, which weakens each task rather than reconciling
them. The usual advice, "avoid overlapping target modules", is tested too: "upper" on Q only
and "swap" on V only (r = 16 each, the same budget), then stacked. The table's first rows show the
other way out: keep the adapters separate and pick one per request.
"""
import copy
from dataclasses import dataclass

import torch

from lessons.common import (Checks, get_base_model, lesson_dir, parse_args, print_table, run_main,
                            takeaway, write_summary)
from lessons.plots import matplotlib_pyplot, save_figure
from lessons.recipe import DEFAULT_TASK, finetune_config, task_splits
from lora import (add_adapter, combine_adapters, disable_adapters, load_adapter,
                  load_model_weights, merge_lora, save_adapter, save_merged_model,
                  set_active_adapters, train_only_adapter)
from tiny_gpt import GPT, GPTConfig, exact_match, make_batch
from tiny_gpt.evaluate import greedy_answers
from tiny_gpt.finetune import finetune
from tiny_gpt.util.timing import round_robin_medians

NAME = "03_merge_swap_save"
TASK_NAMES = (DEFAULT_TASK, "swap")
STEPS = 600          # per adapter: shorter than the shared 1,500-step recipe, to fit 5 minutes
# merged vs unmerged logits, relative to the largest |logit|: float32 keeps 24 bits (6e-8), and
# summing 128 products in another order moves the result by ~1e-6 of its size.
F32_REL_TOL = 1e-5
# 'cat' 1, 1 vs the stack: one rank-16 product through the fused path against two rank-8 ones
# through plain autograd -- the same sums in another order, carried through every block of two
# conflicting adapters (measured ~1e-5 of the largest |logit|): a looser bound than a merge's.
CAT_REL_TOL = 1e-4


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS      # optimizer steps per adapter
    repeats: int = 200      # timed forward passes per model, taking turns


QUICK = Budget(steps=6, repeats=5)


def train_adapter(model, name, splits, args, targets=("q_proj", "v_proj"), r=8):
    """Add adapter `name` and train it alone: every other parameter, other adapters
    included, has requires_grad = False while it trains."""
    add_adapter(model, name, targets=targets, r=r, alpha=2 * r)
    set_active_adapters(model, name)
    train_only_adapter(model, name)
    cfg = finetune_config(args, "lora", max_steps=args.budget.steps)
    result = finetune(model, splits, cfg, batch_size=32, device=args.device)
    print(f"trained adapter {name!r} on {targets}: {result.steps} steps, "
          f"{result.wall_time:.1f} s\n")
    return result


@torch.no_grad()
def merge_section(model, reference, x, args):
    """(a) merged == unmerged, and forward latency of base / unmerged / merged."""
    set_active_adapters(model, DEFAULT_TASK)
    merged = merge_lora(copy.deepcopy(model))
    unmerged_logits = model(x)[0]
    diff = (merged(x)[0] - unmerged_logits).abs().max().item()
    rel = diff / unmerged_logits.abs().max().item()

    variants = {"base model": reference, "LoRA unmerged": model, "LoRA merged": merged}
    seconds = round_robin_medians({k: (lambda m=m: m(x)) for k, m in variants.items()},
                                  args.budget.repeats, warmup=3)
    base_s = seconds["base model"]
    print_table(f"(a) Forward pass over a fixed batch {tuple(x.shape)}, no grad, median of "
                f"{args.budget.repeats} interleaved repeats",
                ["model", "ms", "x base"],
                [[k, f"{1e3 * s:.3f}", f"{s / base_s:.3f}"] for k, s in seconds.items()])
    print(f"max |merged logits - unmerged logits| = {diff:.3g}, {rel:.2g} of the largest |logit| "
          f"(float32 rounding)\n")
    return merged, seconds, diff, rel


def kb(path):
    """File size in KiB (1024 bytes)."""
    return path.stat().st_size / 1024


@torch.no_grad()
def save_section(model, merged, reference, x, out):
    """(b) file sizes, bit-identical reload, a merged export, and a refused wrong base."""
    set_active_adapters(model, DEFAULT_TASK)
    folder = save_adapter(model, out / f"adapter_{DEFAULT_TASK}", DEFAULT_TASK)
    merged_file = out / f"merged_{DEFAULT_TASK}.safetensors"
    save_merged_model(model, merged_file)
    fresh = load_adapter(copy.deepcopy(reference), folder, adapter_name=DEFAULT_TASK)
    same = torch.equal(fresh(x)[0], model(x)[0])
    plain = load_model_weights(GPT(reference.config), merged_file)
    export_diff = (plain(x)[0] - merged(x)[0]).abs().max().item()
    print_table("(b) On disk", ["file", "size"],
                [[f"{folder.name}/adapter_model.safetensors",
                  f"{kb(folder / 'adapter_model.safetensors'):.1f} KiB"],
                 [f"{folder.name}/adapter_config.json",
                  f"{kb(folder / 'adapter_config.json'):.1f} KiB"],
                 [f"{merged_file.name} (whole model, merged)",
                  f"{kb(merged_file) / 1024:.2f} MiB"]])
    print(f"adapter loaded onto a fresh copy of the base: logits bit-identical = {same}")
    print(f"merged file loaded into a plain GPT (no lora code): max |logits - merged model's| "
          f"= {export_diff:.3g}")
    other = GPT(GPTConfig(n_layer=2))
    try:
        load_adapter(other, folder)
        print("loading onto a 2-layer GPT: accepted (unexpected)")
    except ValueError as e:
        print(f"loading onto a 2-layer GPT is refused:\n  ValueError: {e}")
    print("")
    return {"adapter_kib": kb(folder / "adapter_model.safetensors"),
            "merged_mib": kb(merged_file) / 1024, "reload_bit_identical": same,
            "export_max_diff": export_diff}


def accuracies(model, tests, device):
    return {t: exact_match(model, tests[t], device) for t in TASK_NAMES}


@torch.no_grad()
def combination_section(model, tests, x, device):
    """(c) accuracy on both tasks per adapter configuration."""
    rows = {}
    with disable_adapters(model):
        rows["base (adapters off)"] = accuracies(model, tests, device)
    configs = {f"{TASK_NAMES[0]} only": [TASK_NAMES[0]], f"{TASK_NAMES[1]} only": [TASK_NAMES[1]],
               "stacked (both active)": list(TASK_NAMES)}
    for label, names in configs.items():
        set_active_adapters(model, names)
        rows[label] = accuracies(model, tests, device)
    stacked_logits = model(x)[0]
    w = {TASK_NAMES[0]: 1.0, TASK_NAMES[1]: 1.0}
    combine_adapters(model, w, "cat_1_1", method="cat")
    combine_adapters(model, {k: 0.5 for k in w}, "cat_half", method="cat")
    svd_err = combine_adapters(model, w, "svd_r8", method="linear", r=8)
    set_active_adapters(model, "cat_1_1")
    cat_diff = (model(x)[0] - stacked_logits).abs().max().item()
    cat_rel = cat_diff / stacked_logits.abs().max().item()
    for label, name in (("cat 1, 1 (= stacked)", "cat_1_1"), ("cat 0.5, 0.5", "cat_half"),
                        ("1, 1 cut to rank 8 (SVD)", "svd_r8")):
        set_active_adapters(model, name)
        rows[label] = accuracies(model, tests, device)
    return rows, cat_diff, cat_rel, max(svd_err.values())


def non_overlapping_section(reference, splits, tests, args):
    """The usual advice, "avoid overlapping target modules": the first task's adapter on Q
    only, the second's on V only (r = 16: the same trainable count as Q + V at r = 8)."""
    split = copy.deepcopy(reference)
    for task, target in zip(TASK_NAMES, ("q_proj", "v_proj")):
        train_adapter(split, task, splits[task], args, (target,), r=16)
    split.eval()
    rows = {}
    for names in ([TASK_NAMES[0]], [TASK_NAMES[1]], list(TASK_NAMES)):
        set_active_adapters(split, names)
        rows[" + ".join(names) + " (Q-only / V-only)"] = accuracies(split, tests, args.device)
    return rows


def stacked_samples(model, tests, device, n=3):
    set_active_adapters(model, list(TASK_NAMES))
    rows = []
    for t in TASK_NAMES:
        examples = tests[t][:n]
        got = greedy_answers(model.eval(), [p for p, _ in examples], 24, device)
        rows += [[t, p.split('"')[1], a.strip()[:-1], g.removesuffix('"')]
                 for (p, a), g in zip(examples, got)]
    print_table("Both adapters stacked, on held-out prompts",
                ["task", "input", "expected", "got"], rows)


def plot_accuracy(rows, seconds, path):
    plt = matplotlib_pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    labels = list(rows)
    for i, task in enumerate(TASK_NAMES):
        pos = [j + (i - 0.5) * 0.4 for j in range(len(labels))]
        ax1.bar(pos, [100 * rows[k][task] for k in labels], width=0.4, label=f"task {task}")
    ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax1.set(ylabel="test exact match (%)", ylim=(0, 105), title="Two adapters on one base")
    ax1.legend()
    ax2.bar(list(seconds), [1e3 * s for s in seconds.values()],
            color=["0.6", "tab:red", "tab:green"])
    ax2.set_xticks(range(len(seconds)), list(seconds), rotation=30, ha="right", fontsize=8)
    ax2.set(ylabel="ms per forward", title="Inference latency")
    save_figure(fig, path)


def accuracy_table(rows, tests, steps, cat_diff, svd_err):
    print_table(f"(c) Test exact match ({len(tests[DEFAULT_TASK])} held-out prompts per task; "
                f"each adapter trained {steps[DEFAULT_TASK]} steps)",
                ["active adapters", *(f"on {t}" for t in TASK_NAMES)],
                [[k, *(f"{100 * v[t]:.1f}%" for t in TASK_NAMES)] for k, v in rows.items()])
    print(f"max |logits(cat 1, 1) - logits(stacked)| = {cat_diff:.3g}; SVD to rank 8 keeps the "
          f"sum up to a relative error of {svd_err:.3f} (worst layer)\n")


def conclude(rows):
    """Stacked against each adapter alone, on each task (one seed's adapters)."""
    alone = {t: rows[f"{t} only"][t] for t in TASK_NAMES}
    stacked = {t: rows["stacked (both active)"][t] for t in TASK_NAMES}
    lost = [t for t in TASK_NAMES if stacked[t] < alone[t]]
    said = (f"stacking both costs {' and '.join(lost)} accuracy: the adapters conflict" if lost
            else "stacking both costs neither task accuracy here")
    alone_text = ", ".join(f"{100 * a:.0f}% on {t}" for t, a in alone.items())
    stacked_text = ", ".join(f"{100 * a:.0f}%" for a in stacked.values())
    takeaway(f"each adapter alone scores {alone_text}; stacked, {stacked_text}: {said} (one "
             "seed's adapters)")


def summary(seconds, merge_diff, saved, cat_diff, rows):
    stacked = rows["stacked (both active)"]
    return {"merged_over_base_latency": seconds["LoRA merged"] / seconds["base model"],
            "unmerged_over_base_latency": seconds["LoRA unmerged"] / seconds["base model"],
            "merge_max_abs_diff": merge_diff, **saved, "cat_vs_stacked_max_diff": cat_diff,
            **{f"acc_{t}_with_{t}": rows[f"{t} only"][t] for t in TASK_NAMES},
            **{f"acc_{t}_stacked": stacked[t] for t in TASK_NAMES}}


def judge(args, merge_rel, saved, cat_rel, seconds):
    checks = Checks(args)
    checks.must(f"merged = unmerged (relative {F32_REL_TOL:g})", merge_rel <= F32_REL_TOL,
                f"{merge_rel:.1e}")
    checks.must("adapter reloaded on a fresh base: bit-identical logits",
                saved["reload_bit_identical"])
    checks.must(f"'cat' 1, 1 = the stacked adapters (relative {CAT_REL_TOL:g})",
                cat_rel <= CAT_REL_TOL, f"{cat_rel:.1e}")
    ratio = seconds["LoRA merged"] / seconds["base model"]
    checks.shown("merged forward within 5% of the base model's", ratio <= 1.05, f"{ratio:.3f}x")
    return checks.report()


def main(argv=None):
    args = parse_args(__doc__, argv, budget=(Budget(), QUICK))
    out, device = lesson_dir(args, NAME), args.device
    splits = {t: task_splits(args, t) for t in TASK_NAMES}
    tests = {t: s["test"] for t, s in splits.items()}
    model, _ = get_base_model(args)
    reference = copy.deepcopy(model).eval()  # the untouched base
    steps = {task: train_adapter(model, task, splits[task], args).steps for task in TASK_NAMES}
    model.eval()
    x = make_batch(tests[DEFAULT_TASK][:32])[0].to(device)

    merged, seconds, merge_diff, merge_rel = merge_section(model, reference, x, args)
    saved = save_section(model, merged, reference, x, out)
    rows, cat_diff, cat_rel, svd_err = combination_section(model, tests, x, device)
    rows.update(non_overlapping_section(reference, splits, tests, args))
    accuracy_table(rows, tests, steps, cat_diff, svd_err)
    stacked_samples(model, tests, device)
    plot_accuracy(rows, seconds, out / "adapters.png")
    write_summary(args, NAME, summary(seconds, merge_diff, saved, cat_diff, rows))
    conclude(rows)
    return judge(args, merge_rel, saved, cat_rel, seconds)


if __name__ == "__main__":
    run_main(main)
