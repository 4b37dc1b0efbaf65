"""Lesson 10 -- the methods compared: full fine-tuning, adapter tuning, prefix tuning, LoRA, QLoRA.

Five ways to teach the same frozen-or-not base the same task, each with the same data, the same
number of optimizer steps, the same batch size and schedule (lessons/common.py's recipe with a
shorter step budget so that all five, on every seed, fit in one run). What each one trains
(C = 128, 4 blocks):

    full FT   W <- W + dW for every weight                       all ~0.84M numbers
    adapters  h -> h + W_up gelu(W_down h) after attention and   2 per block, m = 8:  17,472
              after the MLP (Houlsby et al. 2019, Sec. 2.1)
    prefix    P = 10 learned keys and values per block that      P * 4 * 2 * C:       10,240
              every position attends to (Li & Liang 2021, Sec. 4)
    LoRA      W_q, W_v += (alpha/r) B A, r = 8 (Hu et al. 2021)  4 * 2 * 2 * 8 * C:   16,384
    QLoRA     LoRA on a base stored in 4-bit NF4 (Dettmers et al. 2023, Sec. 3)     16,384

The three small methods are given about the same budget of trainable numbers, so the comparison
is of *where* the numbers sit, not how many there are.

Learning rates. Full FT and LoRA use the shared recipe's peaks (1e-3 and 1e-2: every weight
moving needs a smaller step than a zero-initialized low-rank update). QLoRA trains the same
adapters as LoRA, so it gets LoRA's. Adapters and the prefix are new here, so each gets a short
probe: a few candidate peaks, a short run each on the training split, and the lowest validation
loss wins (the table is printed; pass --no-probe to skip it and use 1e-2).

Seeds. Every method is trained once per seed (--seeds, default 3): the seed draws the method's
initialization, the order of the batches and the test prompts, and all five methods share it, so
they are compared seed by seed. Accuracies are printed as mean [min, max] n=seeds, and the ranking
goes only as far as the paired 95% intervals allow (lessons/seeds.py): where an interval holds
zero, the table says no difference is measurable at this budget. The budget is the same for every
method, so each is shown where it stands after these steps, not where it would converge; a
method that learns slowly (the prefix, which every position must learn to read) pays for that in
this table.

Costs are measured, not estimated: trainable counts from the parameters; bytes of weights,
gradients, optimizer state and saved activations from the tensors (tiny_gpt/memory/) after
one real step; step time as the median of steps interleaved method by method, so that a noisy
machine slows all of them alike; inference as the median time of one forward pass over a fixed
batch, again interleaved, relative to the base model. LoRA can then be merged into W (and
QLoRA's into a float copy of the dequantized base) and timed again; adapters and a prefix
cannot: an adapter has a nonlinearity between its two matrices, and a prefix is extra keys and
values that every attention layer must read.
"""
import copy
from dataclasses import dataclass

import torch

from lessons.common import (Checks, LORA_R, get_base_model, lesson_dir, lora_copy,
                            median_step_seconds, parse_args, print_table, run_main, takeaway,
                            whole_number, write_summary)
from lessons.plots import saved_figure
from lessons.recipe import (DEFAULT_TASK, FINETUNE_LR, FINETUNE_STEPS, probe_lr, short_config,
                            tail_mean, task_splits, tuned_accuracy)
from lessons.seeds import Spread, Trials, add_seeds_flag, compare, errorbars, rank, seeds_of
from lora import count_parameters, dequantized_float_model, merge_lora
from tiny_gpt import exact_match, make_batch, sample_batch
from tiny_gpt.memory.ledger import measure_step
from tiny_gpt.methods.adapter_tuning import apply_adapter_tuning
from tiny_gpt.methods.prefix_tuning import PrefixTuning
from tiny_gpt.train import make_optimizer
from tiny_gpt.util.timing import round_robin_medians

NAME = "10_methods_compared"
MERGE_TOL = 1e-4  # float32 logits of order 10: merging only reorders the sums
METHODS = ["full", "adapter", "prefix", "lora", "qlora"]
LABELS = {"full": "full fine-tuning", "adapter": "adapter tuning", "prefix": "prefix tuning",
          "lora": f"LoRA (r={LORA_R}, Q,V)", "qlora": "QLoRA (NF4 + LoRA)"}
