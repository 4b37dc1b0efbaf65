"""What a trained LoRA update looks like: part 4 of lesson 04 (lessons/04_rank_alpha_targets.py).

Given the factors of the adapters that the lesson's rank sweep trained -- a small-rank and a
large-rank adapter of one seed, and a second seed's small-rank one -- this prints the paper's
two analyses (Hu et al. 2021, Sec. 7.2-7.3) as tables and draws the similarity heatmaps:

    subspace similarity   phi(A_rs, A_rl, i, j) = ||U_i^T U_j||_F^2 / min(i, j), U the right-
                          singular vectors, on A (as the paper) and on dW = s B A's input
                          directions, in every block (lora/analysis.py: phi_corners);
    amplification         ||dW||_F / ||U^T W V||_F, U, V the top-r singular vectors of dW, for
                          block LAYER's projections, over the seeds (amplification_norms).

The numbers are computed in lora/analysis.py; here they become the lesson's tables. `factors`
is the lesson's look-up of a trained run: factors(r, seed) -> {layer path: (A, dW, W0)}.
"""
from lessons.common import print_table
from lessons.plots import saved_heatmaps
from lessons.seeds import over_seeds
from lora.analysis import amplification_norms, phi_corners, random_phi

QV = ("q_proj", "v_proj")  # the projections adapted in the rank sweep, and compared here
LAYER = 2                  # the block of the amplification table and of the plot (of 0..3)


def similarity_table(factors, pair, seeds, steps):
    """phi between the small- and large-rank adapters (and two seeds) in every block, on A
    (as the paper) and on the input directions of dW = s B A (ordered by what B makes of them).
    Returns the rows (layer, then phi(1,1), phi(rs,rl), 2 seeds' phi(1,1), phi(rs,rs) on A,
    then the same four on dW) and each layer's four phi grids for the plot."""
    (rs, rl), (s0, s1) = pair, seeds
    small, large = factors(rs, s0), factors(rl, s0)
    seed = factors(rs, s1)  # trained here if --seeds 1
    rows, grids = [], {}
    for path in small:
        by_a, nums_a = phi_corners(small[path][0], large[path][0], seed[path][0], rs, rl)
        by_dw, nums_dw = phi_corners(small[path][1], large[path][1], seed[path][1], rs, rl)
        grids[path] = by_a + by_dw
        rows.append([path.removeprefix("blocks."), *nums_a, *nums_dw])
    n = small[path][0].shape[1]
    print(f"4a. Subspace similarity phi in every block: seed {s0}'s adapters (and seed {s1}'s "
          f"r={rs}), {steps} steps per run. Random subspaces of R^{n} give phi(1,1) = "
          f"{random_phi(n, 1, 1):.3f}, phi({rs},{rl}) = {random_phi(n, rs, rl):.3f}, "
          f"phi({rs},{rs}) = {random_phi(n, rs, rs):.3f}.\n")
    print_table("phi of A's right-singular vectors (the paper's Fig. 3-4)",
                ["layer", f"r{rs} vs r{rl}: phi(1,1)", f"phi({rs},{rl})", "2 seeds: phi(1,1)",
                 f"phi({rs},{rs})"], [[r[0]] + [round(v, 3) for v in r[1:5]] for r in rows])
    # at i = rs the top-rs input directions of dW = s B A span A's rows (B has full rank), so
    # only phi(1, 1) can differ from the table above; the tests check the equality
    print_table("phi of dW's input directions, ordered by dW's singular values",
                ["layer", f"r{rs} vs r{rl}: phi(1,1)", "2 seeds: phi(1,1)"],
                [[r[0], round(r[5], 3), round(r[7], 3)] for r in rows])
    return rows, grids


def amplification(factors, r, proj, seed):
    """Block LAYER's ||dW||, ||W||, ||U'WV|| along dW's, W's and random directions, the
    amplification factor and ||dW|| over the random-direction norm, for one seed's run."""
    _, dw, w = factors(r, seed)[f"blocks.{LAYER}.attn.{proj}"]
    return amplification_norms(dw, w, r)


def amplification_table(factors, pair, seeds, budget_text):
    """The amplification numbers of each rank in `pair` and projection, over the seeds;
    returns {(proj, r): Spread of the amplification factor}."""
    rows, amps = [], {}
    for r in pair:
        for proj in QV:
            sp = over_seeds(seeds, lambda seed: amplification(factors, r, proj, seed))
            amps[proj, r] = sp["amp"]
            # ||W|| and W's own and random directions are the base's: the same for every seed
            rows.append([proj, r, round(sp["w"].mean, 3), sp["dw"].show(fmt="{:.2f}"),
                         sp["along_dw"].show(fmt="{:.2f}"), round(sp["along_w"].mean, 3),
                         round(sp["along_rand"].mean, 3), sp["amp"].show(fmt="{:.2f}"),
                         sp["vs_rand"].show(fmt="{:.2f}")])
    print_table(f"4b. What dW amplifies (block {LAYER}; U, V: top-r singular directions of "
                f"dW, of W, or random); {budget_text}",
                ["W", "r", "||W||", "||dW||", "||U'WV|| dW dirs", "W dirs", "random dirs",
                 "amplification", "vs random dirs"], rows)
    return amps


def plot_similarity(grids, pair, path):
    """Like the paper's Fig. 3 (r_s vs r_l) and Fig. 4 (two seeds), for block LAYER: phi of
    the A matrices (left) and of the dW matrices (right); rows: q_proj, v_proj."""
    titles = (f"A, r={pair[0]} vs r={pair[1]}", "A, 2 seeds", f"dW, r={pair[0]} vs r={pair[1]}",
              "dW, 2 seeds")
    saved_heatmaps(path, [[(m, f"{proj}: {t}") for m, t in
                           zip(grids[f"blocks.{LAYER}.attn.{proj}"], titles)] for proj in QV],
                   f"Subspace similarity in block {LAYER} (random subspaces: max(i, j) / 128)",
                   "phi(i, j)", width_ratios=[4, 1.3, 4, 1.3])
