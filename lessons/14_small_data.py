"""Lesson 14 -- a small instruction set: how many epochs, and what augmentation adds.

The seed's hyper-parameter table says "Epochs: 1 - few; avoid many epochs on small instruction
datasets", and its fixes for overfitting are "reduce epochs and learning rate" and "add dropout
and data augmentation". Both are measured here on one small training set: 64 examples of the
`upper` task, batch 16, so 4 steps make one epoch (every example seen once, in a new order;
tiny_gpt.tasks.epoch_batches).

(a) Epochs. LoRA r=8 on Q and V for 40 epochs; after each one, the loss on the 64 training
examples and on 200 validation examples, and the exact match on validation and test prompts.
Overfitting would show as a validation loss that falls, bottoms out and rises again while
the training loss keeps falling; whether it does here, and how much, is what the run says. Over seeds: the epoch of the lowest validation loss, how far it
rises by the last epoch, and the test accuracy at the best-validation epoch (what early
stopping on validation, with its weights restored, would keep; lesson 09 (d) runs the stopping
rule itself) against the last epoch's. The curve is one 40-epoch schedule (warmup over the first
50 steps, then cosine), so its early epochs are not what a short run reaches: "a few epochs"
is measured by runs of 1, 3 and 10 epochs, each with its own schedule over its own steps.

(b) Augmentation. The same 64 examples, plus four times as many new ones whose inputs join
the training words in combinations the set does not hold (tiny_gpt/augment.py: the answers come
from the task's own transform, so they are correct by construction, and no validation or test
word is used). With and without LoRA dropout 0.1, at one budget of steps: four recipes, their
test accuracy over seeds, and what the paired intervals allow.
"""
from lessons.common import (Checks, DEFAULT_TASK, get_base_model, lesson_dir, lora_copy,
                            parse_args, print_table, run_main, saved_figure, short_config,
                            task_splits, write_summary)
from lessons.seeds import add_seeds_flag, compare, errorbars, over_seeds, seeds_of
from tiny_gpt import exact_match, get_task
from tiny_gpt.augment import input_text, recombined
from tiny_gpt.evaluate import task_loss
from tiny_gpt.tasks import epoch_batches
from tiny_gpt.train import train

NAME = "14_small_data"
N_SMALL, BATCH, EPOCHS = 64, 16, 40
AUG_FACTOR = 4                # new examples per original one
AUG_EPOCHS = 24               # (b)'s budget, in epochs of the small set: 96 steps
VAL_ACC = 100                 # validation prompts scored by exact match after each epoch
SHOWN_EPOCHS = (1, 2, 3, 5, 10, 20, 40)
BUDGETS = (1, 3, 10)          # epochs of the short runs, each with its own schedule
NATS = dict(scale=1.0, unit=" nats", fmt="{:+.3f}")


def sizes(args):
    """(examples, batch, epochs, (b)'s epochs): --quick keeps 16 examples, 2 epochs."""
    return (16, 8, 2, 1) if args.quick else (N_SMALL, BATCH, EPOCHS, AUG_EPOCHS)


def small_split(args, seed):
    splits = task_splits(args, DEFAULT_TASK, seed)
    return splits, splits["train"][:sizes(args)[0]]


