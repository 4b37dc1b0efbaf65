"""Lesson 12 -- after plain LoRA: DoRA, PiSSA, LoRA+ and LoftQ, measured against LoRA and QLoRA.

Four answers to two limits of plain LoRA, "small ranks may underfit" and "QLoRA needs extra
tuning":

    DoRA   (Liu et al. 2024)    W' = m * (W0 + sBA) / ||W0 + sBA||, the norm per output row:
                                LoRA on the direction, each row's length m learned on its own
                                (lora/dora.py, hand-derived backward, exact and Sec. 4.3 forms)
    PiSSA  (Meng et al. 2024)   A, B start on the top-r singular part of W0, the residual frozen
                                (lora/pissa.py): the model is still its base at step 0
    LoRA+  (Hayou et al. 2024)  B's learning rate 16x A's (TrainConfig.loraplus_lr_ratio)
    LoftQ  (Li et al. 2023)     quantize W - sBA and fit sBA to W - dequant(Q), alternately
                                (lora/loftq.py), so a 4-, 3- or 2-bit base starts closer to W

Published claims: DoRA +3.7 points over LoRA on LLaMA-7B commonsense (74.7 -> 78.4), at ~1.15x
the step time and ~1.3x the memory in PEFT's benchmark; PiSSA 67.7% -> 72.9% on GSM8K (Mistral-
7B) and faster convergence; LoRA+ 1-2% better and up to 2x faster; LoftQ's gains largest at 2
bits, where QLoRA's start fails. What a 0.84M-parameter model on a string task can show of it
is measured here over seeds, and said to be "not measurable" where the intervals say so.

1. DoRA's two backward forms on one layer: how far their gradients differ, and the bytes each
   saves for backward, next to autograd on the formula (which keeps (out, in) tensors).
2. Cost: DoRA's step time and training memory against LoRA's, side by side.
3. LoftQ: the reconstruction error ||W - dequant(Q) - sBA|| / ||W|| per iteration, at 4, 3 and
   2 bits, against plain quantization's.
4. One budget, several seeds: LoRA, DoRA, PiSSA, LoRA+ at r = 2 and 8; QLoRA vs QLoRA + LoftQ at
   4, 3 and 2 bits. Test exact match, and steps to 90% on validation prompts.
"""
import copy
from dataclasses import dataclass

import torch

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, median_step_seconds,
                            parse_args, print_table, run_main, takeaway, write_summary)
from lessons.plots import plot_loss_curves, saved_figure
from lessons.recipe import DEFAULT_TASK, TASK_BATCH, short_config, task_splits, tuned_accuracy
from lessons.seeds import Trials, add_seeds_flag, compare, errorbars, print_verdicts, seeds_of
from lora import loftq_init, lora_scaling
from lora.variants.dora import DoRAFunction, dora_reference
from tiny_gpt import exact_match, sample_batch
from tiny_gpt.evaluate import task_loss
from tiny_gpt.memory.ledger import MB, SavedTensorMeter, measure_step
from tiny_gpt.train import make_optimizer

NAME = "12_after_lora"
STEPS = 80          # optimizer steps per run: short, so that speed of learning shows
EVAL_EVERY = 10     # validation exact match on VAL_PROMPTS prompts, for steps to 90%
VAL_PROMPTS = 32
RANKS = (2, 8)
BITS = (4, 3, 2)
LOFTQ_ITERS = 5
LORAPLUS_RATIO = 16


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS      # optimizer steps per run of part 4
    repeats: int = 15       # timed steps of part 2, taking turns
    ranks: tuple = RANKS    # part 4's ranks
    bits: tuple = BITS      # part 4's bit widths


QUICK = Budget(steps=4, repeats=3, ranks=RANKS[-1:], bits=BITS[-1:])  # every code path, once


