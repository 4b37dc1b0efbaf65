"""Lesson 05 -- NF4, the 4-bit NormalFloat of QLoRA, from scratch.

QLoRA (Dettmers et al. 2023) keeps the frozen base model in 4 bits. Which 16 numbers should the
4 bits stand for? Pretrained weights are close to zero-mean normal. A code whose levels sit at
*quantiles* of N(0, 1) gives every level about the same expected number of weights: no level is
wasted on the empty tails, so the 4 bits carry close to the full log2(16) = 4 bits of
information. That is NF4 (QLoRA Sec. 3, "4-bit NormalFloat", and its appendix). Step by step:

  1. 8 positive levels: Phi^-1(p) at p = 8 evenly spaced points from delta down to 1/2
     (linspace(delta, 1/2, 9) without its last point); 7 negative ones likewise from 8 points.
     Phi^-1 is the normal quantile function; delta = 0.9677 = ((1 - 1/30) + (1 - 1/32)) / 2
     stops short of p = 1, where Phi^-1 is infinite.
  2. Asymmetric 7 / 8 split plus an exact 0: 2^4 = 16 levels cannot be symmetric around a zero
     level, and zero (padding, pruned weights) must be represented without error.
  3. Divide by the largest value, Phi^-1(delta) = 1.848: the levels span exactly [-1, 1].

Storing a weight (QLoRA Sec. 2, block-wise k-bit quantization): cut it into blocks of 64, keep
each block's absmax m_b, and store each value as the index of the nearest level of x / m_b.
One outlier then only coarsens the 63 neighbours in its own block, not the whole tensor.
Two 4-bit indices go into one byte. The float32 scales cost 32 / 64 = 0.5 bits per weight, so
*double quantization* stores them again in 8 bits (blocks of 256, after subtracting their mean):
4 + 8/64 + 32/(64*256) = 4.127 bits per weight. Its limit: the 8-bit code's error is set by the
largest scales, so blocks whose scales are far smaller than the rest (rows 1000x smaller than
their neighbours) lose their scale altogether; the lesson measures that case and its remedy,
plain float32 scales for such a tensor, which gives back the bits double quantization saved.

The levels are used equally at the scale the code is built for (level 1 = 1.848 sigma); block
absmax maps 1 to a block's largest value instead, ~2.6 sigma for 64 normal values, which
squeezes weights towards the inner levels. The occupancy table measures both; the entropy of
the code use says how close each 4-bit format gets to 4 bits. Then NF4's error is compared
with int4 and FP4 on N(0, 1) and on every layer of the tiny GPT. Runs in seconds.
"""
import math
from dataclasses import dataclass

import torch

from lessons.common import (Checks, get_base_model, lesson_dir, parse_args, print_table, run_main,
                            takeaway, write_summary)
from lessons.plots import matplotlib_pyplot, save_figure
from quant import NF4_CODE, quantize_fp4, quantize_int4, quantize_nf4
from quant.analysis import (block_kurtosis, block_normalised, blocksize_costs, count_orders,
                            entropy_bits, format_errors, linear_weights, normalised_mse, occupancy,
                            occupancy_at_scale, outlier_errors, scale_errors, shrunk_rows_errors)
from quant.blockwise import to_blocks, unpack_nibbles
from quant.nf4 import NF4_OFFSET

NAME = "05_nf4_from_scratch"
# The table printed in the QLoRA paper's appendix (also bitsandbytes' get_4bit_type("nf4")).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
FORMATS = {"NF4": quantize_nf4, "FP4": quantize_fp4, "int4": quantize_int4}
ORDER = ("NF4", "FP4", "int4")  # the error order NF4's design predicts on normal weights
BITS_TARGETS = {"plain": 4.5, "double_quant": 4.13}  # QLoRA Sec. 3: 4.5 and ~4.127
LEVEL_TOL = 1e-6  # float32 levels: the published ones are float32 values printed in full
BLOCKSIZES = (32, 64, 128, 256)
EVEN_ROWS = 1.25  # plain scales keep the small rows' NMSE within this factor of the large rows'


@dataclass(frozen=True)
class Budget:
    gauss_rows: int = 1024  # rows of the N(0,1) test matrix, 1024 wide


QUICK = Budget(gauss_rows=256)
# Phi^-1(delta) = 1.848: how many standard deviations NF4's level 1.0 stands for
NF4_TOP_SIGMA = torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)).item()