# --- (a) epochs ----------------------------------------------------------------------------
def epoch_run(args, base, seed, curves):
    """One seed: train for the epochs, evaluating after each -> the numbers of the tables."""
    splits, small = small_split(args, seed)
    n, batch, epochs, _ = sizes(args)
    per_epoch = n // batch

    def evaluate(m):
        return {"train_loss": task_loss(m, small), "val_loss": task_loss(m, splits["val"]),
                "val_acc": exact_match(m, splits["val"][:VAL_ACC], args.device),
                "test_acc": exact_match(m, splits["test"], args.device)}
    cfg = short_config(args, epochs * per_epoch, per_epoch, seed=seed)
    result = train(lora_copy(base, seed), epoch_batches(small, batch), cfg, evaluate,
                   device=args.device)
    rows = [metrics for _, metrics in result.evals]  # one per epoch
    curves.append(rows)
    best = min(range(len(rows)), key=lambda e: rows[e]["val_loss"])
    short = {f"budget_{e}": budget_run(args, base, seed, splits, small, e)
             for e in budgets(args)}
    return {"best_epoch": best + 1, "best_val": rows[best]["val_loss"],
            "last_val": rows[-1]["val_loss"], "acc_best": rows[best]["test_acc"],
            "acc_last": rows[-1]["test_acc"], **short,
            **{f"acc_{e}": rows[e - 1]["test_acc"] for e in SHOWN_EPOCHS if e <= len(rows)}}


def budgets(args):
    return (1,) if args.quick else BUDGETS