def recipes(budget):
    """{label: (lora_copy options, TrainConfig overrides)}, every one with alpha = 2r."""
    found = {}
    for r in budget.ranks:
        found[f"LoRA r={r}"] = (dict(r=r, alpha=2 * r), {})
        found[f"DoRA r={r}"] = (dict(r=r, alpha=2 * r, use_dora=True), {})
        found[f"PiSSA r={r}"] = (dict(r=r, alpha=2 * r, init_lora_weights="pissa"), {})
        found[f"LoRA+ r={r}"] = (dict(r=r, alpha=2 * r),
                                 {"loraplus_lr_ratio": LORAPLUS_RATIO})
    for bits in budget.bits:
        found[f"QLoRA {bits}-bit"] = (dict(quantized=True, bits=bits), {})
        found[f"LoftQ {bits}-bit"] = (dict(quantized=True, bits=bits, init_lora_weights="loftq",
                                           loftq_iters=LOFTQ_ITERS), {})
    return found


# --- 1. DoRA's backward forms ----------------------------------------------------------------
def dora_forms(base, args):
    """On blocks.0.attn.q_proj with a trained-looking DoRA adapter: the bytes each form saves
    for backward, and relative gradient gaps {(form, reference): max over A, B}."""
    model = lora_copy(base, args.seed, use_dora=True)
    layer = model.blocks[0].attn.q_proj
    a = layer
    with torch.no_grad():  # B and m moved away from their start, as after training
        a.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        a.lora_magnitude_vector.mul_(1.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TASK_BATCH * 24, layer.in_features, generator=gen)  # a batch's tokens
    g = torch.randn(x.shape[0], layer.out_features, generator=gen)
    inputs = (layer.base.weight, layer.base.bias, a.lora_A, a.lora_B, a.lora_magnitude_vector,
              a.scaling)
    forms = {"ours, exact": lambda: DoRAFunction.apply(x, *inputs, True),
             "ours, memory-saving (Sec. 4.3)": lambda: DoRAFunction.apply(x, *inputs, False),
             "autograd on the formula, exact": lambda: dora_reference(x, *inputs, True),
             "autograd, norm detached": lambda: dora_reference(x, *inputs, False)}
    saved, grads = {}, {}
    for name, fn in forms.items():
        with SavedTensorMeter(model) as meter:
            y = fn()
        saved[name] = meter.bytes
        grads[name] = torch.autograd.grad((g * y).sum(), [a.lora_A, a.lora_B])
    names = list(forms)
    pairs = [(names[0], names[2]), (names[1], names[3]), (names[1], names[0])]
    gaps = {pair: max(((p - q).norm() / q.norm()).item()
                      for p, q in zip(grads[pair[0]], grads[pair[1]])) for pair in pairs}
    print_table(f"1. DoRA on blocks.0.attn.q_proj, {x.shape[0]} tokens: bytes saved for "
                "backward (weights not counted)", ["form", "saved bytes"],
                [[k, f"{v:,}"] for k, v in saved.items()])
    print_table("   Relative gradient gaps (A and B, the larger)", ["form", "against", "gap"],
                [[p, q, f"{v:.1e}"] for (p, q), v in gaps.items()])
    print(saved_bytes_sentence(saved, x.shape[0], layer.in_features, layer.out_features))
    return saved, gaps


def saved_bytes_sentence(saved, N, n_in, n_out) -> str:
    """Which exact form saved fewer bytes, measured, and whether N against `in` predicted it:
    ours keeps z = x V^T (N, out) for dL/dm, autograd keeps W' (out, in)."""
    ours, theirs = saved["ours, exact"], saved["autograd on the formula, exact"]
    smaller = "ours" if ours < theirs else "autograd's" if theirs < ours else "neither"
    predicted = "ours" if N < n_in else "autograd's"
    agrees = "as" if smaller == predicted else "not as"
    return (f"Ours keeps z = x V^T ({N}x{n_out}) for dL/dm and frees V; autograd keeps W' "
            f"({n_out}x{n_in}). Measured, ours saves {ours:,} bytes and autograd {theirs:,}: "
            f"{smaller} is smaller, {agrees} N = {N} tokens against in = {n_in} predicts "
            f"({predicted}).\n")


