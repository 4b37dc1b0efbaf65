"""Lesson 09 -- stability and evaluation: what goes wrong when fine-tuning, and how to see it.

Every part is a short run (LoRA r=8 on Q and V unless it says otherwise, the default task) with
one thing changed, so the effect is measured rather than asserted. Each recipe is run once per
seed (``--seeds``, default 3: the seed picks lora_A's init, the batch order, dropout's masks and
the test prompts), shown as mean [min, max] n, and a comparison is only concluded where the
paired 95% interval of lessons/seeds.py allows it; otherwise the lesson says that no difference
is measurable at this budget. The runs are far shorter than a full fine-tune (FINETUNE_STEPS in
lessons/common.py) so that every recipe fits three times in a few minutes; every table title
says the budget. Parts (a), (b) and (e) share their runs where the recipes are equal.
Overfitting a small training set (dropout, epochs, early stopping) is lesson 14's.

(a) Divergence. AdamW moves every parameter by about lr per step whatever the gradient's size
    (m / sqrt(v) is ~ +-1), so clipping the gradient norm should not tame a too-high lr. The
    adapter update is dW = s B A with s = alpha / r, and one step changes it by about
    s (dB A + B dA) ~ s * lr * (|A| + |B|). Lowering alpha shrinks that product, but not the
    steps of A and B themselves: at lr 0.1 one step is larger than A's initial entries
    (|A| <= 1/sqrt(128) = 0.088), so A is scrambled whatever alpha is. A warmup only postpones
    the trouble if the peak lr is itself too high. The table measures which fix rescues the run
    (every seed learns, and the validation loss is measurably below the too-high lr's).
(b) Schedules. Warmup (linear 0 -> lr) then cosine decay to lr * min_lr_ratio
    (tiny_gpt.step.lr_at), versus a constant lr.
(c) Drift from the base, on the *pretraining* text (tiny_gpt/evaluate.py, measure_drift):
        KL(base || tuned) = mean_t sum_v p_base(v) (log p_base(v) - log p_tuned(v))
    and the tuned model's pretraining loss (forgetting), tracked at every validation, LoRA vs
    full fine-tuning. For LoRA the base is the same model with its adapters disabled, so the KL
    is exactly zero at step 0 (B = 0): a check, like (d).
(d) Reproducibility: the seed fixes lora_A's init, the batch order and dropout's masks, so the
    same seed gives bit-identical loss curves (read back from the JSON-lines logs).
(e) Task sensitivity: the same learning rates on two tasks, judged by the
    validation loss (an lr is chosen on validation data, never on the test set).

Run it: ``python lessons/09_stability_and_evaluation.py`` (a few minutes on a 2-core CPU);
``--quick`` for a smoke run, ``--high-lr`` to set the lr of part (a), ``--seeds N``.
"""
import copy
from dataclasses import dataclass

from lessons.common import (Checks, base_recipe, get_base_model, lesson_dir, lora_copy, parse_args,
                            positive_number, print_table, run_main, takeaway, write_summary)
from lessons.plots import plot_curves_and_spreads, plot_spread_tracks, saved_figure
from lessons.recipe import (DEFAULT_TASK, FINETUNE_LR, ShortRun, fit, scored_runs,
                            short_config, short_runs, task_splits)
from lessons.seeds import (add_seeds_flag, compare, errorbars, in_words, over_seeds,
                           print_verdicts, seeds_of)
from lora.params import base_logits
from tiny_gpt.evaluate import logits_of
from tiny_gpt.stability import DriftProbe, logged_losses, outcome, outcome_counts, run_gaps
from tiny_gpt.pretrain import corpus_ids

NAME = "09_stability_and_evaluation"
KL_TOL = 1e-6  # float32 logits of the same function computed two ways
MILLINATS = dict(scale=1000.0, unit=" millinats")  # a loss difference, shown: 0.05 = 50 millinats