BOTTLENECK, N_PREFIX = 8, 10  # LoRA and QLoRA take lessons/common.py's targets, r and alpha
# 5 methods x 3 seeds x 160 steps, each seed's 5 test evaluations, and the probe keep the default
# run near five minutes on 2 cores; a budget short of convergence, where full fine-tuning, LoRA
# and QLoRA are not all at 100% and differences between methods could still show
STEPS, PROBE_STEPS = 160, 60
# A grid ending at 3e-2 left the prefix's best peak on its edge, and the prefix far below the
# other methods at the same budget; 3e-3 never won for either method
PROBE_LRS = [1e-2, 3e-2, 1e-1, 3e-1]


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS              # optimizer steps per method and seed (--steps)
    probe_steps: int = PROBE_STEPS  # steps of each learning-rate probe run (--probe-steps)
    step_repeats: int = 10          # timed training steps per method, taking turns
    forward_repeats: int = 15       # timed forward passes per model, taking turns


# --quick: 2 seeds x 5 methods, each 2 steps (under 20 s; numbers meaningless)
QUICK = Budget(steps=2, probe_steps=2, step_repeats=3, forward_repeats=3)

MERGEABLE = {"full": "nothing to merge", "adapter": "no: gelu between W_down, W_up",
             "prefix": "no: extra keys/values", "lora": "yes: W + sBA",
             "qlora": "yes, into a float copy"}
# The comparison as it is usually drawn: parameter efficiency, compute cost, flexibility, notes.
USUAL_TABLE = {"full": ("no", "High", "Moderate", "Updates all parameters"),
               "adapter": ("yes", "Medium", "High", "Bottleneck MLPs per layer"),
               "prefix": ("yes", "Low", "Medium", "Learned prompt vectors"),
               "lora": ("yes", "Low", "High", "Mergeable, simple low-rank updates"),
               "qlora": ("yes yes", "Very Low", "High", "4-bit quantization + LoRA")}


def add_args(parser):
    parser.add_argument("--steps", type=whole_number(1), default=STEPS,
                        help=f"optimizer steps per method and seed (the shared recipe's "
                             f"{FINETUNE_STEPS} is for one method; five of them, on every seed, "
                             "share this lesson's time budget)")
    parser.add_argument("--probe-steps", type=whole_number(1), default=PROBE_STEPS,
                        help="steps of each learning-rate probe run (adapters, prefix)")
    parser.add_argument("--no-probe", action="store_true", help="skip the LR probe, use 1e-2")
    add_seeds_flag(parser)


def build(method, base, seed):
    """A fresh copy of the base, prepared for `method`; only what the method trains has
    requires_grad. Its initialization is drawn with `seed` (LoRA and QLoRA with one seed start
    from the same A)."""
    if method in ("lora", "qlora"):
        return lora_copy(base, seed, quantized=method == "qlora")
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if method == "full":
        return model.requires_grad_(True)
    if method == "adapter":
        return apply_adapter_tuning(model, bottleneck=BOTTLENECK)
    return PrefixTuning(model, n_prefix=N_PREFIX)


def method_config(args, lr, steps=None, eval_every=0):
    """The shared recipe (schedule, warmup, clipping, batch 32) with this method's peak lr and
    this lesson's step budget, keeping the last weights (no validation picks a step)."""
    return short_config(args, steps or args.budget.steps, eval_every, lr=lr)


def probe_learning_rates(args, base, splits):
    """Short runs at a few peak lrs for the methods without a shared one; returns {method: lr}
    and prints the validation losses it chose from."""
    lrs = {"full": FINETUNE_LR["full"], "lora": FINETUNE_LR["lora"], "qlora": FINETUNE_LR["lora"],
           "adapter": 1e-2, "prefix": 1e-2}
    if args.no_probe:
        return lrs
    rows, steps = [], args.budget.probe_steps
    for method in ("adapter", "prefix"):
        lrs[method], losses = probe_lr(args, lambda: build(method, base, args.seed), PROBE_LRS,
                                       splits, steps)
        rows.append([LABELS[method]] + [round(losses[lr], 4) for lr in PROBE_LRS]
                    + [f"{lrs[method]:g}"])
    print_table(f"Learning-rate probe: validation answer loss after {steps} steps (seed "
                f"{args.seed}; the chosen lr is used on every seed)",
                ["method"] + [f"lr {lr:g}" for lr in PROBE_LRS] + ["chosen"], rows)
    return lrs