# --- 2. cost -------------------------------------------------------------------------------
COSTED = {"LoRA": {}, "DoRA": {"use_dora": True}, "PiSSA": {"init_lora_weights": "pissa"},
          "QLoRA": {"quantized": True},
          "QLoRA + LoftQ": {"quantized": True, "init_lora_weights": "loftq"}}


def cost(base, args, splits):
    """Median step time (the recipes taking turns) and training bytes, r = 8. LoRA+ is LoRA's
    step with another lr for B, so it is not timed apart."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = [sample_batch(splits["train"], TASK_BATCH, gen)]
    runs = {}
    for name, options in COSTED.items():
        model = lora_copy(base, args.seed, **options).to(args.device).train()
        runs[name] = (model, make_optimizer(model, short_config(args, STEPS, 0)))
    repeats = args.budget.repeats
    seconds = median_step_seconds(runs, batches, repeats)
    ledgers = {k: measure_step(m, batches, o) for k, (m, o) in runs.items()}
    used = {k: training_bytes(led) for k, led in ledgers.items()}
    print_table(f"2. One training step, batch {TASK_BATCH} ({args.device}; median of {repeats}, "
                "taking turns); memory = grads + optimizer state + activations",
                ["", "ms", "time / LoRA", "activations MiB", "memory MiB", "memory / LoRA"],
                [[k, f"{1e3 * seconds[k]:.1f}", f"{seconds[k] / seconds['LoRA']:.2f}x",
                  f"{ledgers[k].activations / MB:.2f}", f"{used[k] / MB:.2f}",
                  f"{used[k] / used['LoRA']:.2f}x"] for k in runs])
    return seconds["DoRA"] / seconds["LoRA"], used["DoRA"] / used["LoRA"]


def training_bytes(ledger):
    return ledger.grads + ledger.optimizer + ledger.activations


# --- 3. LoftQ's reconstruction ----------------------------------------------------------------
def loftq_errors(base, r=8):
    """{bits: [plain, after t = 1..LOFTQ_ITERS]} for blocks.0.attn.q_proj's weight."""
    weight = base.blocks[0].attn.q_proj.weight
    found = {bits: loftq_init(weight, r, lora_scaling(r, 2 * r), bits, LOFTQ_ITERS)[3]
             for bits in BITS}
    print_table(f"3. LoftQ on blocks.0.attn.q_proj (r = {r}): ||W - dequant(Q) - sBA|| / ||W||",
                ["bits", "plain quantization", *(f"t={t}" for t in range(1, LOFTQ_ITERS + 1))],
                [[b, *(f"{e:.4f}" for e in errs)] for b, errs in found.items()])
    return found


# --- 4. one budget, several seeds -------------------------------------------------------------
def recipe_runs(base, args):
    """Trials of part 4's recipes: test exact match, steps to 90% on validation prompts, and
    the training losses (the plot shows the first seed's)."""
    steps, table = args.budget.steps, recipes(args.budget)

    def train(label, seed):
        options, overrides = table[label]
        val = task_splits(args, DEFAULT_TASK, seed)["val"][:VAL_PROMPTS]

        def evaluate(m):
            return {"val_loss": task_loss(m, val), "val_acc": exact_match(m, val, args.device)}
        cfg = short_config(args, steps, EVAL_EVERY, **overrides)
        acc, result = tuned_accuracy(args, lora_copy(base, seed, **options), cfg, seed,
                                     evaluate=evaluate)
        reached = [step for step, metrics in result.evals if metrics["val_acc"] >= 0.9]
        return {"acc": acc, "steps90": reached[0] if reached else steps + EVAL_EVERY,
                "losses": result.losses}
    return Trials(seeds_of(args), train), table