@dataclass(frozen=True)
class Budget:
    sweep_steps: int = 50        # (a), (b), (e): each run of a sweep
    drift_steps: int = 60        # (c)
    repro_steps: int = 20        # (d)
    eval_every: int = 20         # steps between validations
    drift_windows: tuple = (2, 16, 128)  # (c): batches, windows per batch, window length
    high_lr: float = 0.1         # (a): the too-high learning rate (--high-lr)
    test_examples: int = 100     # test prompts scored by exact match (greedy decoding)


# --quick: every code path, a step or two each; the numbers mean nothing.
QUICK = Budget(sweep_steps=2, drift_steps=2, repro_steps=2, eval_every=2,
               drift_windows=(1, 4, 32), test_examples=4)


# --- (a) divergence and its fixes, (b) schedules ---------------------------------------
def outcomes(sweeps, recipe):
    """Each outcome (tiny_gpt.stability.outcome, the end being the last 10% of the losses) with
    the number of seeds it happened in: 'learned x3'."""
    rows = [sweeps.one(recipe, s) for s in sweeps.seeds]
    return outcome_counts([outcome(row["losses"], row["last_loss"]) for row in rows])


def curve(sweeps, recipe):
    """The training losses of the first seed's run, for a plot."""
    return sweeps.one(recipe, sweeps.seeds[0])["losses"]


def divergence_recipes(b):
    hi = b.high_lr
    return {f"lr {hi:g} constant": ShortRun(hi, constant=True),
            f"fix: lr {hi / 10:g}": ShortRun(hi / 10, constant=True),
            "fix: alpha 16 -> 1.6": ShortRun(hi, constant=True, alpha=1.6),
            f"fix: warmup {min(50, b.sweep_steps // 3)} + cosine": ShortRun(hi),
            "dropout 0.1 (a common fix)": ShortRun(hi, constant=True, dropout=0.1)}


def divergence(args, sweeps, out):
    """Each fix against the too-high lr: does every seed learn, and is the validation loss
    measurably lower? Returns {label: spreads} and the verdict of each fix."""
    recipes = divergence_recipes(args.budget)
    high = next(iter(recipes))
    res = {label: sweeps.spreads(recipe, ("val_loss", "last_loss"))
           for label, recipe in recipes.items()}
    lower = {label: compare(res[high]["val_loss"], res[label]["val_loss"], f"val loss of {high}",
                            label, **MILLINATS) for label in list(recipes)[1:]}
    print_table(f"(a) A too-high learning rate, and the fixes (LoRA r=8 Q,V, "
                f"{args.budget.sweep_steps} steps each, grad clip 1, {len(sweeps.seeds)} seeds; "
                "'learned': the last 10% of the losses average below a tenth of the first)",
                ["run", "outcome per seed", "last-10% loss", "val loss"],
                [[label, outcomes(sweeps, recipe), res[label]["last_loss"].show(fmt="{:.3f}"),
                  res[label]["val_loss"].show(fmt="{:.3f}")] for label, recipe in recipes.items()])
    said = {True: "rescues", False: "does not rescue"}
    print_verdicts(None, [f"{label}: {said[rescues(sweeps, recipes[label], v)]} the run "
                          f"({v.text})" for label, v in lower.items()])
    plot_curves_and_spreads(out / "divergence.png", "(a) too-high lr and its fixes",
                            {label: curve(sweeps, r) for label, r in recipes.items()},
                            {label: r["val_loss"] for label, r in res.items()},
                            "val loss (answer tokens)")
    return res, lower


def rescues(sweeps, recipe, lower):
    """A fix rescues the run when every seed learns and the val loss is measurably lower."""
    return bool(lower.holds) and outcomes(sweeps, recipe).startswith("learned x")


