"""Lesson 02 -- LoRA on Q and V: teach the pretrained tiny GPT a task, then compare with full
fine-tuning.

Where the adapters go (Hu et al. 2021, Sec. 4.2 and 7.1). In every attention block the query
and value projections get a LoRA update and nothing else changes:

    q = (W_q + (alpha/r) B_q A_q) x        v = (W_v + (alpha/r) B_v A_v) x
    k, o, the MLP, the embeddings and the LayerNorms: frozen, exactly as pretrained

With r = 8 each 128 x 128 projection gets 2 * 8 * 128 = 2,048 trainable numbers; over 4 blocks
and 2 projections that is 16,384 -- under 2% of the model.

The objective does not change: the same next-token cross-entropy, here taken on
the answer tokens only,  L = - sum_t log p(y_t | y_<t, prompt).  Only the gradient's
destination changes: dL/dW0 is never formed or stored, dL/dA and dL/dB are. AdamW then keeps
two moments per *trainable* number, so the optimizer state shrinks with the trainable count.

The task ("upper"): `upper "cat dog" -> "CAT DOG"`. The base model has seen capitals in its
corpus but was never asked to produce them on cue; it scores near zero. We tune LoRA with the
shared recipe (lessons/common.py: 500 AdamW steps of 32 examples, lr 1e-2) and then do full
fine-tuning of a fresh copy of the same base with the same data, steps and schedule (lr 1e-3,
since every weight moves), and put the two side by side -- once per seed (``--seeds``, 3 by
default), since one run is one draw of lora_A's initialization, of the batch order and of the
test prompts. Which of the two scores higher is read from the paired interval of the seeds
(lessons/seeds.py); so is whether either one overfits, from its validation loss.

The knobs a workshop turns are flags: ``--targets q,k,v,o`` (or up, down), ``--r 4``,
``--alpha 8``, ``--steps 200``; their defaults are the constants TARGETS, R, ALPHA below, which
drive both what is trained and what is printed.
"""
import copy
import statistics
from dataclasses import dataclass, replace

import torch

from lessons.common import (Checks, LORA_ALPHA, LORA_R, LORA_TARGETS, get_base_model, lesson_dir,
                            lora_copy, median_step_seconds, parse_args, positive_number,
                            print_table, run_main, takeaway, target_list, targets_label,
                            whole_number, write_summary)
from lessons.plots import moving_average, saved_figure
from lessons.recipe import DEFAULT_TASK, FINETUNE_STEPS, TASK_BATCH, finetune_config, task_splits
from lessons.seeds import Trials, add_seeds_flag, compare, errorbars, in_words, seeds_of
from lora import apply_lora, count_parameters, format_table, parameter_table
from tiny_gpt import exact_match, sample_batch
from tiny_gpt.evaluate import greedy_answers
from tiny_gpt.finetune import finetune
from tiny_gpt.memory.ledger import measure_step
from tiny_gpt.train import make_optimizer

NAME = "02_lora_on_q_and_v"
TARGETS, R, ALPHA = LORA_TARGETS, LORA_R, LORA_ALPHA  # defaults of --targets, --r, --alpha
GOALS = {"trainable_fraction": 0.02, "base_acc": 0.10, "lora_acc": 0.90}


@dataclass(frozen=True)
class Budget:
    steps: int = FINETUNE_STEPS  # optimizer steps of each fine-tuning run (--steps)
    repeats: int = 30            # timed training steps of each method, taking turns


QUICK = Budget(steps=6, repeats=3)


def add_args(parser):
    parser.add_argument("--targets", type=target_list, default=TARGETS,
                        help="projections that get LoRA, comma-separated (default q,v)")
    parser.add_argument("--r", type=whole_number(1), default=R, help=f"LoRA rank (default {R})")
    parser.add_argument("--alpha", type=positive_number, default=ALPHA,
                        help=f"LoRA alpha; the update is scaled by alpha / r (default {ALPHA})")
    parser.add_argument("--steps", type=whole_number(1), default=FINETUNE_STEPS,
                        help=f"optimizer steps per run (default {FINETUNE_STEPS})")
    add_seeds_flag(parser)


def recipe_text(args) -> str:
    return f"{targets_label(args.targets)}, r = {args.r}, alpha = {args.alpha:g}"


