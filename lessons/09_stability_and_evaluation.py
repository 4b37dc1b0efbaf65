"""Lesson 09 -- stability and evaluation: what goes wrong when fine-tuning, and how to see it.

Every part is a short run (LoRA r=8 on Q and V unless it says otherwise, the default task) with
one thing changed, so the effect is measured rather than asserted. Sweeps use fewer steps than a
full run (FINETUNE_STEPS in lessons/common.py); every table title says how many.

(a) Divergence. AdamW moves every parameter by about lr per step whatever the gradient's size
    (m / sqrt(v) is ~ +-1), so clipping the gradient norm does not tame a too-high lr. The adapter
    update is dW = s B A with s = alpha / r, and one step changes it by about
    s (dB A + B dA) ~ s * lr * (|A| + |B|). Lowering alpha shrinks that product, but not the
    steps of A and B themselves: at lr 0.1 one step is larger than A's initial entries
    (|A| <= 1/sqrt(128) = 0.088), so A is scrambled whatever alpha is. A warmup only postpones
    the trouble if the peak lr is itself too high. The table says which fix rescues the run.
(b) Schedules. Warmup (linear 0 -> lr) then cosine decay to lr * min_lr_ratio
    (tiny_gpt.train.lr_at), versus a constant lr.
(c) Dropout on a small training set (the first small_n training examples): LoRA dropout zeroes
    entries of the adapter's input x in  s B A dropout(x)  (Hu et al. 2021 keep it in their
    recipes); it is meant to shrink the gap between training and validation loss. Measured here
    with dropout 0 and 0.1.
(d) Early stopping: validate every few steps; stop after `patience` validations without a new
    best validation loss; restore the best weights.
(e) Drift from the base, on the *pretraining* text (tiny_gpt/evaluate.py, measure_drift):
        KL(base || tuned) = mean_t sum_v p_base(v) (log p_base(v) - log p_tuned(v))
    and the tuned model's pretraining loss (forgetting), tracked at every validation, LoRA vs
    full fine-tuning. For LoRA the base is the same model with its adapters disabled.
(f) Reproducibility: the seed fixes lora_A's init, the batch order and dropout's masks, so the
    same seed gives bit-identical loss curves (read back from the JSON-lines logs).
(g) Task sensitivity (the seed's Sec. 11): the same learning rates on two tasks.

Run it: ``python lessons/09_stability_and_evaluation.py`` (a few minutes on a 2-core CPU);
``--quick`` for a smoke run, ``--high-lr`` to set the lr of part (a).
"""
import copy
import json
from dataclasses import dataclass

import torch

from lessons.common import (DEFAULT_TASK, FINETUNE_LR, Checks, base_recipe, fit, get_base_model,
                            lesson_dir, lora_copy, parse_args, plot_loss_curves, positive_number,
                            print_table, run_main, saved_figure, short_config, tail_mean,
                            task_splits, write_summary)
from lora import disable_adapters
from tiny_gpt import exact_match
from tiny_gpt.evaluate import logits_of, measure_drift, task_loss
from tiny_gpt.pretrain import corpus_ids

NAME = "09_stability_and_evaluation"
KL_TOL = 1e-6  # float32 logits of the same function computed two ways


@dataclass
class Budget:
    sweep_steps: int = 200       # (a), (g): each run of a sweep
    schedule_steps: int = 250    # (b)
    small_n: int = 64            # (c), (d): training examples of the small set
    small_steps: int = 250       # (c)
    stop_steps: int = 1000       # (d): the most early stopping may run
    patience: int = 3            # (d): validations without a new best before stopping
    drift_steps: int = 300       # (e)
    repro_steps: int = 40        # (f)
    eval_every: int = 25         # steps between validations
    drift_windows: tuple = (4, 16, 128)  # (e): batches, windows per batch, window length
    high_lr: float = 0.1         # (a): the too-high learning rate
    test_examples: int = 100     # test prompts scored by exact match (greedy decoding)


# --quick: every code path, a step or two each; the numbers mean nothing.
QUICK = Budget(sweep_steps=2, schedule_steps=2, small_n=16, small_steps=2, stop_steps=6,
               patience=1, drift_steps=2, repro_steps=2, eval_every=2,
               drift_windows=(1, 4, 32), test_examples=4)