def schedule_recipes(args):
    lr, warm = FINETUNE_LR["lora"], min(50, args.budget.sweep_steps // 3)
    return {"constant lr": ShortRun(lr, constant=True), f"warmup {warm} + cosine": ShortRun(lr)}


def schedules(args, sweeps, out):
    n_test, recipes = args.budget.test_examples, schedule_recipes(args)
    res = {label: scored_runs(args, sweeps, r, n_test) for label, r in recipes.items()}
    print_table(f"(b) Warmup + cosine vs constant lr {FINETUNE_LR['lora']:g} "
                f"({args.budget.sweep_steps} steps, {len(sweeps.seeds)} seeds, n={n_test} test "
                "prompts)",
                ["schedule", "last-10% loss", "val loss", "test acc"],
                [[label, r["last_loss"].show(fmt="{:.3f}"), r["val_loss"].show(fmt="{:.3f}"),
                  r["acc"].percent()] for label, r in res.items()])
    (const, c), (cosine, w) = res.items()
    found = compare(w["acc"], c["acc"], cosine, const)
    print_verdicts(None, [found, compare(c["val_loss"], w["val_loss"], f"val loss of {const}",
                                         cosine, **MILLINATS)])
    plot_curves_and_spreads(out / "schedules.png", "(b) warmup + cosine vs constant lr",
                            {label: curve(sweeps, r) for label, r in recipes.items()},
                            {label: r["acc"] for label, r in res.items()}, "test exact match (%)",
                            100.0)
    return res, found


# --- (c) drift from the base ---------------------------------------------------------------
def drift_run(args, base, seed, method, val_ids):
    splits = task_splits(args, DEFAULT_TASK, seed)
    if method == "lora":
        model = lora_copy(base, seed)
        base_fn = base_logits(model)  # the base is the same model with its adapters off
    else:
        model, frozen = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).eval()
        base_fn = logits_of(frozen)
    probe = DriftProbe(base_fn, val_ids, args.budget.drift_windows, splits["val"], args.device)
    cfg = short_config(args, args.budget.drift_steps, args.budget.eval_every, method, seed=seed)
    found = probe.track(model, lambda evaluate: fit(model, splits["train"], cfg, args, evaluate))
    return {(method, key, step): value for (key, step), value in found.items()}


def drift(args, base, seeds):
    """{(method, metric, step): Spread} over the seeds, LoRA and full fine-tuning."""
    val_ids = corpus_ids(base_recipe(args))[1]
    tracks = over_seeds(seeds, lambda s: {k: v for m in ("lora", "full")
                                          for k, v in drift_run(args, base, s, m,
                                                                val_ids).items()})
    steps = sorted({step for _, _, step in tracks})
    keys = [(m, k) for k in ("kl", "pretrain_loss", "val_loss") for m in ("lora", "full")]
    print_table(f"(c) Drift from the base on pretraining text (LoRA lr {FINETUNE_LR['lora']:g} vs "
                f"full fine-tuning lr {FINETUNE_LR['full']:g}, {args.budget.drift_steps} steps, "
                f"{len(seeds)} seeds; base pretraining loss "
                f"{tracks['lora', 'pretrain_loss', 0].mean:.4f})",
                ["step"] + [f"{m} {k.replace('_', ' ')}" for m, k in keys],
                [[s] + [tracks[m, k, s].show(fmt="{:.3f}") for m, k in keys] for s in steps])
    end = steps[-1]
    found = (compare(tracks["full", "kl", end], tracks["lora", "kl", end], "KL of full",
                     "LoRA", **MILLINATS),
             compare(tracks["full", "pretrain_loss", end], tracks["lora", "pretrain_loss", end],
                     "pretraining loss of full", "LoRA", **MILLINATS))
    print_verdicts(None, found)
    return tracks, found


# --- (d) same seed, same curve -----------------------------------------------------------
def reproducibility(args, base, splits, out):
    """Three runs with LoRA dropout on (so the dropout masks are part of what the seed fixes);
    the loss curves are read back from the runs' JSON-lines logs."""
    runs = {}
    for label, seed in (("seed A, run 1", args.seed), ("seed A, run 2", args.seed),
                        ("seed B", args.seed + 1)):
        log = out / f"log_{label.replace(' ', '_').replace(',', '')}.jsonl"
        log.unlink(missing_ok=True)  # train() appends to a log; start each run afresh
        model = lora_copy(base, seed, dropout=0.1)
        cfg = short_config(args, args.budget.repro_steps, 0, seed=seed, log_path=str(log))
        fit(model, splits["train"], cfg, args)
        runs[label] = (logged_losses(log), [p.detach() for p in model.parameters()
                                            if p.requires_grad])
    rows = [[f"seed A, run 1 vs {other}", gap, "yes" if same else "no"]
            for other, (gap, same) in run_gaps(runs, "seed A, run 1").items()]
    print_table(f"(d) Reproducibility (LoRA dropout 0.1, {args.budget.repro_steps} steps, "
                f"seeds A={args.seed}, B={args.seed + 1}; curves read from the logs in {out})",
                ["runs", "max |loss difference|", "adapter weights identical"], rows)
    return rows


