"""Lesson 04 -- rank, alpha and target modules: the LoRA paper's analyses in miniature.

Four questions from Hu et al. 2021, Sec. 7, each answered with fine-tunes measured in this run,
all on the "upper" task with the shared recipe's lr, but far fewer steps per run than a full
fine-tune (FINETUNE_STEPS), so that every setting can be run once per seed (``--seeds``,
default 3) within a few minutes; every table title says the budget. A setting's accuracy is
shown as mean [min, max] over the seeds, and a ranking is only printed as far as the paired
95% intervals of lessons/seeds.py allow: "no difference measurable" is an answer too. The
budget is short on purpose: a long one brings most settings near 100% on this task, where no
difference can show.

1. Rank (Sec. 7.2, Table 6). r in {1, 8, 64} on W_q, W_v with alpha = 2r, the common rule of
   thumb, so the scale s = alpha / r = 2 is the same for every rank. Rank r costs
   r (in + out) = 256 r numbers per 128 x 128 projection. A fixed s does not make the steps
   equal: part 3 measures that under this rule the first step of dW grows like sqrt(r), so on
   a short budget a larger rank also learns faster, not only holds more. The paper finds r = 1
   on Q,V already as good as r = 8; the run says whether that holds here.

2. Targets at an equal budget (Sec. 7.1, Table 5). Spend the same number of trainable
   parameters on Q; Q,V; Q,K,V,O; or all six projections (attention + MLP). The MLP's up /
   down projections are 128 -> 512 -> 128, so rank r there costs 640 r: a block's six
   projections cost 4 * 256 r + 2 * 640 r = 2,304 r. With 4 x 2,304 x 4 = 36,864 parameters
   every set gets an integer rank and exactly that count: r = 36, 18, 9, 4. The paper finds
   Q,V better than a single matrix at an equal count.

3. Scaling. The update is dW = s B A. Three rules for s as r grows:
       alpha fixed        s = alpha / r       (LoRA paper, Sec. 4.1)
       alpha = 2r         s = 2               (the common heuristic)
       rank-stabilized    s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)
   What s does to the effective learning rate: AdamW moves every entry of A and B by about lr
   per step whatever the gradient's size, so s multiplies the step that dW takes. On the first
   step B = 0, only B moves, by -lr sign(G_B), and dW_1 = -s lr sign(G_B) A: a sum of r rows of
   A with signs. A's rows are random (Kaiming-uniform, |a|^2 ~ 1/3), so the norm grows like a
   random walk, ||dW_1||_F ~ s lr sqrt(r out / 3). Then alpha / r makes the step *shrink* like
   1/sqrt(r) (a big rank learns slower), alpha = 2r makes it *grow* like sqrt(r), and alpha /
   sqrt(r) keeps it constant -- the "rank stabilization". The table measures ||dW_1|| for each.
   The rules are set to agree at r = 8 (alpha = 16 fixed, alpha = 2 sqrt(8) for rsLoRA: s = 2
   there), so that r = 8 is one shared run (part 1's) and the rules part at r = 64.

4. What the update looks like (Sec. 7.2-7.3), from the r = 8 and r = 64 adapters of part 1
   (the first seed's; and the second seed's r = 8), printed by lessons/update_shape.py:
   - subspace similarity phi(A_8, A_64, i, j) = ||U_i^T U_j||_F^2 / min(i, j), U the right-
     singular vectors of A (see lora/analysis.py): do the top directions of a rank-8 and a
     rank-64 adapter agree? (Fig. 3; and two rank-8 runs with different seeds, Fig. 4).
     Random subspaces give max(i, j) / 128 on average. A's singular values say nothing about
     what B does with each direction, so phi is also taken on dW's right-singular vectors,
     ranked by how much dW uses them.
   - amplification ||dW||_F / ||U^T W V||_F, U, V the top-r singular vectors of dW: does dW
     re-weight directions that W already uses strongly, or amplify ones W barely uses? The
     baseline projects W onto random r-dimensional directions (Table 7's "random").
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, targets_label, whole_number, write_summary)
from lessons.plots import saved_figure
from lessons.recipe import DEFAULT_TASK, finetune_config, short_config, task_splits, tuned_accuracy
from lessons.seeds import (Trials, add_seeds_flag, compare, errorbars, print_verdicts,
                           rank, seeds_of, within)
from lessons.update_shape import QV, amplification_table, plot_similarity, similarity_table
from lora import count_parameters, lora_scaling
from lora import analysis
from lora.analysis import adapter_factors, lora_param_count, rank_for_budget
from tiny_gpt import sample_batch
from tiny_gpt.evaluate import task_loss

NAME = "04_rank_alpha_targets"
TARGET_SETS = {"Q": ("q_proj",), "Q,V": QV,
               "Q,K,V,O": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "attn+MLP": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")}
BUDGET = ("attn+MLP", 4)   # the budget: all six projections at r = 4 (see the docstring)
STEPS = 80                 # optimizer steps per run: short enough that settings can differ
R_MID = 8                  # the paper's rank, and where the scaling rules of part 3 agree
LARGE = 64                 # the large rank of parts 3 and 4
RANKS = (1, R_MID, LARGE)  # part 1: a very small rank, the paper's, a large one (--ranks)
PAIR = (R_MID, LARGE)      # part 4: the adapters compared
AS_WELL = 0.02             # "does as well": within 2 points of exact match (4 of 200 prompts)
STEP_RULE_TOL = 1.5        # part 3: ||dW_1|| grows with r as predicted, within this factor


@dataclass(frozen=True)
class Budget:
    steps: int = STEPS     # optimizer steps per fine-tune (--steps)


QUICK = Budget(steps=3)


@dataclass(frozen=True)
class Spec:
    """One fine-tuning recipe; equal specs are trained once per seed and shared by the parts."""
    targets: tuple
    r: int
    alpha: float
    rslora: bool = False

    @property
    def scaling(self):
        return lora_scaling(self.r, self.alpha, self.rslora)


def add_args(parser):
    parser.add_argument("--steps", type=whole_number(1), default=STEPS,
                        help="optimizer steps per run")
    parser.add_argument("--ranks", type=whole_number(1), nargs="+", default=RANKS,
                        help=f"part 1's ranks (default {' '.join(map(str, RANKS))}; r = {R_MID} "
                             f"and {LARGE} are always run: parts 3 and 4 use them)")
    add_seeds_flag(parser)


def adapted(runs, spec, seed):
    # A's initial values depend on (seed, r), not on the seed alone: a rank-64 A would then
    # start with the rank-8 A as its first rows (one random stream) and part 4 would find
    # them similar for that reason only.
    return lora_copy(runs.base, 1000 * seed + spec.r, targets=spec.targets, r=spec.r,
                     alpha=spec.alpha, use_rslora=spec.rslora)


def fine_tunes(args, base):
    """Trials of Specs: each distinct (targets, r, s, seed) fine-tuned once -- the model
    depends on nothing else, so scaling rules that agree on s share a run."""
    def train(spec, seed):
        model = adapted(runs, spec, seed)
        cfg = short_config(args, args.budget.steps, 0)  # warmup, cosine; the last weights
        acc, res = tuned_accuracy(args, model, cfg, seed)
        model.eval()
        row = dict(trainable=count_parameters(model)[0], acc=acc,
                   val_loss=task_loss(model, task_splits(args, DEFAULT_TASK, seed)["val"]),
                   factors=adapter_factors(model.cpu()))
        print(f"  trained {targets_label(spec.targets)} r={spec.r} alpha={spec.alpha:g}"
              f"{' rslora' if spec.rslora else ''} seed={seed}: val loss "
              f"{row['val_loss']:.3f}, test acc {acc:.1%} ({res.wall_time:.1f}s)", flush=True)
        return row
    runs = Trials(seeds_of(args), train, key=lambda s: (s.targets, s.r, s.scaling))
    runs.args, runs.base, runs.steps = args, base, args.budget.steps
    runs.budget_text = (f"{runs.steps} steps per run, {len(runs.seeds)} seeds, "
                        f"n={len(task_splits(args, DEFAULT_TASK)['test'])} test prompts")
    return runs


def spread_cells(res):
    """A run's two numbers over the seeds, as table cells."""
    return [res["acc"].percent(), res["val_loss"].show(fmt="{:.3f}")]