def grouped_rows(model):
    """parameter_table with blocks 1.. folded into one row each (they repeat block 0)."""
    rows, folded = [], {}
    for path, trainable, total in parameter_table(model):
        parts = path.split(".")
        if parts[0] == "blocks" and parts[1] != "0":
            key = "blocks.1-N." + ".".join(parts[2:])
            t, n = folded.get(key, (0, 0))
            folded[key] = (t + trainable, n + total)
        else:
            rows.append((path, trainable, total))
    return rows + [(k, t, n) for k, (t, n) in folded.items()]


def show_injection(model, args):
    """Module tree before / after apply_lora, the parameter table, the freezing check."""
    print("Block 0's attention before apply_lora:\n" + str(model.blocks[0].attn) + "\n")
    apply_lora(model, targets=args.targets, r=args.r, alpha=args.alpha)
    print(f"... and after apply_lora(model, targets={args.targets}, r={args.r}, "
          f"alpha={args.alpha:g}):\n"
          + str(model.blocks[0].attn) + "\n")
    print(f"Parameters per module (blocks 1-{len(model.blocks) - 1} summed; they repeat "
          "block 0):")
    print(format_table(grouped_rows(model)) + "\n")
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    trainable = [n for n, g in names if g]
    print_table("requires_grad after apply_lora", ["parameter tensors", "count"],
                [["requires_grad = True", len(trainable)],
                 ["   ... all named *.lora_A / *.lora_B",
                  all(n.endswith(("lora_A", "lora_B")) for n in trainable)],
                 ["requires_grad = False (the base)", len(names) - len(trainable)]])
    return count_parameters(model)


def method_configs(args):
    """The shared recipe for each: LoRA's lr 1e-2, full fine-tuning's 1e-3, the same steps."""
    return {k: finetune_config(args, m, progress=False, max_steps=args.budget.steps)
            for k, m in (("LoRA", "lora"), ("full FT", "full"))}


def train_seeds(base, args, cfgs):
    """LoRA (on --targets, --r, --alpha) on a fresh copy of the base and full fine-tuning of
    another, once per seed, each on that seed's splits and batch order (lessons/seeds.py)."""
    def train_one(name, seed):
        splits = task_splits(args, DEFAULT_TASK, seed)
        model = (lora_copy(base, seed, targets=args.targets, r=args.r, alpha=args.alpha)
                 if name == "LoRA" else copy.deepcopy(base))
        print(f"seed {seed}: fine-tuning {name}, {cfgs[name].max_steps} steps, "
              f"lr {cfgs[name].lr}", flush=True)
        res = finetune(model, splits, replace(cfgs[name], seed=seed), batch_size=TASK_BATCH,
                       device=args.device)
        return {"model": model, "result": res, "acc": exact_match(model, splits["test"],
                                                                   args.device),
                "best": min(m["val_loss"] for _, m in res.evals), "last": res.evals[-1][1][
                    "val_loss"], "train_loss": statistics.fmean(res.losses[-50:]),
                "wall": res.wall_time}
    return Trials(seeds_of(args), train_one)


def step_costs(models, cfgs, batch, device, repeats):
    """AdamW's state bytes after one real step (moments + step counters, read off the tensors
    by tiny_gpt/memory/ledger.py) and the median seconds of one training step (the models
    taking turns on `batch`), on throwaway copies whose optimizers are made the way
    tiny_gpt.train makes them: over trainable parameters only."""
    runs = {}
    for name, model in models.items():
        model = copy.deepcopy(model).to(device).train()
        runs[name] = (model, make_optimizer(model, cfgs[name]))
    state_bytes = {name: measure_step(model, [batch], opt).optimizer
                   for name, (model, opt) in runs.items()}
    return state_bytes, median_step_seconds(runs, [batch], repeats)


def fine_tune_both(base, args, cfgs):
    """({name: {number: Spread}}, the last seed's models, {name: [TrainResult per seed]})."""
    trials = train_seeds(base, args, cfgs)
    found = {name: trials.spreads(name) for name in cfgs}
    models = {name: trials.one(name, trials.seeds[-1])["model"] for name in cfgs}
    results = {name: [trials.one(name, s)["result"] for s in trials.seeds] for name in cfgs}
    return found, models, results