def derive_levels(offset=NF4_OFFSET):
    """The NF4 levels step by step -> (p, Phi^-1(p), level), each (16,) in level order.

    Float32 probabilities and float64 quantiles, as the reference builds them."""
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()  # (8,) 0.968 .. 0.558
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()  # (7,) 0.968 .. 0.567
    raw = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64),
                     -torch.special.ndtri(p_neg)]).float()  # (16,) unsorted
    probs = torch.cat([p_pos, torch.full((1,), 0.5, dtype=torch.float64), 1 - p_neg])
    order = raw.argsort()
    levels = raw[order] / raw.max()  # step 3: normalise to [-1, 1]
    return probs[order], raw[order], levels


def levels_table():
    """Steps 1-3 next to the published table; -> max |derived - published| and the same for
    the package's quant.NF4_CODE."""
    probs, raw, levels = derive_levels()
    published = torch.tensor(PUBLISHED_NF4)
    rows = [[i, "neg" if levels[i] < 0 else ("zero" if levels[i] == 0 else "pos"),
             f"{probs[i]:.6f}", f"{raw[i]:+.6f}", f"{levels[i]:+.8f}", f"{published[i]:+.8f}",
             f"{abs(levels[i] - published[i]):.1e}"] for i in range(16)]
    print_table("Step 1-3: NF4 levels = Phi^-1(p), normalised by the largest (QLoRA appendix)",
                ["code", "side", "p", "Phi^-1(p)", "ours", "published", "|diff|"], rows)
    diff_derived = (levels - published).abs().max().item()
    diff_package = (NF4_CODE - published).abs().max().item()
    print(f"delta = {NF4_OFFSET} vs ((1 - 1/30) + (1 - 1/32)) / 2 = "
          f"{((1 - 1 / 30) + (1 - 1 / 32)) / 2:.7f}; max |derived - published| = "
          f"{diff_derived:.1e}; max |quant.NF4_CODE - published| = {diff_package:.1e}\n")
    return diff_derived, diff_package