# --- (e) task sensitivity ----------------------------------------------------------------
LRS, TASKS = (3e-3, 1e-2, 3e-2), (DEFAULT_TASK, "swap")


def best_lr(val, task):
    """The lr with the lowest mean val loss on `task`, and whether each other lr's is
    measurably higher."""
    best = min(LRS, key=lambda lr: val[task, lr].mean)
    return best, [compare(val[task, lr], val[task, best], f"val loss of {task} lr {lr:g}",
                          f"lr {best:g}", **MILLINATS) for lr in LRS if lr != best]


def task_sensitivity(args, sweeps):
    """The lr is chosen on the validation loss, as any hyperparameter (choosing on the test
    set would leak it into the score), so no test prompts are decoded here."""
    val = {(t, lr): sweeps.spreads(ShortRun(lr, task=t), ("val_loss",))["val_loss"]
           for t in TASKS for lr in LRS}
    best = {t: best_lr(val, t) for t in TASKS}
    rows = [[f"{lr:g}"] + [val[t, lr].show(fmt="{:.3f}") for t in TASKS] for lr in LRS]
    rows.append(["lowest mean"] + [f"{best[t][0]:g}" for t in TASKS])
    print_table(f"(e) One learning rate, two tasks (LoRA r=8 Q,V, {args.budget.sweep_steps} "
                f"steps, warmup + cosine; {len(sweeps.seeds)} seeds)",
                ["lr"] + [f"{t} val loss" for t in TASKS], rows)
    print_verdicts(None, [v for t in TASKS for v in best[t][1]] + [task_verdict(val, best)])
    return val, best


def task_verdict(val, best):
    """'The best lr depends on the task' only where each task's best lr is measurably better
    on it than the other task's best lr."""
    (t1, (b1, _)), (t2, (b2, _)) = best.items()
    if b1 == b2:
        return f"both tasks have their lowest mean val loss at lr {b1:g}: no task dependence shown"
    shown = (compare(val[t1, b2], val[t1, b1], f"{t1} lr {b2:g}", f"lr {b1:g}").holds is True
             and compare(val[t2, b1], val[t2, b2], f"{t2} lr {b1:g}", f"lr {b2:g}").holds is True)
    return (f"the best lr {'depends' if shown else 'is not shown to depend'} on the task at this "
            "budget (each task's best lr measurably better there than the other's: "
            f"{'yes' if shown else 'no'})")


# --- plots, summary and main ----------------------------------------------------------------
def plot_drift(out, tracks):
    """Mean over the seeds per validation, whiskers from min to max."""
    steps = sorted({step for _, _, step in tracks})
    with saved_figure(out / "drift.png", ncols=3, figsize=(12, 3.6)) as axes:
        for ax, key, title in zip(axes, ("val_loss", "kl", "pretrain_loss"),
                                  ("task val loss", "KL(base || tuned), pretraining text",
                                   "pretraining val loss (forgetting)")):
            plot_spread_tracks(ax, steps, {m: [tracks[m, key, s] for s in steps]
                                           for m in ("lora", "full")})
            ax.set(title=f"{title}, {tracks['lora', key, 0].n} seeds")
        axes[2].axhline(tracks["lora", "pretrain_loss", 0].mean, color="gray", ls=":")