# --- part 1: rank ------------------------------------------------------------------------------
def rank_sweep(runs, ranks):
    res = {r: runs.spreads(Spec(QV, r, 2 * r), ("acc", "val_loss")) for r in ranks}
    print_table(f"1. Rank sweep on Q,V, alpha = 2r (s = 2); {runs.budget_text}",
                ["r", "alpha", "trainable", "test exact match", "val loss"],
                [[r, 2 * r, f"{runs.one(Spec(QV, r, 2 * r), runs.seeds[0])['trainable']:,}",
                  *spread_cells(res[r])] for r in ranks])
    print_verdicts(None, rank({f"r={r}": res[r]["acc"] for r in ranks}))
    return res


# --- part 2: targets at an equal budget --------------------------------------------------------
def target_sweep(runs):
    budget = lora_param_count(runs.base, TARGET_SETS[BUDGET[0]], BUDGET[1])
    rows, res = [], {}
    for name, targets in TARGET_SETS.items():
        r = rank_for_budget(runs.base, targets, budget)
        trainable = runs.one(Spec(targets, r, 2 * r), runs.seeds[0])["trainable"]
        res[name] = {**runs.spreads(Spec(targets, r, 2 * r), ("acc", "val_loss")),
                     "trainable": trainable}
        rows.append([name, r, f"{trainable:,}", f"{trainable / budget - 1:+.1%}",
                     *spread_cells(res[name])])
    print_table(f"2. Where to put {budget:,} trainable parameters (alpha = 2r); "
                f"{runs.budget_text}",
                ["targets", "r", "trainable", "vs budget", "test exact match", "val loss"], rows)
    print_verdicts(None, rank({name: res[name]["acc"] for name in res}))
    return res, budget