def training_costs(args, base, splits, lrs, repeats):
    """Per method: the memory ledger of one training step and the median step time, measured
    on throwaway builds with steps interleaved across methods."""
    gen = torch.Generator().manual_seed(args.seed)
    batch = [sample_batch(splits["train"], 32, gen)]
    runs = {}
    for m in METHODS:
        model = build(m, base, args.seed).to(args.device)
        runs[m] = (model, make_optimizer(model, method_config(args, lrs[m])))
    ledgers = {m: measure_step(model, batch, opt) for m, (model, opt) in runs.items()}
    seconds = median_step_seconds(runs, batch, repeats)
    return {m: {"ledger": ledgers[m], "step_ms": 1e3 * seconds[m],
                "trainable": count_parameters(runs[m][0])[0]} for m in METHODS}


def print_training_costs(args, costs, lrs, base_params):
    rows = []
    for m, c in costs.items():
        led = c["ledger"]
        rows.append([LABELS[m], f"{c['trainable']:,}", f"{100 * c['trainable'] / base_params:.2f}%",
                     f"{lrs[m]:g}", f"{led.weights / 1024:,.0f}", f"{led.grads / 1024:,.1f}",
                     f"{led.optimizer / 1024:,.1f}", f"{led.activations / 1024:,.0f}",
                     round(c["step_ms"], 1), round(c["step_ms"] / costs["full"]["step_ms"], 2)])
    print_table(f"Training cost per method (one step: batch 32, {args.device}; KiB)",
                ["method", "trainable", "% of model", "peak lr", "weights", "grads",
                 "optimizer", "activations", "step ms", "vs full"], rows)


def train_over_seeds(args, base, lrs):
    """Fine-tune every method on every seed with the same steps, data and schedule, each scored
    on that seed's test prompts. Returns ({name: Spread}: '<method>' test exact match and
    '<method> loss' the end of its training loss; the first seed's models, {method: model})."""
    seeds = seeds_of(args)
    print(f"Fine-tuning each method for {args.budget.steps} steps on seeds {seeds} (shared "
          f"recipe is {FINETUNE_STEPS} for one method; same data, batch and schedule for all):",
          flush=True)

    def train(method, seed):
        model = build(method, base, seed)
        acc, result = tuned_accuracy(args, model, method_config(args, lrs[method]), seed)
        print(f"  seed {seed}: {method} {100 * acc:.1f}%", flush=True)
        return {"acc": acc, "loss": tail_mean(result.losses), "model": model}
    runs = Trials(seeds, train)
    accuracy = {}
    for m in METHODS:
        found = runs.spreads(m, ("acc", "loss"))
        accuracy[m], accuracy[f"{m} loss"] = found["acc"], found["loss"]
    # the first seed's models, for the inference and merge checks
    return accuracy, {m: runs.one(m, seeds[0])["model"] for m in METHODS}


@torch.no_grad()
def merged_variants(trained, x):
    """LoRA merged into W, QLoRA merged into a float copy of its dequantized base, and the
    largest logit change that merging caused (float32 rounding only, if merging is exact)."""
    lora, qlora = trained["lora"], trained["qlora"]
    lora_merged, qlora_float = merge_lora(copy.deepcopy(lora)), dequantized_float_model(qlora)
    gaps = {"lora": (lora_merged(x)[0] - lora(x)[0]).abs().max().item(),
            "qlora": (qlora_float(x)[0] - qlora(x)[0]).abs().max().item()}
    return {"lora merged": lora_merged, "qlora merged (float)": qlora_float}, gaps