def plot_tasks(out, val):
    with saved_figure(out / "task_lr.png") as ax:
        errorbars(ax, [f"{t} lr {lr:g}" for t, lr in val], list(val.values()), 1.0)
        ax.set(ylabel="val loss (answer tokens)",
               title=f"(e) one lr, two tasks: {next(iter(val.values())).n} seeds")


def add_args(parser):
    parser.add_argument("--high-lr", type=positive_number, default=Budget.high_lr,
                        help="the too-high learning rate of part (a)")
    add_seeds_flag(parser)


def summarize(args, parts, repro_rows):
    """summary.json: the means over the seeds, and the exact checks' numbers."""
    div, sched, tracks, tasks = parts
    end = max(step for _, _, step in tracks)
    write_summary(args, NAME, {
        **{f"val_loss_{k}": v["val_loss"].mean for k, v in div.items()},
        **{f"acc_{k}": v["acc"].mean for k, v in sched.items()},
        **{f"{k}_{m}": tracks[m, k, end].mean for m in ("lora", "full")
           for k in ("kl", "pretrain_loss")},
        **{f"val_loss_{t}_lr{lr:g}": v.mean for (t, lr), v in tasks.items()},
        "same_seed_max_diff": repro_rows[0][1], "other_seed_max_diff": repro_rows[1][1],
        "seeds": len(seeds_of(args)), "test_n": args.budget.test_examples})


def conclude(args, lr_fix, drift_found):
    """The lesson's takeaway, from (a)'s and (c)'s intervals."""
    hi = args.budget.high_lr
    takeaway(in_words(lr_fix, f"a too-high lr ({hi:g}) is fixed by lowering it: lr {hi / 10:g} "
                              "reaches a measurably lower validation loss",
                      f"lowering the lr from {hi:g} to {hi / 10:g} made the validation loss "
                      "measurably worse", f"whether lr {hi / 10:g} beats lr {hi:g} cannot be "
                                           "told at this budget"),
             in_words(drift_found[0], "full fine-tuning drifts further from the base than "
                                      "LoRA (KL on pretraining text)",
                      "LoRA drifts further from the base than full fine-tuning (KL on "
                      "pretraining text)", "which of LoRA and full fine-tuning drifts further "
                                           "from the base cannot be told at this budget"))


def judge(args, repro_rows, tracks, lr_fix):
    checks = Checks(args)
    (_, same_diff, same_weights), (_, other_diff, _) = repro_rows  # rows of table (d)
    checks.must("same seed: the same loss curve and adapter weights",
                same_diff == 0 and same_weights == "yes", f"max |diff| {same_diff:g}")
    checks.must("another seed: another curve", other_diff > 0, f"max |diff| {other_diff:.3g}")
    kl0 = max(abs(v) for v in tracks["lora", "kl", 0].values)
    checks.must(f"KL(base || LoRA) at step 0, B = 0: zero ({KL_TOL:g}), every seed",
                kl0 <= KL_TOL, f"{kl0:.1e}")
    checks.verdict(f"lr / 10 lowers the val loss of lr {args.budget.high_lr:g}", lr_fix)
    return checks.report()


def main(argv=None):
    args = parse_args(__doc__, argv, add_args,
                      budget=(lambda a: Budget(high_lr=a.high_lr), QUICK))
    out, seeds = lesson_dir(args, NAME), seeds_of(args)
    base = get_base_model(args)[0].eval().requires_grad_(False)
    sweeps = short_runs(args, base, args.budget.sweep_steps)

    div, lower = divergence(args, sweeps, out)
    sched, _ = schedules(args, sweeps, out)
    tracks, drift_found = drift(args, base, seeds)
    plot_drift(out, tracks)
    repro_rows = reproducibility(args, base, task_splits(args), out)
    tasks, _ = task_sensitivity(args, sweeps)
    plot_tasks(out, tasks)
    summarize(args, (div, sched, tracks, tasks), repro_rows)
    lr_fix = lower[f"fix: lr {args.budget.high_lr / 10:g}"]
    conclude(args, lr_fix, drift_found)
    return judge(args, repro_rows, tracks, lr_fix)


if __name__ == "__main__":
    run_main(main)