# --- part 3: scaling ---------------------------------------------------------------------------
def scaling_specs(r):
    """The three scaling rules at rank r, tuned to agree (s = 2) at rank R_MID."""
    return {"alpha fixed": Spec(QV, r, 2 * R_MID), "alpha = 2r": Spec(QV, r, 2 * r),
            "rsLoRA": Spec(QV, r, 2 * math.sqrt(R_MID), rslora=True)}


def first_step_norm(runs, spec, lr):
    """Mean ||dW_1||_F / lr over the adapted layers after one AdamW step from B = 0
    (lora/analysis.py), on one batch of 32 training examples."""
    args = runs.args
    model = adapted(runs, spec, args.seed).to(args.device).train()
    batch = sample_batch(task_splits(args)["train"], 32, torch.Generator().manual_seed(0))
    return analysis.first_step_norm(model, tuple(t.to(args.device) for t in batch), lr)


def scaling_sweep(runs, large, lr):
    """The rules at r = R_MID (one shared run) and at r = `large`, where they part."""
    rows, res, norms = [], {}, {}
    for r in (R_MID, large):
        for rule, spec in scaling_specs(r).items():
            res[rule, r] = runs.spreads(spec, ("acc", "val_loss"))
            norms[rule, r] = first_step_norm(runs, spec, lr)
            predicted = spec.scaling * math.sqrt(r * 128 / 3)  # s sqrt(r out / 3), out = 128
            rows.append([rule, r, round(spec.alpha, 3), round(spec.scaling, 4),
                         round(norms[rule, r], 2), round(predicted, 2),
                         *spread_cells(res[rule, r])])
    print_table(f"3. Scaling rules on Q,V; ||dW_1||: after one AdamW step, / lr; "
                f"{runs.budget_text}", ["rule", "r", "alpha", "s", "||dW_1||",
                                          "s*sqrt(r*out/3)", "test exact match", "val loss"],
                rows)
    print_verdicts(None, rank({f"{rule}, r={large}": res[rule, large]["acc"]
                               for rule in scaling_specs(large)}))
    return res, norms