def outlier_demo(n=4096, blocksize=64, outlier=20.0, seed=0):
    """One weight of 20 sigma in N(0, 1) noise: per-block error with 64-blocks vs one absmax."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    where = n // 3
    w[where] = outlier
    rows, per_block = [], {}
    for label, bs in [(f"blocks of {blocksize}", blocksize), ("one global absmax", n)]:
        per_block[label], hit, others, zeroed = outlier_errors(w, where, quantize_nf4, bs)
        rows.append([label, hit, others, f"{100 * zeroed:.1f}%"])
    print_table(f"Block-wise absmax: N(0,1) x {n} with one outlier of {outlier:g} at index "
                f"{where}", ["scaling", "MSE outlier's block", "MSE other blocks",
                             "values stored as 0"], rows)
    return per_block, rows


def packing_table(w):
    """The first 4 bytes of a quantized weight: two codes per byte, first one high."""
    q = quantize_nf4(w, double_quant=False)
    codes = unpack_nibbles(q.codes[:4])
    values = w.reshape(-1)[:8].tolist()
    rows = []
    for i in range(4):
        hi, lo = int(codes[2 * i]), int(codes[2 * i + 1])
        byte = int(q.codes[i])
        assert byte == 16 * hi + lo  # the packing rule, checked on the real bytes
        rows.append([f"{2 * i},{2 * i + 1}", f"{values[2 * i]:+.4f} {values[2 * i + 1]:+.4f}",
                     f"{hi:2d} {lo:2d}", f"{hi:04b} {lo:04b}", f"{byte:08b}", f"0x{byte:02X}"])
    print_table("Packing: element 2i -> high nibble, 2i+1 -> low nibble (first block of a layer)",
                ["elements", "values", "codes", "codes (bin)", "byte (bin)", "hex"], rows)


def double_quant_table(w):
    """Scale error and bits per parameter with and without double quantization."""
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    rel = scale_errors(dq, w)  # (n_blocks,)
    mse = {k: normalised_mse(w, quantize_nf4, double_quant=k == "double_quant")
           for k in BITS_TARGETS}
    rows = []
    for key, q, formula in [("plain", plain, "4 + 32/64"),
                            ("double_quant", dq, "4 + 8/64 + 32/(64*256)")]:
        ok = q.bits_per_param <= BITS_TARGETS[key] + 1e-9
        rows.append([key, formula, f"{q.bits_per_param:.4f}", f"<= {BITS_TARGETS[key]}",
                     "PASS" if ok else "NOT MET", f"{mse[key]:.5f}"])
    print_table(f"Double quantization of the block scales ({w.numel():,} N(0,1) values, "
                f"blocks of 64)", ["scales", "bits formula", "bits/param", "target", "",
                                   "NMSE"], rows)
    print(f"scale relative error after 8-bit storage: mean {rel.mean():.2e}, max {rel.max():.2e}; "
          f"codes identical: {torch.equal(plain.codes, dq.codes)}\n")
    return {"bits_plain": plain.bits_per_param, "bits_double_quant": dq.bits_per_param,
            "scale_rel_err_mean": rel.mean().item(), "scale_rel_err_max": rel.max().item()}


def double_quant_limit(seed, rows=512, cols=512, shrink=1e-3):
    """Every other row of a N(0,1) weight multiplied by `shrink`: the small rows' scales sit far
    below the step of the 8-bit code that the large rows' scales set. Errors per kind of row,
    with and without double quantization (quant.analysis.shrunk_rows_errors)."""
    found = shrunk_rows_errors(quantize_nf4, rows, cols, shrink, seed)
    print_table(f"Where double quantization fails: a {rows} x {cols} N(0,1) weight, every other "
                f"row x {shrink:g}",
                ["scales", "bits/param", "max scale error: small rows", "large rows",
                 "NMSE: small rows", "large rows"],
                [[label, f"{r['bits']:.3f}", f"{r['small'][0]:.2e}", f"{r['large'][0]:.2e}",
                  f"{r['small'][1]:.4f}", f"{r['large'][1]:.4f}"] for label, r in found.items()])
    dq, plain = found["double quant"], found["plain float32 scales"]
    print(double_quant_sentence(dq, plain))
    return {"dq_small_rows_nmse": dq["small"][1], "plain_small_rows_nmse": plain["small"][1],
            "plain_large_rows_nmse": plain["large"][1], "dq_small_rows_scale_err": dq["small"][0]}


def double_quant_sentence(dq, plain) -> str:
    """What the table shows: how much double quantization multiplies the small rows' error,
    and whether plain float32 scales bring them back to the large rows' (within EVEN_ROWS)."""
    worse = dq["small"][1] / plain["small"][1]
    even = plain["small"][1] / plain["large"][1]
    if worse <= 1:
        return (f"Here double quantization does not hurt the small rows (their error x "
                f"{worse:.2f}).\n")
    remedy = ("within " if abs(math.log(even)) <= math.log(EVEN_ROWS) else "NOT within ") + \
        f"{EVEN_ROWS:g}x of the large rows' error ({even:.2f}x)"
    return (f"Double quantization multiplies the small rows' error by {worse:,.0f}: its 8-bit "
            f"code stores scale - mean, so a small row's scale becomes a value near -mean, coded "
            f"with an absolute error that the large scales set -- larger than the small scale "
            f"itself. The remedy, plain float32 scales for such a tensor, costs "
            f"{plain['bits'] - dq['bits']:.3f} more bits per weight and keeps the small rows "
            f"{remedy}. The scale error is known at quantization time, so it can be checked.\n")


def format_comparison(gauss, layers):
    """NMSE of NF4 / FP4 / int4 (plain absmax, blocks of 64) on N(0,1) and on every layer."""
    weights = {"N(0,1)": gauss, **layers}
    table = format_errors(weights, FORMATS)
    kurt = {name: block_kurtosis(w) for name, w in weights.items()}
    rows = [[name, f"{kurt[name]:.2f}", f"{e['NF4']:.5f}", f"{e['FP4']:.5f}", f"{e['int4']:.5f}",
             "yes" if e["NF4"] < e["FP4"] < e["int4"] else "NO"] for name, e in table.items()]
    print_table("Quantization error, NMSE = mean((deq(q(w)) - w)^2) / mean(w^2), blocks of 64",
                ["weight", "kurtosis in blocks", "NF4", "FP4", "int4", "NF4 < FP4 < int4"], rows)
    nf4_best, ordered = count_orders(table, ORDER)
    print(f"NF4 lowest error on {nf4_best} of {len(table)} weights; NF4 < FP4 < int4 on "
          f"{ordered} of {len(table)}; {kurtosis_sentence(table, kurt)}\n")
    return table, f"{nf4_best}/{len(table)}", f"{ordered}/{len(table)}"


