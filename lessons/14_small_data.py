"""Lesson 14 -- a small instruction set: how many epochs, and what augmentation adds.

The usual advice for small instruction sets is "Epochs: 1 - few; avoid many epochs on small
instruction datasets", and the usual fixes for overfitting are "reduce epochs and learning
rate", "stop early on the validation loss" and "add dropout and data augmentation". This lesson
is the project's one home for overfitting a small training set. All are measured here on one
small training set: 64 examples of the `upper` task, batch 16, so 4 steps make one epoch
(every example seen once, in a new order; tiny_gpt.tasks.epoch_batches).

(a) Epochs. LoRA r=8 on Q and V for 40 epochs; after each one, the loss on the 64 training
examples and on 200 validation examples, and the exact match on validation and test prompts.
Overfitting would show as a validation loss that falls, bottoms out and rises again while
the training loss keeps falling; whether it does here, and how much, is what the run says.
Over seeds: the epoch of the lowest validation loss, how far it rises by the last epoch, and
the test accuracy at the best-validation epoch (what early stopping on validation, with its
weights restored, would keep; (c) runs the stopping rule itself) against the last epoch's.
The curve is one 40-epoch schedule (warmup over the first 50 steps, then cosine), so its early
epochs are not what a short run reaches: "a few epochs" is measured by runs of 1, 3 and 10
epochs, each with its own schedule over its own steps.

(b) Augmentation. The same 64 examples, plus four times as many new ones whose inputs join
the training words in combinations the set does not hold (tiny_gpt/augment.py: the answers come
from the task's own transform, so they are correct by construction, and no validation or test
word is used). With and without LoRA dropout 0.1, at one budget of steps: four recipes, their
test accuracy over seeds, and what the paired intervals allow.

(c) Early stopping. Validate after every epoch; stop after `patience` epochs without a new
best validation loss and restore the best weights (TrainConfig.patience, restore_best). The
restored weights against the weights at the stop, and against (a)'s full run, paired by seed.
"""
from dataclasses import dataclass

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, write_summary)
from lessons.plots import saved_figure
from lessons.recipe import DEFAULT_TASK, short_config, task_splits
from lessons.seeds import (add_seeds_flag, compare, errorbars, in_words, over_seeds,
                           print_verdicts, seeds_of)
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


@dataclass(frozen=True)
class Budget:
    n: int = N_SMALL              # training examples of the small set
    batch: int = BATCH
    epochs: int = EPOCHS          # (a)'s run; (c)'s most
    aug_epochs: int = AUG_EPOCHS  # (b)'s budget
    budgets: tuple = BUDGETS      # (a)'s short runs
    patience: int = 3             # (c): epochs without a new best before stopping


QUICK = Budget(n=16, batch=8, epochs=2, aug_epochs=1, budgets=(1,), patience=1)


def small_split(args, seed):
    splits = task_splits(args, DEFAULT_TASK, seed)
    return splits, splits["train"][:args.budget.n]


# --- (a) epochs ----------------------------------------------------------------------------
def epoch_run(args, base, seed, curves):
    """One seed: train for the epochs, evaluating after each -> the numbers of the tables."""
    splits, small = small_split(args, seed)
    n, batch, epochs = args.budget.n, args.budget.batch, args.budget.epochs
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
             for e in args.budget.budgets}
    return {"best_epoch": best + 1, "best_val": rows[best]["val_loss"],
            "last_val": rows[-1]["val_loss"], "acc_best": rows[best]["test_acc"],
            "acc_last": rows[-1]["test_acc"], **short,
            **{f"acc_{e}": rows[e - 1]["test_acc"] for e in SHOWN_EPOCHS if e <= len(rows)}}


def budget_run(args, base, seed, splits, small, epochs):
    """A run of `epochs` epochs with its own schedule -> test exact match at its end."""
    n, batch = args.budget.n, args.budget.batch
    model = lora_copy(base, seed)
    train(model, epoch_batches(small, batch), short_config(args, epochs * (n // batch), 0,
                                                           seed=seed), device=args.device)
    return exact_match(model, splits["test"], args.device)


def epochs_section(args, base, seeds):
    curves = []
    found = over_seeds(seeds, lambda s: epoch_run(args, base, s, curves))
    n, batch, epochs = args.budget.n, args.budget.batch, args.budget.epochs
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
           found[f"budget_{e}"].percent()] for e in args.budget.budgets)])
    verdicts = [compare(found["last_val"], found["best_val"], f"validation loss after epoch "
                        f"{epochs}", "its lowest", **NATS),
                compare(found["acc_best"], found["acc_last"], "early stopping on validation",
                        f"epoch {epochs}"),
                *(compare(found[f"budget_{e}"], found["acc_last"], f"a {e}-epoch run",
                          f"{epochs} epochs") for e in args.budget.budgets)]
    print_verdicts("What the intervals allow (paired by seed)", verdicts)
    return found, curves, verdicts


# --- (b) augmentation ----------------------------------------------------------------------
RECIPES = {"plain": (False, 0.0), "dropout 0.1": (False, 0.1), "augmented": (True, 0.0),
           "augmented + dropout 0.1": (True, 0.1)}


def augmented_set(args, small, seed):
    task = get_task(DEFAULT_TASK)
    return small + recombined(task, small, AUG_FACTOR * len(small), seed)