# --- the papers' findings, and what this run says about them -----------------------------------
def as_well(small, mid, name_s, name_m):
    """The paper's "a small rank does as well": within AS_WELL of r = R_MID. Reproduced when
    the interval of small - mid lies inside [-AS_WELL, AS_WELL], or above 0 (better is as
    well); not reproduced when it lies below -AS_WELL; otherwise the seeds cannot tell."""
    close = within(small, mid, AS_WELL, name_s, name_m)
    order = compare(small, mid, name_s, name_m)
    if close.holds:
        return "reproduced", close.text
    if order.holds:
        return "reproduced (and more)", order.text
    if close.holds is False and order.holds is False:
        return "not reproduced", close.text
    return "cannot tell", f"{close.text}; {order.text}"


DECIDED = ("reproduced", "reproduced (and more)", "not reproduced", "contradicted")


def beats(a, b, name_a, name_b):
    """The paper's "a is better than b"."""
    v = compare(a, b, name_a, name_b)
    return {True: "reproduced", False: "contradicted", None: "not reproduced at this budget "
            "(no difference measurable)"}[v.holds], v.text


def findings(rank_res, target_res, scaling_res, small, large):
    rows = [("LoRA Table 6: on Q,V a very small rank does as well as r=8 (within "
             f"{100 * AS_WELL:g} points)", *as_well(rank_res[small]["acc"], rank_res[R_MID]["acc"],
                                                    f"r={small}", f"r={R_MID}")),
            ("LoRA Table 5: Q,V better than Q alone at an equal parameter count",
             *beats(target_res["Q,V"]["acc"], target_res["Q"]["acc"], "Q,V", "Q")),
            (f"rsLoRA: at a large rank (r={large}) alpha / sqrt(r) better than alpha / r",
             *beats(scaling_res["rsLoRA", large]["acc"], scaling_res["alpha fixed", large]["acc"],
                    "rsLoRA", "alpha fixed"))]
    print("The papers' findings, judged from this run's seeds (paired 95% t-intervals of test "
          "exact match):")
    for claim, outcome, text in rows:
        print(f"  {claim}:\n    {outcome} -- {text}")
    print()
    return rows


# --- part 4: subspaces and amplification (lessons/update_shape.py) ------------------------------
def trained_factors(runs):
    """factors(r, seed): {layer path: (A, dW, W0)} of the rank-r run on Q,V (alpha = 2r)."""
    return lambda r, seed: runs.one(Spec(QV, r, 2 * r), seed)["factors"]


# --- plots -------------------------------------------------------------------------------------
def plot_sweeps(runs, rank_res, target_res, scaling_res, large, budget, path):
    """Each sweep's test exact match: bars at the means, whiskers min to max, a dot per seed."""
    panels = [("1. Rank (Q,V, alpha = 2r)", {f"r={r}": v for r, v in rank_res.items()}),
              (f"2. Targets, {budget:,} params each", target_res),
              (f"3. Scaling (Q,V); rules agree at r={R_MID}",
               {f"r={R_MID}": scaling_res["alpha = 2r", R_MID],
                **{f"{rule}\nr={large}": scaling_res[rule, large]
                   for rule in scaling_specs(large)}})]
    with saved_figure(path, ncols=3, figsize=(14, 4.2)) as axes:
        for ax, (title, res) in zip(axes, panels):
            errorbars(ax, list(res), [v["acc"] for v in res.values()])
            ax.set(ylabel="test exact match (%)", title=title, ylim=(0, 101))
        axes[0].figure.suptitle(runs.budget_text)