def kurtosis_sentence(table, kurt) -> str:
    """Whether the weights where evenly spaced int4 beats FP4 have flatter blocks (lower
    kurtosis) than those where FP4 wins: every one of them below every one of the others."""
    int4_wins = [kurt[n] for n, e in table.items() if e["int4"] < e["FP4"]]
    fp4_wins = [kurt[n] for n, e in table.items() if e["FP4"] <= e["int4"]]
    if not int4_wins or not fp4_wins:
        return f"{'int4' if int4_wins else 'FP4'} beats the other on every weight"
    ranges = (f"where int4 beats FP4 the blocks' kurtosis is {min(int4_wins):.2f}-"
              f"{max(int4_wins):.2f}, where FP4 wins {min(fp4_wins):.2f}-{max(fp4_wins):.2f}")
    if max(int4_wins) < min(fp4_wins):
        return ranges + ": int4 wins exactly on the flatter blocks"
    return ranges + ": the ranges overlap, so flatness alone does not decide it"


def blocksize_sweep(gauss, layers):
    rows = []
    for bs in BLOCKSIZES:
        costs = blocksize_costs(gauss, list(layers.values()), quantize_nf4, bs)
        rows.append([bs, *(f"{c:.{d}f}" for c, d in zip(costs, (4, 4, 5, 5)))])
    print_table("Block size: bits per parameter vs error (NF4, NMSE with double quant)",
                ["blocksize", "bits plain", "bits dq", "NMSE N(0,1)", "NMSE tiny GPT"], rows)
    return rows


def occupancy_table(gauss, layers):
    """Share of weights per level: block-absmax N(0,1), N(0,1) at NF4's design scale, the GPT."""
    model_frac, model_h = occupancy(layers.values(), quantize_nf4)
    gauss_frac, gauss_h = occupancy(gauss, quantize_nf4)
    # NF4 maps its largest level to Phi^-1(delta) sigma; blocks of 64 instead put 1 at their
    # absmax (its mean is printed below), which squeezes the data towards the inner levels.
    design_frac = occupancy_at_scale(gauss, NF4_TOP_SIGMA, NF4_CODE)
    h = {"design": entropy_bits(design_frac), "model": model_h}
    rows = [[i, f"{NF4_CODE[i]:+.4f}", f"{100 * design_frac[i]:.2f}%",
             f"{100 * gauss_frac[i]:.2f}%", f"{100 * model_frac[i]:.2f}%"] for i in range(16)]
    rows.append(["entropy", "(max 4 bits)", f"{h['design']:.3f} bits", f"{gauss_h:.3f} bits",
                 f"{h['model']:.3f} bits"])
    print_table("Occupancy: share of weights stored as each level (uniform = 6.25%)",
                ["code", "level", f"N(0,1)/{NF4_TOP_SIGMA:.3f}", "N(0,1), blocks of 64",
                 "tiny GPT, blocks of 64"], rows)
    absmax = to_blocks(gauss, 64).abs().amax(1).mean().item()
    others = {f: occupancy(gauss, FORMATS[f])[1] for f in ("FP4", "int4")}
    print(f"mean absmax of a block of 64 N(0,1) values: {absmax:.3f} sigma (NF4's level 1 "
          f"stands for {NF4_TOP_SIGMA:.3f} sigma)\nentropy of the code use on N(0,1), blocks "
          f"of 64: NF4 {gauss_h:.3f}, FP4 {others['FP4']:.3f}, int4 {others['int4']:.3f} bits "
          f"(15-level codes: at most {math.log2(15):.3f})\n")
    return h["design"], gauss_h, h["model"], others


def plot_histogram(w, name, out):
    plt = matplotlib_pyplot()
    scaled = block_normalised(w)  # (numel,) w / its block's absmax
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(scaled.numpy(), bins=200, color="tab:blue", alpha=0.7)
    for level in NF4_CODE.tolist():
        ax.axvline(level, color="tab:red", lw=0.8)
    ax.set(xlabel="weight / block absmax", ylabel="count",
           title=f"{name}: weights over the 16 NF4 levels (red)")
    save_figure(fig, out / "nf4_levels_on_weights.png")