# --- runs ---------------------------------------------------------------------------------
def val_loss_eval(splits):
    return lambda m: {"val_loss": task_loss(m, splits["val"])}


def accuracy(model, splits, args):
    return exact_match(model, splits["test"][:args.budget.test_examples], args.device)


# --- (a) divergence and its fixes, (b) schedules ---------------------------------------
def verdict(losses, learned=0.1):
    """How a run went, from its loss curve: 'learned' if it ends below `learned` x its first
    loss; 'diverged' if it got there and then lost it; else 'never learned'."""
    start, end = losses[0], tail_mean(losses)
    if end != end:  # nan
        return "diverged (nan)"
    if end < learned * start:
        return "learned"
    return "diverged" if min(losses) < learned * start else "never learned"


def divergence(args, base, splits):
    b, hi = args.budget, args.budget.high_lr
    const = dict(warmup_steps=0, schedule="constant")
    runs = {f"lr {hi:g}, constant": dict(lr=hi, **const),
            f"fix: lr {hi / 10:g}": dict(lr=hi / 10, **const),
            "fix: alpha 16 -> 1.6": dict(lr=hi, alpha=1.6, **const),
            f"fix: warmup {b.sweep_steps // 3} + cosine": dict(lr=hi,
                                                                warmup_steps=b.sweep_steps // 3),
            "(seed's fix: dropout 0.1)": dict(lr=hi, dropout=0.1, **const)}
    rows, curves = [], {}
    for label, kw in runs.items():
        model = lora_copy(base, args.seed, alpha=kw.pop("alpha", 16),
                          dropout=kw.pop("dropout", 0.0))
        cfg = short_config(args, b.sweep_steps, b.eval_every, **kw)
        res = fit(model, splits["train"], cfg, args, val_loss_eval(splits))
        curves[label] = res.losses
        rows.append([label, res.losses[0], min(res.losses), tail_mean(res.losses),
                     verdict(res.losses), res.evals[-1][1]["val_loss"],
                     f"{100 * accuracy(model, splits, args):.1f}%"])
    print_table(f"(a) A too-high learning rate, and the fixes (LoRA r=8 Q,V, {b.sweep_steps} "
                f"steps each, grad clip {cfg.grad_clip:g}; 'learned': the last 10% of the losses "
                "average below a tenth of the first)",
                ["run", "first loss", "min loss", "last-10% loss", "outcome", "val loss",
                 "test acc"], rows)
    return rows, curves


def schedules(args, base, splits):
    steps, rows, curves = args.budget.schedule_steps, [], {}
    warm = min(50, steps // 3)
    for label, kw in {"constant lr": dict(warmup_steps=0, schedule="constant"),
                      f"warmup {warm} + cosine": dict(warmup_steps=warm)}.items():
        model = lora_copy(base, args.seed)
        cfg = short_config(args, steps, args.budget.eval_every, **kw)
        res = fit(model, splits["train"], cfg, args, val_loss_eval(splits))
        curves[label] = res.losses
        rows.append([label, tail_mean(res.losses[:max(1, steps // 5)], 0.5), tail_mean(res.losses),
                     res.evals[-1][1]["val_loss"], f"{100 * accuracy(model, splits, args):.1f}%"])
    print_table(f"(b) Warmup + cosine vs constant lr {FINETUNE_LR['lora']:g} ({steps} steps)",
                ["schedule", "loss at 10-20%", "last-10% loss", "val loss", "test acc"], rows)
    return rows, curves


# --- (c) dropout on a small set, (d) early stopping -----------------------------------
def small_set_eval(splits, small):
    return lambda m: {"val_loss": task_loss(m, splits["val"]), "train_loss": task_loss(m, small)}


def dropout_gap(args, base, splits, small):
    rows, curves, acc = [], {}, {}
    for p in (0.0, 0.1):
        model = lora_copy(base, args.seed, dropout=p)
        cfg = short_config(args, args.budget.small_steps, args.budget.eval_every)
        res = fit(model, small, cfg, args, small_set_eval(splits, small))
        curves[p], acc[p] = res.evals, accuracy(model, splits, args)
        last = res.evals[-1][1]
        rows.append([p, last["train_loss"], last["val_loss"], last["val_loss"] - last["train_loss"],
                     min(m["val_loss"] for _, m in res.evals), f"{100 * acc[p]:.1f}%"])
    print_table(f"(c) LoRA dropout on {len(small)} training examples ({args.budget.small_steps} "
                f"steps; losses in eval mode at the last step)",
                ["lora_dropout", "train loss", "val loss", "gap", "best val loss", "test acc"],
                rows)
    return rows, curves, acc[0.0]


def early_stopping(args, base, splits, small, full_length_acc):
    b, last = args.budget, {}
    model = lora_copy(base, args.seed)
    evaluate = small_set_eval(splits, small)

    def evaluate_and_keep(m):  # the stop happens right after a validation: keep those weights
        last.update({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return evaluate(m)

    cfg = short_config(args, b.stop_steps, b.eval_every, patience=b.patience, restore_best=True)
    res = fit(model, small, cfg, args, evaluate_and_keep)
    best_acc = accuracy(model, splits, args)
    model.load_state_dict(last, strict=False)
    last_acc = accuracy(model, splits, args)
    rows = [["stopped early / at step", f"{res.stopped_early} / {res.steps}"],
            ["best step / best val loss", f"{res.best_step} / {res.best_score:.4f}"],
            ["val loss at the stop", f"{res.evals[-1][1]['val_loss']:.4f}"],
            ["test acc, restored best weights", f"{100 * best_acc:.1f}%"],
            ["test acc, last weights (at the stop)", f"{100 * last_acc:.1f}%"],
            [f"test acc, no early stop ({b.small_steps} steps, (c))",
             f"{100 * full_length_acc:.1f}%"]]
    print_table(f"(d) Early stopping on val loss (patience {b.patience} validations x "
                f"{b.eval_every} steps, at most {b.stop_steps} steps, {len(small)} examples)",
                ["", "value"], rows)
    return res, best_acc, last_acc


# --- (e) drift from the base ---------------------------------------------------------------
def drift_run(args, base, splits, method, val_ids):
    n_batches, batch_size, seq_len = args.budget.drift_windows
    if method == "lora":
        model = lora_copy(base, args.seed)

        def base_fn(idx):  # the base is the same model with its adapters off
            with disable_adapters(model):
                return model(idx)[0]
    else:
        model, frozen = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).eval()
        base_fn = logits_of(frozen)

    def evaluate(m):
        d = measure_drift(base_fn, logits_of(m), val_ids, seq_len, n_batches, batch_size,
                          device=args.device)
        return {"val_loss": task_loss(m, splits["val"]), "kl": d["kl"],
                "pretrain_loss": d["tuned_loss"], "base_pretrain_loss": d["base_loss"]}

    model.to(args.device).eval()
    with torch.no_grad():
        start = evaluate(model)
    cfg = short_config(args, args.budget.drift_steps, args.budget.eval_every, method)
    res = fit(model, splits["train"], cfg, args, evaluate)
    return [(0, start)] + res.evals, accuracy(model, splits, args)


def drift(args, base, splits):
    val_ids = corpus_ids(base_recipe(args))[1]
    tracks = {m: drift_run(args, base, splits, m, val_ids) for m in ("lora", "full")}
    rows = [[step] + [m[k] for m in (lo, fu) for k in ("val_loss", "kl", "pretrain_loss")]
            for (step, lo), (_, fu) in zip(tracks["lora"][0], tracks["full"][0])]
    stride = max(1, len(rows) // 6)
    shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    print_table(f"(e) Drift from the base on pretraining text (LoRA lr {FINETUNE_LR['lora']:g} vs "
                f"full fine-tuning lr {FINETUNE_LR['full']:g}, {args.budget.drift_steps} steps; "
                f"base pretraining loss {rows[0][3]:.4f})",
                ["step", "LoRA val", "LoRA KL", "LoRA pretrain", "full val", "full KL",
                 "full pretrain"], shown)
    print_table("(e) Test accuracy after the drift runs", ["method", "test acc"],
                [[m, f"{100 * acc:.1f}%"] for m, (_, acc) in tracks.items()])
    return tracks


# --- (f) same seed, same curve -----------------------------------------------------------
def reproducibility(args, base, splits, out):
    """Three runs with LoRA dropout on (so the dropout masks are part of what the seed fixes);
    the loss curves are read back from the runs' JSON-lines logs."""
    curves, adapters = {}, {}
    for label, seed in (("seed A, run 1", args.seed), ("seed A, run 2", args.seed),
                        ("seed B", args.seed + 1)):
        log = out / f"log_{label.replace(' ', '_').replace(',', '')}.jsonl"
        log.unlink(missing_ok=True)  # train() appends to a log; start each run afresh
        model = lora_copy(base, seed, dropout=0.1)
        cfg = short_config(args, args.budget.repro_steps, 0, seed=seed, log_path=str(log))
        fit(model, splits["train"], cfg, args)
        curves[label] = torch.tensor([json.loads(line)["loss"] for line in open(log)])
        adapters[label] = [p.detach() for p in model.parameters() if p.requires_grad]
    rows = []
    for other in ("seed A, run 2", "seed B"):
        same = all(torch.equal(a, b) for a, b in zip(adapters["seed A, run 1"], adapters[other]))
        rows.append([f"seed A, run 1 vs {other}",
                     (curves["seed A, run 1"] - curves[other]).abs().max().item(),
                     "yes" if same else "no"])
    print_table(f"(f) Reproducibility (LoRA dropout 0.1, {args.budget.repro_steps} steps, "
                f"seeds A={args.seed}, B={args.seed + 1}; curves read from the logs in {out})",
                ["runs", "max |loss difference|", "adapter weights identical"], rows)
    return rows


# --- (g) task sensitivity ----------------------------------------------------------------
def task_sensitivity(args, base):
    lrs, tasks = (3e-3, 1e-2, 3e-2), (DEFAULT_TASK, "swap")
    acc = {}
    for task in tasks:
        splits = task_splits(args, task)
        for lr in lrs:
            model = lora_copy(base, args.seed)
            cfg = short_config(args, args.budget.sweep_steps, args.budget.eval_every, lr=lr)
            res = fit(model, splits["train"], cfg, args, val_loss_eval(splits))
            acc[task, lr] = (accuracy(model, splits, args), res.evals[-1][1]["val_loss"])
    rows = [[f"{lr:g}"] + [v for t in tasks for v in (f"{100 * acc[t, lr][0]:.1f}%",
                                                     acc[t, lr][1])] for lr in lrs]
    best = {t: max(lrs, key=lambda lr: (acc[t, lr][0], -acc[t, lr][1])) for t in tasks}
    rows.append(["best lr"] + [v for t in tasks for v in (f"{best[t]:g}", "")])
    print_table(f"(g) One learning rate, two tasks (LoRA r=8 Q,V, {args.budget.sweep_steps} "
                "steps, warmup + cosine)",
                ["lr"] + [f"{t} {w}" for t in tasks for w in ("test acc", "val loss")], rows)
    return best


# --- plots, summary and main ----------------------------------------------------------------
def plot_curves(out, name, title, curves):
    with saved_figure(out / name) as ax:
        plot_loss_curves(ax, curves)
        ax.set(title=title)


def plot_drift(out, tracks):
    with saved_figure(out / "drift.png", ncols=3, figsize=(12, 3.6)) as axes:
        for method, (evals, _) in tracks.items():
            steps = [s for s, _ in evals]
            for ax, key in zip(axes, ("val_loss", "kl", "pretrain_loss")):
                ax.plot(steps, [m[key] for _, m in evals], marker=".", label=method)
        base_loss = tracks["lora"][0][0][1]["base_pretrain_loss"]
        axes[2].axhline(base_loss, color="gray", ls=":", label="base")
        for ax, title in zip(axes, ("task val loss", "KL(base || tuned), pretraining text",
                                    "pretraining val loss (forgetting)")):
            ax.set(xlabel="step", title=title)
            ax.legend(fontsize=8)


def plot_small_set(out, gap_curves, stop_res):
    with saved_figure(out / "small_set.png") as ax:
        for p, evals in gap_curves.items():
            steps = [s for s, _ in evals]
            line, = ax.plot(steps, [m["val_loss"] for _, m in evals], label=f"val, dropout {p}")
            ax.plot(steps, [m["train_loss"] for _, m in evals], ls="--",
                    color=line.get_color(), label=f"train, dropout {p}")
        if stop_res.best_step:
            ax.axvline(stop_res.best_step, color="gray", ls=":", label="early stop: best step")
            ax.axvline(stop_res.steps, color="black", ls=":", label="early stop: stopped")
        ax.set(xlabel="step", ylabel="answer loss", yscale="log", title="Small training set")
        ax.legend(fontsize=7)


def add_args(parser):
    parser.add_argument("--high-lr", type=positive_number, default=Budget.high_lr,
                        help="the too-high learning rate of part (a)")


def summarize(args, div_rows, sched_rows, gap_rows, stop, tracks, repro_rows, best_lr):
    stop_res, best_acc, last_acc = stop
    final = {m: evals[-1][1] for m, (evals, _) in tracks.items()}
    write_summary(args, NAME, {
        "high_lr_last_loss": div_rows[0][3], "lower_lr_last_loss": div_rows[1][3],
        "cosine_vs_constant_last_loss": [sched_rows[1][2], sched_rows[0][2]],
        "dropout_gap": {str(r[0]): r[3] for r in gap_rows},
        "early_stop_step": stop_res.steps, "best_step": stop_res.best_step,
        "acc_restored_best": best_acc, "acc_last": last_acc,
        "kl_lora": final["lora"]["kl"], "kl_full": final["full"]["kl"],
        "pretrain_loss_lora": final["lora"]["pretrain_loss"],
        "pretrain_loss_full": final["full"]["pretrain_loss"],
        "acc_lora": tracks["lora"][1], "acc_full": tracks["full"][1],
        "same_seed_max_diff": repro_rows[0][1], "other_seed_max_diff": repro_rows[1][1],
        "best_lr": best_lr})


def judge(args, repro_rows, tracks):
    checks = Checks(args)
    (_, same_diff, same_weights), (_, other_diff, _) = repro_rows  # rows of table (f)
    checks.must("same seed: the same loss curve and adapter weights",
                same_diff == 0 and same_weights == "yes", f"max |diff| {same_diff:g}")
    checks.must("another seed: another curve", other_diff > 0, f"max |diff| {other_diff:.3g}")
    kl0 = tracks["lora"][0][0][1]["kl"]
    checks.must(f"KL(base || LoRA) at step 0, B = 0: zero ({KL_TOL:g})", abs(kl0) <= KL_TOL,
                f"{kl0:.1e}")
    return checks.report()


def main(argv=None):
    args = parse_args(__doc__, argv, add_args)
    args.budget = QUICK if args.quick else Budget(high_lr=args.high_lr)
    out = lesson_dir(args, NAME)
    base, _ = get_base_model(args)
    base.eval().requires_grad_(False)
    splits = task_splits(args, DEFAULT_TASK)
    small = splits["train"][:args.budget.small_n]

    div_rows, div_curves = divergence(args, base, splits)
    plot_curves(out, "divergence.png", "(a) too-high lr and its fixes", div_curves)
    sched_rows, sched_curves = schedules(args, base, splits)
    plot_curves(out, "schedules.png", "(b) warmup + cosine vs constant lr", sched_curves)
    gap_rows, gap_curves, no_stop_acc = dropout_gap(args, base, splits, small)
    stop = early_stopping(args, base, splits, small, no_stop_acc)
    plot_small_set(out, gap_curves, stop[0])
    tracks = drift(args, base, splits)
    plot_drift(out, tracks)
    repro_rows = reproducibility(args, base, splits, out)
    best_lr = task_sensitivity(args, base)
    summarize(args, div_rows, sched_rows, gap_rows, stop, tracks, repro_rows, best_lr)
    return judge(args, repro_rows, tracks)


if __name__ == "__main__":
    run_main(main)
