"""Lesson 15 -- where LoRA on Q and V is not enough: a task far from what the base learned.

Where LoRA is not enough: it is "not a universal replacement: for extreme distribution shifts,
full fine-tuning may still be necessary"; and the usual fix for underfitting: "gradually
increase rank; add adapters to more modules". The tasks of the other lessons (upper-casing,
swapping, reversing) redirect a skill the base already has -- its corpus echoes words in
quotes -- and there lesson 02 measures LoRA r=8 on Q and V against full fine-tuning. Here the
task is `atbash`: every letter mirrored in the alphabet (a <-> z, b <-> y, ...), a mapping of
26 letters that nothing in the corpus shows. The answer must be computed letter by letter, and
the attention's Q and V projections can only choose *where* to read from and what to carry; the
new per-letter mapping has to be computed somewhere, and the MLPs are where a transformer
computes per position.

The same budget for every recipe (steps, batch, schedule), over seeds, on the same test words:

    full fine-tuning                        every weight
    LoRA r=8 on Q, V                        the default of every other lesson
    LoRA r=64 on Q, V                       the rank raised 8x
    LoRA r=8 on Q, K, V, O, up, down        adapters on every linear layer
    LoRA r=64 on Q, K, V, O, up, down       both

Each recipe's peak learning rate is chosen on validation loss from two candidates by a short
probe run (a rank-64 update on every layer wants a smaller step than r=8 on two), so that no
recipe loses for a learning rate chosen for another. For each: test exact match with its
spread, and how much of the gap between LoRA r=8 on Q, V and full fine-tuning it closes,

    closed = (acc - acc_QV8) / (acc_full - acc_QV8)     (means over seeds),

with the paired intervals against both ends. The same two ends on the near task `upper`, at
the same budget, show the contrast.
"""
import copy
from dataclasses import dataclass

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, write_summary)
from lessons.plots import saved_figure
from lessons.recipe import probe_lr, short_config, task_splits, tuned_accuracy
from lessons.seeds import (Trials, add_seeds_flag, compare, errorbars, in_words, print_verdicts,
                           seeds_of)
from tiny_gpt import exact_match

NAME = "15_far_task"
FAR, NEAR = "atbash", "upper"
STEPS, PROBE_STEPS = 150, 50
EVERY_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
# label: (method, lora_copy options or None for full fine-tuning, candidate peak lrs)
RECIPES = {
    "full fine-tuning": ("full", None, (3e-4, 1e-3)),
    "LoRA r=8, Q,V": ("lora", dict(targets=QV, r=8, alpha=16), (3e-3, 1e-2)),
    "LoRA r=64, Q,V": ("lora", dict(targets=QV, r=64, alpha=128), (3e-3, 1e-2)),
    "LoRA r=8, every linear": ("lora", dict(targets=EVERY_LINEAR, r=8, alpha=16), (3e-3, 1e-2)),
    "LoRA r=64, every linear": ("lora", dict(targets=EVERY_LINEAR, r=64, alpha=128),
                                (3e-3, 1e-2)),
}
FULL, QV8 = "full fine-tuning", "LoRA r=8, Q,V"
NEAR_LRS = {FULL: 1e-3, QV8: 1e-2}  # the shared recipe's


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS              # optimizer steps per run
    probe_steps: int = PROBE_STEPS  # steps of each learning-rate probe run


QUICK = Budget(steps=4, probe_steps=2)


def build(base, seed, options):
    return copy.deepcopy(base) if options is None else lora_copy(base, seed, **options)


def probe(args, base, splits):
    """{label: the candidate lr with the lowest validation loss after a short run}."""
    chosen, rows = {}, []
    for label, (method, options, lrs) in RECIPES.items():
        chosen[label], losses = probe_lr(args, lambda: build(base, args.seed, options), lrs,
                                         splits, args.budget.probe_steps, method)
        rows.append([label, *(f"{lr:g}: {loss:.3f}" for lr, loss in losses.items()),
                     f"{chosen[label]:g}"])
    print_table(f"Learning-rate probe on '{FAR}': validation answer loss after "
                f"{args.budget.probe_steps} steps (seed {args.seed})",
                ["recipe", "candidate 1", "candidate 2", "chosen"], rows)
    return chosen


def runs_on(args, base, task, lrs):
    """Trials of the recipes on `task` at the chosen lrs: test exact match, and the mean of the
    last 10 training losses."""
    def train(label, seed):
        method, options, _ = RECIPES[label]
        cfg = short_config(args, args.budget.steps, 0, method, lr=lrs[label])
        acc, result = tuned_accuracy(args, build(base, seed, options), cfg, seed, task)
        return {"acc": acc, "loss": sum(result.losses[-10:]) / len(result.losses[-10:])}
    return Trials(seeds_of(args), train)