def print_comparison(args, cfgs, counts, found, base_acc, n_test, state_bytes, step_s):
    names = list(cfgs)
    def row(label, fmt):
        return [label] + [fmt(k) for k in names]
    rows = [row(f"test exact match, n={n_test} per seed (base: {base_acc:.1%})",
                lambda k: found[k]["acc"].percent()),
            row("validation loss, best", lambda k: found[k]["best"].show(fmt="{:.4f}")),
            row("validation loss, last", lambda k: found[k]["last"].show(fmt="{:.4f}")),
            row("final train loss (mean of last 50 steps)",
                lambda k: found[k]["train_loss"].show(fmt="{:.4f}")),
            row("trainable parameters", lambda k: f"{counts[k][0]:,}"),
            row("  share of the model", lambda k: f"{counts[k][0] / counts[k][1]:.2%}"),
            row("gradient bytes (fp32)", lambda k: f"{4 * counts[k][0]:,}"),
            row("AdamW state bytes (measured)", lambda k: f"{state_bytes[k]:,}"),
            row("median step time (ms, side by side)", lambda k: f"{1e3 * step_s[k]:.1f}"),
            row("wall time of one run (s, incl. validations)", lambda k: found[k]["wall"].show()),
            ]
    print_table(f"LoRA ({recipe_text(args)}) vs full fine-tuning on '{DEFAULT_TASK}', "
                f"{cfgs['LoRA'].max_steps} steps each, batch {TASK_BATCH}, {args.device}; "
                "mean [min, max] over seeds", ["", *names], rows)


def verdicts(args, found, counts):
    """What the seeds allow us to say: which method scores higher, and whether either one's
    validation loss ended measurably above its best (overfitting within the run)."""
    order = compare(found["LoRA"]["acc"], found["full FT"]["acc"], "LoRA", "full fine-tuning")
    lines = [order.text]
    for name, v in found.items():
        rose = compare(v["last"], v["best"], "last", "best", scale=1.0, unit="", fmt="{:+.4f}")
        said = ("its validation loss ended above its best: it began to overfit"
                if rose.holds else "no rise of its validation loss is measurable")
        lines.append(f"{name}: {said} (last - best: {rose.text.split(': ', 1)[1]})")
    print("Verdicts from the seeds (paired 95% t-intervals, lessons/seeds.py):")
    print("\n".join(f"  {line}" for line in lines) + "\n")
    share = counts["LoRA"][0] / counts["LoRA"][1]
    takeaway(in_words(order, f"LoRA ({recipe_text(args)}, {share:.2%} of the weights trained) "
                             "scored higher than full fine-tuning",
                      f"full fine-tuning scored higher than LoRA ({recipe_text(args)}, "
                      f"{share:.2%} of the weights trained)",
                      f"LoRA ({recipe_text(args)}, {share:.2%} of the weights trained) and full "
                      "fine-tuning: no difference measurable at this budget"))
    return lines


def frozen_change(lora_model, reference):
    """Largest |change| of any frozen weight: a wrapped layer's W0 sits at <path>.base.*"""
    before = dict(reference.named_parameters())
    return max((p - before[n.replace(".base.", ".")]).abs().max().item()
               for n, p in lora_model.named_parameters() if not p.requires_grad)


def print_frozen_check(lora_model, reference, trainable):
    """The base did not move; what AdamW's state should be. Returns the largest change."""
    base_drift = frozen_change(lora_model, reference)
    print(f"largest change of any frozen base weight during LoRA training: {base_drift}")
    print(f"AdamW keeps 2 moments per trainable number: 2 x 4 x {trainable:,} = "
          f"{8 * trainable:,} bytes, plus a 4-byte step counter per tensor\n")
    return base_drift


def show_samples(models, examples, device):
    prompts = [p for p, _ in examples]
    answers = {name: greedy_answers(m.eval(), prompts, 24, device) for name, m in models.items()}
    unquote = lambda s: s.removesuffix('"')  # noqa: E731  (answers end with a closing quote)
    rows = [[p.split('"')[1], unquote(a.rstrip("\n"))] + [unquote(answers[n][i]) for n in models]
            for i, (p, a) in enumerate(examples)]
    print_table("Greedy completions of held-out prompts", ["input", "expected", *models], rows)