def inference_costs(base, trained, x, repeats):
    """Forward-pass latency of the base, every tuned model and the merged LoRA / QLoRA, each
    relative to the base's; and how much merging changed the logits."""
    merged, merge_gaps = merged_variants(trained, x)
    timed_models = {"base": base, **{m: trained[m] for m in METHODS}, **merged}
    with torch.no_grad():  # one forward pass over x per model, the models taking turns
        latency = round_robin_medians({name: (lambda m=model.eval(): m(x))
                                       for name, model in timed_models.items()}, repeats)
    overhead = {name: latency[name] / latency["base"] for name in timed_models}
    after_merge = {"lora": overhead["lora merged"], "qlora": overhead["qlora merged (float)"]}
    return {"latency": latency, "overhead": overhead, "after_merge": after_merge,
            "merge_gaps": merge_gaps}


def print_results(args, accuracy, inference, x, n_test):
    latency, overhead = inference["latency"], inference["overhead"]
    after_merge, merge_gaps = inference["after_merge"], inference["merge_gaps"]
    rows = [["base (no tuning)", accuracy["base"].percent(), "-",
             round(1e3 * latency["base"], 2), 1.0, "-", "-"]]
    for m in METHODS:
        merged_cell = f"{after_merge[m]:.2f}" if m in after_merge else "-"
        rows.append([LABELS[m], accuracy[m].percent(), accuracy[f"{m} loss"].show(1, "{:.4f}"),
                     round(1e3 * latency[m], 2), round(overhead[m], 2), MERGEABLE[m],
                     merged_cell])
    print_table(f"Results after {args.budget.steps} steps: test exact match (mean [min, max] "
                f"over n "
                f"seeds, each on its own {n_test} held-out prompts) and inference (seed "
                f"{args.seed}'s models, one forward pass, batch {tuple(x.shape)})",
                ["method", f"test acc (n={n_test} prompts)", "train loss (last 10%)",
                 "forward ms", "vs base", "can merge?", "vs base merged"], rows)
    print(f"merging changes the logits by at most: LoRA {merge_gaps['lora']:.2e}, "
          f"QLoRA -> float copy {merge_gaps['qlora']:.2e}\n")


def print_ranking(accuracy, n_test):
    """The best method by mean test accuracy against each other one, paired by seed: a method
    is ranked below the best only where the interval of the difference excludes zero."""
    lines = rank({LABELS[m]: accuracy[m] for m in METHODS})
    print(f"Ranking by test exact match (n={n_test} prompts per seed; paired by seed, 95% "
          "t-interval of the difference):\n  " + "\n  ".join(lines) + "\n")
    best = max(METHODS, key=lambda m: accuracy[m].mean)
    below = {m: compare(accuracy[best], accuracy[m], best, m).holds for m in METHODS if m != best}
    takeaway(f"at {accuracy[best].n} seeds and this budget, {LABELS[best]} has the highest mean "
             f"test exact match; measurably below it: "
             f"{', '.join(LABELS[m] for m, h in below.items() if h) or 'none'}; not measurably "
             f"different: {', '.join(LABELS[m] for m, h in below.items() if h is None) or 'none'}")
    return lines


def print_usual_comparison(costs, accuracy, overhead, base_params):
    full = costs["full"]
    rows = []
    for m in METHODS:
        rows.append([LABELS[m].split(" (")[0], *USUAL_TABLE[m][:3],
                     f"{100 * costs[m]['trainable'] / base_params:.2f}%",
                     round(costs[m]["step_ms"] / full["step_ms"], 2),
                     round(costs[m]["ledger"].total / full["ledger"].total, 2),
                     round(overhead[m], 2), accuracy[m].percent()])
    print_table("The usual comparison table beside what we measured",
                ["method", "usual: param eff.", "usual: compute", "usual: flexibility",
                 "trainable", "step time / full", "train memory / full", "inference / base",
                 "test acc (mean [min, max] n=random seeds)"], rows)
    print("Usual notes: " + "; ".join(f"{LABELS[m]}: {USUAL_TABLE[m][3]}" for m in METHODS)
          + "\n")