def far_section(args, base, lrs, base_acc):
    runs = runs_on(args, base, FAR, lrs)
    found = {label: runs.spreads(label) for label in RECIPES}
    full, qv8 = found[FULL]["acc"].mean, found[QV8]["acc"].mean
    gap = full - qv8
    print_table(f"'{FAR}': {args.budget.steps} steps, batch 32, {len(runs.seeds)} seeds (the "
                f"base: {100 * base_acc:.1f}%)",
                ["recipe", "peak lr", "test exact match", "training loss (last 10)",
                 "gap closed"],
                [[k, f"{lrs[k]:g}", v["acc"].percent(), v["loss"].show(fmt="{:.3f}"),
                  f"{(v['acc'].mean - qv8) / gap:+.0%}" if gap > 0 else "n/a"]
                 for k, v in found.items()])
    verdicts = [compare(found[FULL]["acc"], found[QV8]["acc"], FULL, QV8)]
    for label in list(RECIPES)[2:]:
        verdicts.append(compare(found[label]["acc"], found[QV8]["acc"], label, QV8))
        verdicts.append(compare(found[label]["acc"], found[FULL]["acc"], label, FULL))
    print_verdicts("What the intervals allow (test exact match, paired by seed)", verdicts)
    return found, verdicts


def near_section(args, base):
    """The two ends on the near task, with the shared recipe's lrs (1e-3 and 1e-2)."""
    runs = runs_on(args, base, NEAR, NEAR_LRS)
    found = {label: runs.spreads(label, ("acc",)) for label in NEAR_LRS}
    verdict = compare(found[QV8]["acc"], found[FULL]["acc"], QV8, FULL)
    print_table(f"The same two ends on the near task '{NEAR}' ({args.budget.steps} steps)",
                ["recipe", "peak lr", "test exact match"],
                [[k, f"{NEAR_LRS[k]:g}", v["acc"].percent()] for k, v in found.items()])
    print(f"  {verdict.text}\n")
    return found, verdict


def conclude(far_verdict, near_verdict):
    takeaway(in_words(far_verdict, f"on the far task '{FAR}' full fine-tuning beats LoRA r=8 on "
                                   "Q,V", f"on the far task '{FAR}' LoRA r=8 on Q,V beats full "
                                          "fine-tuning", f"on the far task '{FAR}' the seeds "
                                                          "cannot tell full fine-tuning from "
                                                          "LoRA r=8 on Q,V"),
             in_words(near_verdict, f"on the near task '{NEAR}' LoRA r=8 on Q,V beats full "
                                    "fine-tuning", f"on the near task '{NEAR}' full fine-tuning "
                                                   "beats LoRA r=8 on Q,V",
                      f"on the near task '{NEAR}' no difference is measurable"))


def plot(far, near, path):
    with saved_figure(path, ncols=2, figsize=(11, 3.8)) as (far_ax, near_ax):
        errorbars(far_ax, list(far), [v["acc"] for v in far.values()])
        far_ax.set(ylabel="test exact match %", title=f"'{FAR}' (far from the corpus)")
        errorbars(near_ax, list(near), [v["acc"] for v in near.values()], color="C1")
        near_ax.set(ylabel="test exact match %", title=f"'{NEAR}' (near)")


def main(argv=None):
    args = parse_args(__doc__, argv, add_seeds_flag, budget=(Budget(), QUICK))
    base, _ = get_base_model(args)
    splits = task_splits(args, FAR)
    base_acc = exact_match(base, splits["test"], args.device)
    print(f"The base model on '{FAR}': {100 * base_acc:.1f}% exact match on "
          f"{len(splits['test'])} test prompts.\n")
    lrs = probe(args, base, splits)
    far, far_verdicts = far_section(args, base, lrs, base_acc)
    near, near_verdict = near_section(args, base)
    conclude(far_verdicts[0], near_verdict)
    checks = Checks(args)
    checks.must(f"the base cannot do '{FAR}' (exact match below 5%)", base_acc < 0.05,
                f"{100 * base_acc:.1f}%")
    checks.verdict(f"on '{FAR}', full fine-tuning beats LoRA r=8 on Q,V (where LoRA is not "
                   "enough)", far_verdicts[0])
    plot(far, near, lesson_dir(args, NAME) / "far_task.png")
    write_summary(args, NAME, {**{f"acc {k}": v["acc"].mean for k, v in far.items()},
                               **{f"near acc {k}": v["acc"].mean for k, v in near.items()},
                               "base acc": base_acc})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