def judge(args, checks, trainable, total, base_acc, lora_acc, base_drift):
    share = trainable / total
    default = (args.targets, args.r) == (TARGETS, R)  # the 2% is a claim about Q,V at r = 8
    (checks.must if default else checks.target)(
        f"trainable share <= {GOALS['trainable_fraction']:.0%}",
        share <= GOALS["trainable_fraction"], f"{share:.2%}")
    checks.must("every frozen base weight unchanged by training", base_drift == 0,
                f"max change {base_drift:g}")
    checks.target(f"base accuracy <= {GOALS['base_acc']:.0%}", base_acc <= GOALS["base_acc"],
                  f"{base_acc:.1%}")
    checks.target(f"LoRA accuracy >= {GOALS['lora_acc']:.0%} (mean of the seeds)",
                  lora_acc.mean >= GOALS["lora_acc"], lora_acc.percent())
    return checks.report("Targets")


def plot_curves(results, found, path):
    """Every seed's training loss and validation loss, one color per method, and the test
    accuracy with its min-max whiskers."""
    with saved_figure(path, ncols=3, figsize=(13, 3.6)) as (ax1, ax2, ax3):
        for color, (name, runs) in zip(("C0", "C1"), results.items()):
            for i, res in enumerate(runs):
                k = max(1, len(res.losses) // 60)  # moving average over ~1/60 of the run
                label = name if i == 0 else None
                ax1.plot(range(k, len(res.losses) + 1), moving_average(res.losses, k),
                         color=color, lw=1, label=label)
                ax2.plot([s for s, _ in res.evals], [m["val_loss"] for _, m in res.evals],
                         "o-", color=color, ms=3, lw=1, label=label)
        ax1.set(xlabel="step", ylabel="train loss (answer tokens)", yscale="log",
                title="Fine-tuning loss, every seed")
        ax2.set(xlabel="step", ylabel="validation loss", yscale="log",
                title="Validation loss, every seed")
        errorbars(ax3, list(found), [v["acc"] for v in found.values()], color=["C0", "C1"])
        ax3.set(ylabel="test exact match (%)", ylim=(0, 102),
                title="Test accuracy: mean, min-max, seeds")
        ax1.legend()
        ax2.legend()


def summary(found, base_acc, counts, state_bytes, step_s, base_drift):
    trainable, total = counts["LoRA"]
    acc = {k: v["acc"] for k, v in found.items()}
    return {"lora_test_acc": acc["LoRA"].mean, "lora_test_acc_lo": acc["LoRA"].lo,
            "lora_test_acc_hi": acc["LoRA"].hi, "full_test_acc": acc["full FT"].mean,
            "full_test_acc_lo": acc["full FT"].lo, "full_test_acc_hi": acc["full FT"].hi,
            "seeds": acc["LoRA"].n, "base_test_acc": base_acc,
            "trainable_fraction": trainable / total,
            "lora_trainable": trainable, "full_trainable": counts["full FT"][0],
            "lora_adam_state_bytes": state_bytes["LoRA"],
            "full_adam_state_bytes": state_bytes["full FT"],
            "lora_step_ms": 1e3 * step_s["LoRA"], "full_step_ms": 1e3 * step_s["full FT"],
            "lora_wall_s": found["LoRA"]["wall"].mean, "full_wall_s": found["full FT"]["wall"].mean,
            "frozen_base_max_change": base_drift}


def main(argv=None):
    args = parse_args(__doc__, argv, add_args, budget=(lambda a: Budget(steps=a.steps), QUICK))
    test = task_splits(args, DEFAULT_TASK)["test"]
    base, _ = get_base_model(args)
    base_acc = exact_match(base, test, args.device)
    trainable, total = show_injection(copy.deepcopy(base), args)
    cfgs = method_configs(args)
    found, models, results = fine_tune_both(base, args, cfgs)
    counts = {"LoRA": (trainable, total), "full FT": count_parameters(models["full FT"])}
    first_batch = sample_batch(test, TASK_BATCH, torch.Generator().manual_seed(0))
    state_bytes, step_s = step_costs(models, cfgs, first_batch, args.device,
                                     args.budget.repeats)
    print_comparison(args, cfgs, counts, found, base_acc, len(test), state_bytes, step_s)
    verdicts(args, found, counts)
    base_drift = print_frozen_check(models["LoRA"], base, trainable)
    show_samples({"base": base, **models}, test[:6], args.device)
    plot_curves(results, found, lesson_dir(args, NAME) / "loss_curves.png")
    write_summary(args, NAME, summary(found, base_acc, counts, state_bytes, step_s, base_drift))
    return judge(args, Checks(args), trainable, total, base_acc, found["LoRA"]["acc"],
                 base_drift)


if __name__ == "__main__":
    run_main(main)