def plot(costs, accuracy, overhead, base_params, path):
    with saved_figure(path, ncols=3, figsize=(14, 4)) as (ax, mem, inf):
        errorbars(ax, [f"{m}\n{costs[m]['trainable']:,}" for m in METHODS],
                  [accuracy[m] for m in METHODS], color=[f"C{k}" for k in range(len(METHODS))])
        ax.set(ylabel="test exact match (%)", xlabel="method and its trainable parameters",
               title=f"Accuracy over {accuracy['full'].n} seeds (base: {base_params:,} "
                     "parameters)")
        bottom = [0.0] * len(METHODS)
        for kind in ["frozen", "trainable", "grads", "optimizer"]:
            values = [getattr(costs[m]["ledger"], kind) / 2 ** 20 for m in METHODS]
            mem.bar(METHODS, values, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, values)]
        for k, m in enumerate(METHODS):  # activations dwarf the rest at batch 32: written
            mem.text(k, bottom[k], f"act.\n{costs[m]['ledger'].activations / 2 ** 20:.0f}",
                     ha="center", va="bottom", fontsize=7)
        mem.set(ylabel="MiB", ylim=(0, 1.25 * max(bottom)),
                title="Training memory without activations (MiB)")
        mem.legend(fontsize=7)
        inf.barh(list(overhead), list(overhead.values()))
        inf.axvline(1.0, color="k", lw=0.8)
        inf.set(xlabel="forward time / base forward time", title="Inference cost")


def summary(args, lrs, costs, accuracy, inference):
    numbers = {"steps": args.budget.steps, "seeds": accuracy["full"].n,
               "base_acc": accuracy["base"].mean}
    for m in METHODS:
        numbers.update({f"{m}_acc": accuracy[m].mean, f"{m}_acc_lo": accuracy[m].lo,
                        f"{m}_acc_hi": accuracy[m].hi, f"{m}_trainable": costs[m]["trainable"],
                        f"{m}_step_ms": costs[m]["step_ms"], f"{m}_lr": lrs[m],
                        f"{m}_inference_vs_base": inference["overhead"][m],
                        f"{m}_optimizer_bytes": costs[m]["ledger"].optimizer})
    numbers.update({f"{m}_merged_inference_vs_base": v
                    for m, v in inference["after_merge"].items()})
    numbers.update({f"{m}_merge_max_logit_change": v
                    for m, v in inference["merge_gaps"].items()})
    return numbers


def judge(args, merge_gaps):
    checks = Checks(args)
    for method, gap in merge_gaps.items():
        checks.must(f"{method}: merging changes no logit by more than {MERGE_TOL:g}",
                    gap <= MERGE_TOL, f"{gap:.1e}")
    return checks.report()


def main(argv=None):
    args = parse_args(__doc__, argv, add_args,
                      budget=(lambda a: Budget(a.steps, a.probe_steps), QUICK))
    out = lesson_dir(args, NAME)
    base, _ = get_base_model(args)
    base.requires_grad_(False).eval()
    splits = task_splits(args, DEFAULT_TASK)  # the first seed's: probe, costs, inference
    base_params = base.num_params()
    lrs = probe_learning_rates(args, base, splits)
    costs = training_costs(args, base, splits, lrs, repeats=args.budget.step_repeats)
    print_training_costs(args, costs, lrs, base_params)
    accuracy, trained = train_over_seeds(args, base, lrs)
    accuracy["base"] = Spread((exact_match(base, splits["test"], args.device),))  # one seed
    x = make_batch(splits["test"][:64])[0].to(args.device)  # (<= 64, T): answers included
    inference = inference_costs(base, trained, x, repeats=args.budget.forward_repeats)
    print_results(args, accuracy, inference, x, len(splits["test"]))
    print_ranking(accuracy, len(splits["test"]))
    print_usual_comparison(costs, accuracy, inference["overhead"], base_params)
    plot(costs, accuracy, inference["overhead"], base_params, out / "methods_compared.png")
    write_summary(args, NAME, summary(args, lrs, costs, accuracy, inference))
    return judge(args, inference["merge_gaps"])


if __name__ == "__main__":
    run_main(main)