def budget_run(args, base, seed, splits, small, epochs):
    """A run of `epochs` epochs with its own schedule -> test exact match at its end."""
    n, batch, _, _ = sizes(args)
    model = lora_copy(base, seed)
    train(model, epoch_batches(small, batch), short_config(args, epochs * (n // batch), 0,
                                                           seed=seed), device=args.device)
    return exact_match(model, splits["test"], args.device)


def epochs_section(args, base, seeds):
    curves = []
    found = over_seeds(seeds, lambda s: epoch_run(args, base, s, curves))
    n, batch, epochs, _ = sizes(args)
    shown = [e for e in SHOWN_EPOCHS if e <= epochs]
    print_table(f"(a) LoRA r=8 on {n} examples, batch {batch}, {epochs} epochs "
                f"({len(seeds)} seeds; test exact match on 200 prompts)",
                ["after epoch", *shown], [["test exact match",
                                           *(found[f"acc_{e}"].percent() for e in shown)]])
    print_table("(a) Where overfitting begins", ["measure", "over seeds"], [
        ["epoch of the lowest validation loss", found["best_epoch"].show(fmt="{:.0f}")],
        ["lowest validation loss", found["best_val"].show(fmt="{:.4f}")],
        [f"validation loss after epoch {epochs}", found["last_val"].show(fmt="{:.4f}")],
        ["test exact match at the best-validation epoch", found["acc_best"].percent()],
        [f"test exact match after epoch {epochs}", found["acc_last"].percent()],
        *([f"test exact match of a {e}-epoch run (its own schedule)",
           found[f"budget_{e}"].percent()] for e in budgets(args))])
    verdicts = [compare(found["last_val"], found["best_val"], f"validation loss after epoch "
                        f"{epochs}", "its lowest", **NATS),
                compare(found["acc_best"], found["acc_last"], "early stopping on validation",
                        f"epoch {epochs}"),
                *(compare(found[f"budget_{e}"], found["acc_last"], f"a {e}-epoch run",
                          f"{epochs} epochs") for e in budgets(args))]
    print("What the intervals allow (paired by seed):\n  " +
          "\n  ".join(v.text for v in verdicts) + "\n")
    return found, curves, verdicts


# --- (b) augmentation ----------------------------------------------------------------------
RECIPES = {"plain": (False, 0.0), "dropout 0.1": (False, 0.1), "augmented": (True, 0.0),
           "augmented + dropout 0.1": (True, 0.1)}


def augmented_set(args, small, seed):
    task = get_task(DEFAULT_TASK)
    return small + recombined(task, small, AUG_FACTOR * len(small), seed)


def augment_run(args, base, seed, augment, dropout):
    splits, small = small_split(args, seed)
    _, batch, _, epochs = sizes(args)
    data = augmented_set(args, small, seed) if augment else small
    cfg = short_config(args, epochs * (len(small) // batch), 0, seed=seed)
    model = lora_copy(base, seed, dropout=dropout)
    train(model, epoch_batches(data, batch), cfg, device=args.device)
    return {"acc": exact_match(model, splits["test"], args.device),
            "val_loss": task_loss(model, splits["val"])}


def augmentation_section(args, base, seeds):
    found = {label: over_seeds(seeds, lambda s: augment_run(args, base, s, *options))
             for label, options in RECIPES.items()}
    n, batch, _, epochs = sizes(args)
    print_table(f"(b) {n} examples, +{AUG_FACTOR * n} recombined ones; {epochs * (n // batch)} "
                f"steps of batch {batch} for every recipe ({len(seeds)} seeds)",
                ["recipe", "test exact match", "validation loss"],
                [[k, v["acc"].percent(), v["val_loss"].show(fmt="{:.4f}")]
                 for k, v in found.items()])
    verdicts = [compare(found[k]["acc"], found["plain"]["acc"], k, "plain")
                for k in list(RECIPES)[1:]]
    verdicts.append(compare(found["augmented + dropout 0.1"]["acc"], found["augmented"]["acc"],
                            "augmented + dropout 0.1", "augmented"))
    print("What the intervals allow (test exact match, paired by seed):\n  " +
          "\n  ".join(v.text for v in verdicts) + "\n")
    return found, verdicts


def augmentation_is_sound(args, seed):
    """Every recombined example: a new input, of training words only, with the task's answer."""
    task = get_task(DEFAULT_TASK)
    splits, small = small_split(args, seed)
    new = augmented_set(args, small, seed)[len(small):]
    words = {w for e in small for w in input_text(task, e).split()}
    old = {input_text(task, e) for e in small}
    return len(new) == AUG_FACTOR * len(small) and all(
        input_text(task, e) not in old and set(input_text(task, e).split()) <= words
        and e == task.example(input_text(task, e)) for e in new)


def band(ax, curves, key, label, scale=1.0):
    """The mean over seeds per epoch, with the min-max band."""
    epochs = range(1, len(curves[0]) + 1)
    values = [[scale * rows[e][key] for rows in curves] for e in range(len(curves[0]))]
    ax.plot(epochs, [sum(v) / len(v) for v in values], label=label)
    ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)


def plot(curves, augmented, path):
    with saved_figure(path, ncols=3, figsize=(13, 3.8)) as (loss_ax, acc_ax, bar_ax):
        band(loss_ax, curves, "train_loss", "train loss")
        band(loss_ax, curves, "val_loss", "validation loss")
        loss_ax.set(xlabel="epoch", ylabel="answer loss", yscale="log",
                    title="(a) losses per epoch, mean and min-max over seeds")
        band(acc_ax, curves, "val_acc", "validation", 100)
        band(acc_ax, curves, "test_acc", "test", 100)
        acc_ax.set(xlabel="epoch", ylabel="exact match %", title="(a) exact match per epoch")
        errorbars(bar_ax, list(augmented), [v["acc"] for v in augmented.values()])
        bar_ax.set(ylabel="test exact match %", title="(b) augmentation and dropout")
        for ax in (loss_ax, acc_ax):
            ax.legend(fontsize=7)


def main(argv=None):
    args = parse_args(__doc__, argv, add_seeds_flag)
    base, _ = get_base_model(args)
    seeds = seeds_of(args)
    checks = Checks(args)
    checks.must(f"augmented examples: {AUG_FACTOR}x new inputs of training words only, "
                "answers from the task", augmentation_is_sound(args, seeds[0]))
    epochs, curves, epoch_verdicts = epochs_section(args, base, seeds)
    augmented, aug_verdicts = augmentation_section(args, base, seeds)
    plot(curves, augmented, lesson_dir(args, NAME) / "small_data.png")
    write_summary(args, NAME, {"best_epoch": epochs["best_epoch"].mean,
                               "acc_best": epochs["acc_best"].mean,
                               "acc_last": epochs["acc_last"].mean,
                               **{f"acc {k}": v["acc"].mean for k, v in augmented.items()}})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
