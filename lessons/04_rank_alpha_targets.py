"""Lesson 04 -- rank, alpha and target modules: the LoRA paper's analyses in miniature.

Four questions from Hu et al. 2021, Sec. 7, each answered with fine-tunes measured in this run
(all on the "upper" task, with the shared recipe's lr but fewer steps per run than the 1,500 of
a full fine-tune, so that ~16 runs fit in a few minutes; every table title says how many).

1. Rank (Sec. 7.2, Table 6). r in {1, 2, 4, 8, 16, 64} on W_q, W_v with alpha = 2r, the seed's
   rule of thumb, so the scale s = alpha / r = 2 is the same for every rank. Rank r costs
   r (in + out) = 256 r numbers per 128 x 128 projection. A fixed s does not make the steps
   equal: part 3 measures that under this rule the first step of dW grows like sqrt(r), so on
   a short budget a larger rank also learns faster, not only holds more.

2. Targets at an equal budget (Sec. 7.1, Table 5). Spend the same number of trainable
   parameters on Q; V; Q,V; Q,K,V,O; or all six projections (attention + MLP). The MLP's up /
   down projections are 128 -> 512 -> 128, so rank r there costs 640 r: a block's six
   projections cost 4 * 256 r + 2 * 640 r = 2,304 r. With 4 x 2,304 x 4 = 36,864 parameters
   every set gets an integer rank and exactly that count: r = 36, 36, 18, 9, 4.

3. Scaling. The update is dW = s B A. Three rules for s as r grows:
       alpha fixed        s = alpha / r       (LoRA paper, Sec. 4.1)
       alpha = 2r         s = 2               (the seed's heuristic)
       rank-stabilized    s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)
   What s does to the effective learning rate: AdamW moves every entry of A and B by about lr
   per step whatever the gradient's size, so s multiplies the step that dW takes. On the first
   step B = 0, only B moves, by -lr sign(G_B), and dW_1 = -s lr sign(G_B) A: a sum of r rows of
   A with signs. A's rows are random (Kaiming-uniform, |a|^2 ~ 1/3), so the norm grows like a
   random walk, ||dW_1||_F ~ s lr sqrt(r out / 3). Then alpha / r makes the step *shrink* like
   1/sqrt(r) (a big rank learns slower), alpha = 2r makes it *grow* like sqrt(r), and alpha /
   sqrt(r) keeps it constant -- the "rank stabilization". The table measures ||dW_1|| for each.
   The rules are set to agree at r = 4 (alpha = 8 fixed, alpha = 4 for rsLoRA: s = 2 there),
   so that r = 4 is one shared run and the rules part as r grows.

4. What the update looks like (Sec. 7.2-7.3), from the r = 8 and r = 64 adapters of part 1:
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

from lessons.common import (DEFAULT_TASK, finetune_config, get_base_model, lesson_dir, lora_copy,
                            matplotlib_pyplot, parse_args, print_table, run_main, save_figure,
                            task_splits, whole_number, write_summary)
from lora import count_parameters, lora_scaling
from lora.analysis import (adapter_factors, amplification_factor, lora_param_count, phi_grid,
                           projected_norm, random_phi, random_projected_norm, rank_for_budget,
                           top_singular_subspaces)
from tiny_gpt import exact_match, masked_cross_entropy, sample_batch
from tiny_gpt.evaluate import task_loss
from tiny_gpt.finetune import finetune

NAME = "04_rank_alpha_targets"
QV = ("q_proj", "v_proj")
TARGET_SETS = {"Q": ("q_proj",), "V": ("v_proj",), "Q,V": QV,
               "Q,K,V,O": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "attn+MLP": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")}
BUDGET = ("attn+MLP", 4)   # the budget: all six projections at r = 4 (see the docstring)
STEPS = 250                # optimizer steps per run (a full fine-tune takes 1,500)
LAYER = 2                  # the block of part 4b and of the similarity plot (of 0..3)


@dataclass(frozen=True)
class Spec:
    """One fine-tuning run; equal specs are trained once and shared between the sections."""
    targets: tuple
    r: int
    alpha: float
    rslora: bool = False
    seed: int = 0

    @property
    def scaling(self):
        return lora_scaling(self.r, self.alpha, self.rslora)


def add_args(parser):
    parser.add_argument("--steps", type=whole_number(1), default=STEPS,
                        help="optimizer steps per run")


def plan(args):
    """The sweeps' settings: full, or tiny ones for --quick (numbers meaningless)."""
    if args.quick:
        return dict(steps=3, ranks=(2, 8), pair=(2, 8), scaling_ranks=(2, 8))
    return dict(steps=args.steps, ranks=(1, 2, 4, 8, 16, 64), pair=(8, 64),
                scaling_ranks=(4, 16, 64))