def headline_numbers(runs, sweeps, found, sim_rows, amps):
    """The summary.json numbers: mean test exact match of every setting, the findings'
    outcomes, mean phi(1,1) (A and dW; small vs large rank, and two seeds), amplification."""
    accs = {f"qv_r{r}": v for r, v in sweeps[0].items()}
    accs.update({f"targets_{n}": v for n, v in sweeps[1].items()})
    accs.update({f"{rule.replace(' ', '')}_r{r}": v for (rule, r), v in sweeps[2].items()})
    phi = {name: float(np.mean([row[col] for row in sim_rows])) for col, name in
           ((1, "A_small_large"), (3, "A_seeds"), (5, "dW_small_large"), (7, "dW_seeds"))}
    return {**{f"acc_{k}": v["acc"].mean for k, v in accs.items()},
            **{f"finding_{k}": f[1] for k, f in zip(("small_rank", "qv_vs_q", "rslora"), found)},
            "steps_per_run": runs.steps, "seeds": len(runs.seeds), "fine_tunes": len(runs),
            **{f"phi11_{k}_mean": v for k, v in phi.items()},
            **{f"amplification_{p}_r{r}": a.mean for (p, r), a in amps.items()}}


def judge(args, target_res, budget, step_norms, found):
    """Exact properties (judged under --quick too) and the papers' findings (where decided)."""
    checks = Checks(args)
    counts = {name: res["trainable"] for name, res in target_res.items()}
    checks.must(f"every target set trains exactly {budget:,} parameters",
                set(counts.values()) == {budget}, ", ".join(f"{n} {c:,}" for n, c in
                                                             counts.items()))
    growth = {rule: step_norms[rule, LARGE] / step_norms[rule, R_MID] for rule in
              scaling_specs(LARGE)}
    expect = {"alpha fixed": (R_MID / LARGE) ** 0.5, "alpha = 2r": (LARGE / R_MID) ** 0.5,
              "rsLoRA": 1.0}
    checks.must(f"||dW_1|| from r={R_MID} to r={LARGE}: x sqrt({LARGE}/{R_MID})^(-1, 1, 0) by "
                f"rule (within {STEP_RULE_TOL}x)", all(
                    1 / STEP_RULE_TOL <= growth[k] / expect[k] <= STEP_RULE_TOL for k in growth),
                ", ".join(f"{k} {g:.2f}x" for k, g in growth.items()))
    for claim, outcome, text in found:  # what this run found; a finding is not a bug
        holds = outcome.startswith("reproduced") if outcome in DECIDED else None
        checks.shown(claim, holds, f"{outcome}: {text}",
                     why="a paper's finding, reported as this run measured it")
    return checks.report()


def main(argv=None):
    args = parse_args(__doc__, argv, add_args, budget=(lambda a: Budget(steps=a.steps), QUICK))
    out, ranks = lesson_dir(args, NAME), sorted(set(args.ranks) | set(PAIR))
    runs = fine_tunes(args, get_base_model(args)[0].eval())
    t0, cpu0 = time.time(), time.process_time()
    rank_res = rank_sweep(runs, ranks)
    target_res, budget = target_sweep(runs)
    scaling_res, step_norms = scaling_sweep(runs, LARGE, finetune_config(args, "lora").lr)
    found = findings(rank_res, target_res, scaling_res, ranks[0], LARGE)
    factors = trained_factors(runs)
    sim_rows, grids = similarity_table(factors, PAIR, (args.seed, args.seed + 1), runs.steps)
    amps = amplification_table(factors, PAIR, runs.seeds, runs.budget_text)
    print(f"{len(runs)} fine-tunes of {runs.steps} steps: {time.time() - t0:.0f}s wall, "
          f"{time.process_time() - cpu0:.0f}s CPU (all threads) in all\n")
    plot_sweeps(runs, rank_res, target_res, scaling_res, LARGE, budget, out / "sweeps.png")
    plot_similarity(grids, PAIR, out / "subspace_similarity.png")
    write_summary(args, NAME, headline_numbers(runs, (rank_res, target_res, scaling_res), found,
                                               sim_rows, amps))
    takeaway(*(f"{claim}: {outcome}" for claim, outcome, _ in found))
    return judge(args, target_res, budget, step_norms, found)


if __name__ == "__main__":
    run_main(main)