def plot_errors(table, sweep_rows, per_block, out):
    plt = matplotlib_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(table)
    for k, fmt in enumerate(FORMATS):
        axes[0].bar([i + 0.27 * (k - 1) for i in range(len(names))],
                    [table[n][fmt] for n in names], width=0.27, label=fmt)
    axes[0].set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes[0].set(ylabel="NMSE", title="NF4 vs FP4 vs int4 (blocks of 64)")
    axes[0].legend(loc="lower right", fontsize=7)
    axes[1].plot([float(r[2]) for r in sweep_rows], [float(r[3]) for r in sweep_rows], "o-")
    for r in sweep_rows:
        axes[1].annotate(str(r[0]), (float(r[2]), float(r[3])))
    axes[1].set(xlabel="bits per parameter (double quant)", ylabel="NMSE on N(0,1)",
                title="block size sweep")
    for label, mse in per_block.items():
        axes[2].semilogy(mse.numpy(), label=label)
    axes[2].set(xlabel="block of 64", ylabel="MSE", title="one outlier: error per block")
    axes[2].legend()
    save_figure(fig, out / "nf4_errors.png")


def main(argv=None):
    args = parse_args(__doc__, argv, budget=(Budget(), QUICK))
    out = lesson_dir(args, NAME)
    diff_derived, _ = levels_table()
    layers = linear_weights(get_base_model(args)[0])  # the 24 linear layers of the tiny GPT
    gauss = torch.randn(args.budget.gauss_rows, 1024,
                        generator=torch.Generator().manual_seed(args.seed))
    design_h, gauss_h, model_h, other_h = occupancy_table(gauss, layers)
    per_block, _ = outlier_demo(seed=args.seed)
    packing_table(layers["blocks.0.attn.q_proj"])
    dq = double_quant_table(gauss)
    dq_limit = double_quant_limit(args.seed)
    table, nf4_best, ordered = format_comparison(gauss, layers)
    sweep_rows = blocksize_sweep(gauss, layers)
    plot_histogram(layers["blocks.1.mlp.up_proj"], "blocks.1.mlp.up_proj", out)
    plot_errors(table, sweep_rows, per_block, out)
    g = table["N(0,1)"]
    write_summary(args, NAME, {
        "max_level_diff": diff_derived, "bits_plain": dq["bits_plain"],
        "bits_double_quant": dq["bits_double_quant"], "nmse_nf4_normal": g["NF4"],
        "nmse_fp4_normal": g["FP4"], "nmse_int4_normal": g["int4"],
        "weights_nf4_lowest": nf4_best, "weights_nf4_lt_fp4_lt_int4": ordered,
        "entropy_nf4_design_scale": design_h, "entropy_nf4_normal": gauss_h,
        "entropy_nf4_model": model_h,
        "entropy_fp4_normal": other_h["FP4"], "entropy_int4_normal": other_h["int4"],
        "scale_rel_err_mean": dq["scale_rel_err_mean"], **dq_limit})
    conclude(g, dq)
    return judge(args, diff_derived, dq, table, dq_limit)


def conclude(g, dq):
    order = " < ".join(sorted(ORDER, key=g.get))
    takeaway(f"on normal weights the 4-bit formats' errors order {order} (NMSE NF4 "
             f"{g['NF4']:.4f}, FP4 {g['FP4']:.4f}, int4 {g['int4']:.4f}); double quantization "
             f"stores the scales in {dq['bits_double_quant'] - 4:.3f} bits per weight instead of "
             f"{dq['bits_plain'] - 4:.3f}")


def judge(args, diff_derived, dq, table, dq_limit):
    checks, g = Checks(args), table["N(0,1)"]
    even = dq_limit["plain_small_rows_nmse"] / dq_limit["plain_large_rows_nmse"]
    checks.must(f"plain scales keep small rows within {EVEN_ROWS:g}x of the large rows' NMSE",
                abs(math.log(even)) <= math.log(EVEN_ROWS), f"{even:.2f}x")
    checks.must("NF4 levels derived = the published table", diff_derived <= LEVEL_TOL,
                f"max |diff| {diff_derived:.1e}")
    for key, bits in (("plain", dq["bits_plain"]), ("double_quant", dq["bits_double_quant"])):
        checks.must(f"bits per parameter, {key} <= {BITS_TARGETS[key]}",
                    bits <= BITS_TARGETS[key] + 1e-9, f"{bits:.4f}")
    checks.must("on N(0,1): NMSE of NF4 < FP4 < int4", g["NF4"] < g["FP4"] < g["int4"],
                f"{g['NF4']:.5f} / {g['FP4']:.5f} / {g['int4']:.5f}")
    nf4_best = count_orders(table, ORDER)[0]
    checks.target("NF4 the lowest error on every weight", nf4_best == len(table),
                  f"{nf4_best} of {len(table)}")
    return checks.report()


if __name__ == "__main__":
    run_main(main)