def label(targets):
    return ",".join(t.removesuffix("_proj").upper() if len(t) == 6 else t.removesuffix("_proj")
                    for t in targets)


class Runs:
    """Fine-tunes a fresh copy of the base for each distinct Spec and keeps its numbers."""

    def __init__(self, args, base, splits, steps):
        self.args, self.base, self.splits, self.steps = args, base, splits, steps
        self.done = {}

    def adapted(self, spec):
        # A's initial values depend on (seed, r), not on the run order. Not on the seed alone:
        # a rank-64 A would then start with the rank-8 A as its first rows (one random stream)
        # and part 4 would find them similar for that reason only.
        return lora_copy(self.base, 1000 * spec.seed + spec.r, targets=spec.targets, r=spec.r,
                         alpha=spec.alpha, use_rslora=spec.rslora)

    def __call__(self, spec):
        # the model depends on (targets, r, s, seed) only: rules that agree on s share a run
        key = (spec.targets, spec.r, spec.scaling, spec.seed)
        if key not in self.done:
            self.done[key] = self.train(spec)
        return self.done[key]

    def train(self, spec):
        model = self.adapted(spec)
        cfg = finetune_config(self.args, "lora", max_steps=self.steps, seed=spec.seed,
                              warmup_steps=min(50, self.steps // 3), progress=False,
                              eval_every=max(1, self.steps // 4))
        res = finetune(model, self.splits, cfg, device=self.args.device)
        model.eval()  # finetune restored the weights of the best validation loss
        row = dict(trainable=count_parameters(model)[0],
                   val_loss=task_loss(model, self.splits["val"]),
                   acc=exact_match(model, self.splits["test"], self.args.device),
                   factors=adapter_factors(model.cpu()))
        print(f"  trained {label(spec.targets)} r={spec.r} alpha={spec.alpha:g}"
              f"{' rslora' if spec.rslora else ''} seed={spec.seed}: val loss "
              f"{row['val_loss']:.3f}, test acc {row['acc']:.1%} ({res.wall_time:.1f}s)",
              flush=True)
        return row


# --- part 1: rank ------------------------------------------------------------------------------
def rank_sweep(runs, ranks):
    rows = [[r, 2 * r, res["trainable"], res["acc"], res["val_loss"]]
            for r in ranks for res in [runs(Spec(QV, r, 2 * r))]]
    print_table(f"1. Rank sweep on Q,V, alpha = 2r (s = 2), {runs.steps} steps per run",
                ["r", "alpha", "trainable", "test exact match", "val loss"],
                [[r, a, f"{t:,}", f"{acc:.1%}", round(v, 4)] for r, a, t, acc, v in rows])
    return rows


# --- part 2: targets at an equal budget --------------------------------------------------------
def target_sweep(runs):
    budget = lora_param_count(runs.base, TARGET_SETS[BUDGET[0]], BUDGET[1])
    rows = []
    for name, targets in TARGET_SETS.items():
        r = rank_for_budget(runs.base, targets, budget)
        res = runs(Spec(targets, r, 2 * r))
        rows.append([name, r, res["trainable"], res["acc"], res["val_loss"]])
    print_table(f"2. Where to put {budget:,} trainable parameters (alpha = 2r), "
                f"{runs.steps} steps per run", ["targets", "r", "trainable", "vs budget",
                                                "test exact match", "val loss"],
                [[n, r, f"{t:,}", f"{t / budget - 1:+.1%}", f"{a:.1%}", round(v, 4)]
                 for n, r, t, a, v in rows])
    return rows


# --- part 3: scaling ---------------------------------------------------------------------------
def scaling_specs(r, r0):
    """The three scaling rules at rank r, tuned to agree (s = 2) at rank r0."""
    return {"alpha fixed": Spec(QV, r, 2 * r0), "alpha = 2r": Spec(QV, r, 2 * r),
            "rsLoRA": Spec(QV, r, 2 * math.sqrt(r0), rslora=True)}


def first_step_norm(runs, spec, lr):
    """Mean ||dW||_F / lr over the adapted layers after one AdamW step from B = 0."""
    model = runs.adapted(spec).to(runs.args.device).train()
    x, y, mask = (t.to(runs.args.device) for t in
                  sample_batch(runs.splits["train"], 32, torch.Generator().manual_seed(0)))
    masked_cross_entropy(model(x)[0], y, mask).backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    norms = [dw.norm().item() for _, dw, _ in adapter_factors(model.cpu()).values()]
    return sum(norms) / len(norms) / lr


def scaling_sweep(runs, ranks, lr):
    rows = []
    for r in ranks:
        for rule, spec in scaling_specs(r, ranks[0]).items():
            res = runs(spec)
            predicted = spec.scaling * math.sqrt(r * 128 / 3)  # s sqrt(r out / 3), out = 128
            rows.append([rule, r, spec.alpha, spec.scaling, first_step_norm(runs, spec, lr),
                         predicted, res["acc"], res["val_loss"]])
    print_table(f"3. Scaling rules on Q,V ({runs.steps} steps per run); ||dW_1||: after one "
                "AdamW step, / lr", ["rule", "r", "alpha", "s", "||dW_1||", "s*sqrt(r*out/3)",
                                     "test exact match", "val loss"],
                [[a, r, round(al, 3), round(s, 4), round(n, 2), round(p, 2), f"{acc:.1%}",
                  round(v, 4)] for a, r, al, s, n, p, acc, v in rows])
    return rows


# --- part 4: subspaces and amplification -------------------------------------------------------
def phi_summary(m_small, m_large, m_seed, rs, rl):
    """phi grids small-vs-large (rs, rl) and seed-vs-seed (rs, rs) of three matrices acting on
    the same input space, and four numbers from them: phi(1,1) and phi(rs,rl); phi(1,1) and
    phi(rs,rs) across seeds."""
    g, g_seed = phi_grid(m_small, m_large, rs, rl), phi_grid(m_small, m_seed, rs, rs)
    return (g, g_seed), [g[0, 0].item(), g[-1, -1].item(), g_seed[0, 0].item(),
                         g_seed[-1, -1].item()]


def similarity_table(runs, pair, seed_spec):
    """phi between the small- and large-rank adapters (and two seeds) in every block, on A
    (as the paper) and on the input directions of dW = s B A (ordered by what B makes of them)."""
    (rs, rl) = pair
    small, large = (runs(Spec(QV, r, 2 * r))["factors"] for r in pair)
    seed = runs(seed_spec)["factors"]
    rows, grids = [], {}
    for path in small:
        by_a, nums_a = phi_summary(small[path][0], large[path][0], seed[path][0], rs, rl)
        by_dw, nums_dw = phi_summary(small[path][1], large[path][1], seed[path][1], rs, rl)
        grids[path] = by_a + by_dw
        rows.append([path.removeprefix("blocks."), *nums_a, *nums_dw])
    n = small[path][0].shape[1]
    print(f"4a. Subspace similarity phi in every block, {runs.steps} steps per run. Random "
          f"subspaces of R^{n} give phi(1,1) = {random_phi(n, 1, 1):.3f}, phi({rs},{rl}) = "
          f"{random_phi(n, rs, rl):.3f}, phi({rs},{rs}) = {random_phi(n, rs, rs):.3f}.\n")
    print_table("phi of A's right-singular vectors (the paper's Fig. 3-4)",
                ["layer", f"r{rs} vs r{rl}: phi(1,1)", f"phi({rs},{rl})", "2 seeds: phi(1,1)",
                 f"phi({rs},{rs})"], [[r[0]] + [round(v, 3) for v in r[1:5]] for r in rows])
    # at i = rs the top-rs input directions of dW = s B A span A's rows (B has full rank), so
    # only phi(1, 1) can differ from the table above; the tests check the equality
    print_table("phi of dW's input directions, ordered by dW's singular values",
                ["layer", f"r{rs} vs r{rl}: phi(1,1)", "2 seeds: phi(1,1)"],
                [[r[0], round(r[5], 3), round(r[7], 3)] for r in rows])
    return rows, grids


def amplification_table(runs, pair):
    rows = []
    for r in pair:
        factors = runs(Spec(QV, r, 2 * r))["factors"]
        for proj in QV:
            _, dw, w = factors[f"blocks.{LAYER}.attn.{proj}"]
            u, v = top_singular_subspaces(dw, r)
            uw, vw = top_singular_subspaces(w, r)
            along_dw, along_rand = projected_norm(w, u, v), random_projected_norm(w, r)
            rows.append([proj, r, dw.norm().item(), w.norm().item(), along_dw,
                         projected_norm(w, uw, vw), along_rand, amplification_factor(dw, w, r),
                         dw.norm().item() / along_rand])
    print_table(f"4b. What dW amplifies (block {LAYER}; U, V: top-r singular directions of "
                "dW, of W, or random)", ["W", "r", "||dW||", "||W||", "||U'WV|| dW dirs",
                                         "W dirs", "random dirs", "amplification",
                                         "vs random dirs"],
                [[p, r] + [round(x, 3) for x in rest] for p, r, *rest in rows])
    return rows


# --- plots -------------------------------------------------------------------------------------
def rank_ticks(ax, ranks):
    """Label a log-scale rank axis with the ranks themselves."""
    ax.set_xticks(sorted(set(ranks)), [str(r) for r in sorted(set(ranks))])
    ax.minorticks_off()


def plot_sweeps(rank_rows, target_rows, scaling_rows, path):
    plt = matplotlib_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot([r[0] for r in rank_rows], [r[3] for r in rank_rows], "o-")
    ax.set(xscale="log", xlabel="rank r (Q,V, alpha = 2r)", ylabel="test exact match",
           title="1. Rank", ylim=(-0.02, 1.02))
    rank_ticks(ax, [r[0] for r in rank_rows])
    ax = axes[1]
    ax.bar([r[0] for r in target_rows], [r[3] for r in target_rows])
    for i, r in enumerate(target_rows):
        ax.annotate(f"r={r[1]}", (i, r[3]), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="test exact match", title=f"2. Targets, {target_rows[0][2]:,} params each",
           ylim=(0, 1.05))
    ax = axes[2]
    for rule in dict.fromkeys(r[0] for r in scaling_rows):
        pts = [r for r in scaling_rows if r[0] == rule]
        ax.plot([p[1] for p in pts], [p[6] for p in pts], "o-", label=rule)
    ax.set(xscale="log", xlabel="rank r (Q,V)", ylabel="test exact match", title="3. Scaling",
           ylim=(-0.02, 1.02))
    rank_ticks(ax, [r[1] for r in scaling_rows])
    ax.legend()
    save_figure(fig, path)


def plot_similarity(grids, pair, path):
    """Like the paper's Fig. 3 (r_s vs r_l) and Fig. 4 (two seeds), for block LAYER: phi of
    the A matrices (left) and of the dW matrices (right); rows: q_proj, v_proj."""
    plt = matplotlib_pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 4, figsize=(15, 5.5), layout="constrained",
                             gridspec_kw={"width_ratios": [4, 1.3, 4, 1.3]})
    for row, proj in enumerate(QV):
        g_a, seed_a, g_dw, seed_dw = grids[f"blocks.{LAYER}.attn.{proj}"]
        panels = [(g_a, f"A, r={pair[0]} vs r={pair[1]}"), (seed_a, "A, 2 seeds"),
                  (g_dw, f"dW, r={pair[0]} vs r={pair[1]}"), (seed_dw, "dW, 2 seeds")]
        for ax, (m, title) in zip(axes[row], panels):
            im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
            ax.set(title=f"{proj}: {title}", xlabel="j", ylabel="i")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes.ravel().tolist(), label="phi(i, j)")
    fig.suptitle(f"Subspace similarity in block {LAYER} (random subspaces: max(i, j) / 128)")
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def headline_numbers(runs, rank_rows, target_rows, scaling_rows, sim_rows, amp_rows):
    """The summary.json numbers: accuracies of every sweep, mean phi(1,1), amplification."""
    best = max(rank_rows, key=lambda r: r[3])
    return {"steps_per_run": runs.steps, "fine_tunes": len(runs.done),
            **{f"acc_qv_r{r[0]}": r[3] for r in rank_rows}, "best_rank": best[0],
            **{f"acc_targets_{r[0]}": r[3] for r in target_rows},
            **{f"acc_{a.replace(' ', '')}_r{r}": acc for a, r, *_, acc, _ in scaling_rows},
            "phi11_A_small_large_mean": float(np.mean([r[1] for r in sim_rows])),
            "phi11_A_seeds_mean": float(np.mean([r[3] for r in sim_rows])),
            "phi11_dW_small_large_mean": float(np.mean([r[5] for r in sim_rows])),
            "phi11_dW_seeds_mean": float(np.mean([r[7] for r in sim_rows])),
            **{f"amplification_{p}_r{r}": a for p, r, *_, a, _ in amp_rows}}


def main(argv=None):
    args = parse_args(__doc__, argv, add_args)
    out, cfg = lesson_dir(args, NAME), plan(args)
    base = get_base_model(args)[0].eval()
    runs = Runs(args, base, task_splits(args, DEFAULT_TASK), cfg["steps"])
    t0, cpu0 = time.time(), time.process_time()
    rank_rows = rank_sweep(runs, cfg["ranks"])
    target_rows = target_sweep(runs)
    scaling_rows = scaling_sweep(runs, cfg["scaling_ranks"], finetune_config(args, "lora").lr)
    rs = cfg["pair"][0]
    sim_rows, grids = similarity_table(runs, cfg["pair"], Spec(QV, rs, 2 * rs, seed=1))
    amp_rows = amplification_table(runs, cfg["pair"])
    print(f"{len(runs.done)} fine-tunes of {runs.steps} steps: {time.time() - t0:.0f}s wall, "
          f"{time.process_time() - cpu0:.0f}s CPU (all threads) in all\n")
    plot_sweeps(rank_rows, target_rows, scaling_rows, out / "sweeps.png")
    plot_similarity(grids, cfg["pair"], out / "subspace_similarity.png")
    write_summary(args, NAME, headline_numbers(runs, rank_rows, target_rows, scaling_rows,
                                               sim_rows, amp_rows))
    return 0


if __name__ == "__main__":
    run_main(main)