def augment_run(args, base, seed, augment, dropout):
    splits, small = small_split(args, seed)
    batch, epochs = args.budget.batch, args.budget.aug_epochs
    data = augmented_set(args, small, seed) if augment else small
    cfg = short_config(args, epochs * (len(small) // batch), 0, seed=seed)
    model = lora_copy(base, seed, dropout=dropout)
    train(model, epoch_batches(data, batch), cfg, device=args.device)
    return {"acc": exact_match(model, splits["test"], args.device),
            "val_loss": task_loss(model, splits["val"])}


def augmentation_section(args, base, seeds):
    found = {label: over_seeds(seeds, lambda s: augment_run(args, base, s, *options))
             for label, options in RECIPES.items()}
    n, batch, epochs = args.budget.n, args.budget.batch, args.budget.aug_epochs
    print_table(f"(b) {n} examples, +{AUG_FACTOR * n} recombined ones; {epochs * (n // batch)} "
                f"steps of batch {batch} for every recipe ({len(seeds)} seeds)",
                ["recipe", "test exact match", "validation loss"],
                [[k, v["acc"].percent(), v["val_loss"].show(fmt="{:.4f}")]
                 for k, v in found.items()])
    verdicts = [compare(found[k]["acc"], found["plain"]["acc"], k, "plain")
                for k in list(RECIPES)[1:]]
    verdicts.append(compare(found["augmented + dropout 0.1"]["acc"], found["augmented"]["acc"],
                            "augmented + dropout 0.1", "augmented"))
    print_verdicts("What the intervals allow (test exact match, paired by seed)", verdicts)
    return found, verdicts


# --- (c) early stopping --------------------------------------------------------------------
def early_stop_run(args, base, seed):
    """One seed: validate every epoch, stop after `patience` epochs without a new best, restore
    the best weights; test exact match of those and of the weights at the stop."""
    splits, small = small_split(args, seed)
    b, last = args.budget, {}
    per_epoch = b.n // b.batch

    def evaluate(m):  # the stop happens right after a validation: keep those weights
        last.update({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return {"val_loss": task_loss(m, splits["val"])}
    cfg = short_config(args, b.epochs * per_epoch, per_epoch, patience=b.patience,
                       restore_best=True, seed=seed)
    model = lora_copy(base, seed)
    res = train(model, epoch_batches(small, b.batch), cfg, evaluate, device=args.device)
    acc_best = exact_match(model, splits["test"], args.device)
    model.load_state_dict(last, strict=False)
    return {"stopped": float(res.stopped_early), "epochs": res.steps / per_epoch,
            "best_epoch": res.best_step / per_epoch, "acc_best": acc_best,
            "acc_last": exact_match(model, splits["test"], args.device)}


def early_stopping_section(args, base, seeds, full_run):
    """(c): the restored best weights against the weights at the stop and (a)'s full run."""
    found = over_seeds(seeds, lambda s: early_stop_run(args, base, s))
    b = args.budget
    print_table(f"(c) Early stopping on validation loss (patience {b.patience} epochs, at most "
                f"{b.epochs}; {len(seeds)} seeds)", ["measure", "over seeds"], [
        ["stopped early (seeds)", f"{sum(found['stopped'].values):g} of {len(seeds)}"],
        ["stopped after epoch", found["epochs"].show(fmt="{:.0f}")],
        ["best epoch", found["best_epoch"].show(fmt="{:.0f}")],
        ["test exact match, restored best weights", found["acc_best"].percent()],
        ["test exact match, weights at the stop", found["acc_last"].percent()],
        [f"test exact match, no stopping ((a), {b.epochs} epochs)",
         full_run["acc_last"].percent()]])
    verdicts = [compare(found["acc_best"], found["acc_last"], "restored best weights",
                        "weights at the stop"),
                compare(found["acc_best"], full_run["acc_last"], "early stopping",
                        f"{b.epochs} epochs without it")]
    print_verdicts("What the intervals allow (test exact match, paired by seed)", verdicts)
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


def conclude(args, epoch_verdicts, stop_verdicts):
    rose, _, *short = epoch_verdicts
    takeaway(in_words(rose, f"on {args.budget.n} examples the validation loss rises after its "
                            f"lowest point by epoch {args.budget.epochs}: it overfits",
                      "the validation loss ends below its lowest point (impossible: check)",
                      f"no rise of the validation loss is measurable by epoch "
                      f"{args.budget.epochs}"),
             in_words(stop_verdicts[1], "early stopping scores measurably higher than running "
                                        "every epoch", "running every epoch scores measurably "
                                                       "higher than early stopping",
                      "early stopping and running every epoch: no difference measurable"))


def main(argv=None):
    args = parse_args(__doc__, argv, add_seeds_flag, budget=(Budget(), QUICK))
    base, _ = get_base_model(args)
    seeds = seeds_of(args)
    checks = Checks(args)
    checks.must(f"augmented examples: {AUG_FACTOR}x new inputs of training words only, "
                "answers from the task", augmentation_is_sound(args, seeds[0]))
    epochs, curves, epoch_verdicts = epochs_section(args, base, seeds)
    augmented, aug_verdicts = augmentation_section(args, base, seeds)
    stop, stop_verdicts = early_stopping_section(args, base, seeds, epochs)
    plot(curves, augmented, lesson_dir(args, NAME) / "small_data.png")
    conclude(args, epoch_verdicts, stop_verdicts)
    write_summary(args, NAME, {"best_epoch": epochs["best_epoch"].mean,
                               "acc_best": epochs["acc_best"].mean,
                               "acc_last": epochs["acc_last"].mean,
                               "early_stop_acc": stop["acc_best"].mean,
                               **{f"acc {k}": v["acc"].mean for k, v in augmented.items()}})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