def comparison(base, args):
    runs, table = recipe_runs(base, args)
    found = {label: runs.spreads(label, ("acc", "steps90")) for label in table}
    curves = {label: runs.one(label, runs.seeds[0])["losses"] for label in table}
    steps = args.budget.steps
    print_table(f"4. '{DEFAULT_TASK}', {steps} steps, Q and V, alpha = 2r (QLoRA, LoftQ: r = 8);"
                f" steps to 90% on {VAL_PROMPTS} validation prompts (not reached: "
                f"{steps + EVAL_EVERY})", ["recipe", "test exact match", "steps to 90%"],
                [[k, v["acc"].percent(), v["steps90"].show(fmt="{:.0f}")]
                 for k, v in found.items()])
    pairs = [(f"{other} r={r}", f"LoRA r={r}") for r in args.budget.ranks
             for other in ("DoRA", "PiSSA", "LoRA+")]
    pairs += [(f"LoftQ {b}-bit", f"QLoRA {b}-bit") for b in args.budget.bits]
    verdicts = {a: compare(found[a]["acc"], found[b]["acc"], a, b) for a, b in pairs}
    print_verdicts("What the intervals allow (test exact match, paired by seed)",
                   verdicts.values())
    return found, verdicts, curves


def conclude(verdicts):
    """Which variants beat their plain counterpart, lost to it, or could not be told apart."""
    def named(holds):
        return ", ".join(k for k, v in verdicts.items() if v.holds is holds) or "none"
    takeaway(f"better than their plain counterpart (LoRA, or QLoRA for LoftQ) at this budget: "
             f"{named(True)}; worse: {named(False)}; no difference measurable: {named(None)}")


def plot(found, errors, curves, steps, path):
    with saved_figure(path, ncols=3, figsize=(18, 4)) as (ax1, ax2, ax3):
        errorbars(ax1, list(found), [v["acc"] for v in found.values()])
        ax1.set(ylabel="test exact match (%)", ylim=(0, 105),
                title=f"{steps} steps, mean [min, max] over seeds")
        for bits, errs in errors.items():
            ax2.plot(range(len(errs)), errs, marker="o", label=f"{bits}-bit")
        ax2.set(xlabel="LoftQ iteration (0: plain quantization)", ylabel="relative error",
                yscale="log", title="||W - dequant(Q) - sBA|| / ||W||")
        ax2.legend()
        plot_loss_curves(ax3, {k: v for k, v in curves.items() if "r=8" in k or "2-bit" in k},
                         k=5)
        ax3.set_title("training loss, first seed (r = 8, and 2-bit)")


def main(argv=None):
    args = parse_args(__doc__, argv, add_seeds_flag, budget=(Budget(), QUICK))
    out = lesson_dir(args, NAME)
    base, _ = get_base_model(args)
    splits = task_splits(args, DEFAULT_TASK)
    checks = Checks(args)

    saved, gaps = dora_forms(base, args)
    against_autograd = max(list(gaps.values())[:2])  # ours vs autograd, each form
    checks.must("DoRA's hand-derived backward = autograd's, both forms (relative 1e-5)",
                against_autograd <= 1e-5, f"{against_autograd:.1e}")
    time_ratio, memory_ratio = cost(base, args, splits)
    checks.shown("DoRA step time <= 1.15x LoRA's (PEFT's benchmark)", time_ratio <= 1.15,
                 f"{time_ratio:.2f}x")
    checks.shown("DoRA training memory <= 1.3x LoRA's (PEFT's benchmark)", memory_ratio <= 1.3,
                 f"{memory_ratio:.2f}x", why="activation bytes depend on batch and width")
    errors = loftq_errors(base)
    checks.must("LoftQ's error below plain quantization's at every bit width",
                all(e[-1] < e[0] for e in errors.values()),
                ", ".join(f"{b}-bit {e[0]:.3f} -> {e[-1]:.3f}" for b, e in errors.items()))
    found, verdicts, curves = comparison(copy.deepcopy(base), args)
    conclude(verdicts)
    plot(found, errors, curves, args.budget.steps, out / "after_lora.png")
    write_summary(args, NAME, {"dora_time_ratio": time_ratio, "dora_memory_ratio": memory_ratio,
                               **{f"loftq_err_{b}bit": e[-1] for b, e in errors.items()},
                               **{f"plain_err_{b}bit": e[0] for b, e in errors.items()},
                               **{f"acc_{k}": v["acc"].mean for k, v in found.items()}})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
