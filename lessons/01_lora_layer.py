"""Lesson 01 -- a LoRA layer from scratch.

The idea (Hu et al. 2021, "LoRA", Sec. 4.1). Fine-tuning changes a pretrained weight
W0 (out, in) by some dW. LoRA bets that dW has low rank and trains it in factored form. In the
row notation of lora/function.py, x (N, in) holds N tokens and s = alpha / r:

    dW = B A            A (r, in)    B (out, r)    r << min(in, out)
    W_eff = W0 + s B A                             W0 frozen, only A and B are trained
    y = x W0^T + b + s (x A^T) B^T                 (N, out): no gradient ever needs W_eff

For the 128 x 128 attention projections of our tiny GPT and r = 8 that is 2 * 8 * 128 = 2,048
trainable numbers instead of 16,384. B starts at zero and A random (Kaiming-uniform), so
dW = 0 and the adapted model is *exactly* the base model at step 0; A still gets a gradient
one step later, because dL/dA = s B^T g^T x is zero only while B is.

The backward (lora/function.py derives it element by element). With g = dL/dy (N, out) and
u = x A^T (N, r):
    dL/dB = s g^T u  (out, r)     dL/dA = s B^T g^T x  (r, in)     dL/dx = g W0 + s g B A  (N, in)
and nothing for W0. This lesson checks that hand-written backward tensor by tensor against
autograd and against central finite differences, in float64, and prints OK / max difference.

Why not the naive forward, F.linear(x, W0 + s B A)? It computes the same numbers, and forming
W0 + s B A is cheap (out * in * r flops, nothing next to the N * out * in of the matmul). What
costs is that autograd differentiates through the sum: its backward builds the full (out, in)
gradient dL/dW_eff = g^T x -- a third big matmul, as costly as the forward itself -- and only
then projects it down onto A and B. The hand-derived backward never builds it: it runs only the
two matmuls the frozen layer needs anyway (x W_eff^T forward, g W_eff backward; in float32 it
uses the summed W_eff for both, to save a pass), and the gradients of A and B are skinny
products with r columns. The timing below measures the difference on one layer (its title gives
the size and the number of tokens).

And QLoRA (lesson 06): there is no float W0 to add to, only 4-bit codes. LoRAFunction then
dequantizes W0 for its forward and again for its backward, adds s B A to that passing copy, and
keeps nothing in float -- the naive layer, through autograd, would keep its W_eff for backward.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lessons.common import (Checks, get_base_model, lesson_dir, lora_copy, parse_args, print_table,
                            run_main, takeaway, write_summary)
from lessons.plots import matplotlib_pyplot, save_figure
from lessons.recipe import task_splits
from lessons.speed import TARGETS
from lora import LoRAFunction, LoRALinear, lora_layers
from lora.bench import benchmark_lora_linear
from tiny_gpt import make_batch
from tiny_gpt.util.finite_differences import central_differences

NAME = "01_lora_layer"
# our LoRALinear, fwd + bwd, at most this many times the frozen layer: the speed report's target
TARGET_RATIO = TARGETS["LoRALinear / frozen nn.Linear"]
# The loss below is linear in any single entry of x, A or B (the others held fixed), so a
# central difference has no truncation error at all: what is left is rounding, about
# 1e-16 * |L| / eps with |L| ~ 100 here, i.e. ~1e-10 for eps = 1e-4. FD_TOL leaves wide room.
FD_EPS = 1e-4         # central-difference step in float64
FD_TOL = 1e-7
# ours vs autograd in float64: the same products summed in another order, ~1e-14 apart.
AUTOGRAD_TOL = 1e-10


def shapes_table(d_in=128, d_out=128, r=8, alpha=16):
    """A fresh LoRALinear on a q_proj-sized layer: what each tensor is and how big."""
    layer = LoRALinear(nn.Linear(d_in, d_out), r, alpha)
    W0, A, B = layer.base.weight, layer.lora_A, layer.lora_B
    rows = [[name, tuple(t.shape), t.numel(), t.requires_grad, f"{t.abs().max().item():.4f}"]
            for name, t in (("W0 (base)", W0), ("A = lora_A", A), ("B = lora_B", B))]
    print_table(f"One LoRALinear, {d_in} -> {d_out}, r = {r}, alpha = {alpha}, "
                f"scaling = alpha / r = {layer.scaling}",
                ["tensor", "shape", "numbers", "trainable", "max |entry|"], rows)
    print(f"A is Kaiming-uniform: |A| <= 1/sqrt(d_in) = {1 / math.sqrt(d_in):.4f}; B is zero. "
          f"A + B hold {A.numel() + B.numel():,} numbers, "
          f"{(A.numel() + B.numel()) / W0.numel():.1%} of W0.\n")
    return (A.numel() + B.numel()) / W0.numel()


def zero_init_check(args):
    """Base model vs a LoRA copy of it (seeded, Q and V, r = 8): output and first gradients."""
    base, _ = get_base_model(args)
    base.eval()
    x, y, mask = (t.to(args.device) for t in make_batch(task_splits(args)["test"][:32]))
    model = lora_copy(base, args.seed)
    with torch.no_grad():
        before, after = base(x)[0], model(x)[0]
    max_diff = (after - before).abs().max().item()
    model(x, y, mask)[1].backward()  # the first training step's gradients
    layers = [layer for _, layer in lora_layers(model)]
    grad_A = max(layer.lora_A.grad.abs().max().item() for layer in layers)
    grad_B = max(layer.lora_B.grad.abs().max().item() for layer in layers)
    print_table("Zero-init: the base model before and right after apply_lora (Q, V, r = 8), "
                f"on {x.shape[0]} task prompts",
                ["quantity", "value"],
                [["max |logits after - logits before|", max_diff],
                 ["max |dL/dA| at step 0 (B = 0, so exactly 0)", grad_A],
                 ["max |dL/dB| at step 0 (B learns first)", grad_B]])
    return max_diff, grad_A, grad_B


def backward_inputs(N=6, d_in=10, d_out=8, r=3, dropout=False, seed=0):
    """Small float64 tensors, B non-zero (as after some training), optional fixed dropout mask."""
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=grad)
    x, A, B = rand(N, d_in, grad=True), rand(r, d_in, grad=True), rand(d_out, r, grad=True)
    W, b, G = rand(d_out, d_in), rand(d_out), rand(N, d_out)  # L = sum(G * h)
    mask = None
    if dropout:  # the mask LoRALinear draws in training: 0 or 1/(1-p), here p = 0.5
        mask = (torch.rand(N, d_in, generator=gen) >= 0.5).double() * 2.0
    return x, W, b, A, B, G, mask


def backward_check(scaling=2.0):
    """Ours vs autograd (factored), autograd (the naive W0 + sBA), finite differences."""
    rows, worst = [], 0.0
    for dropout in (False, True):
        x, W, b, A, B, G, mask = backward_inputs(dropout=dropout)
        x_d = x if mask is None else x * mask
        forwards = {
            "ours": lambda: LoRAFunction.apply(x, W, b, A, B, scaling, mask),
            "autograd": lambda: F.linear(x, W, b) + scaling * (x_d @ A.t()) @ B.t(),
            "naive": lambda: F.linear(x, W + scaling * B @ A, b),
        }
        grads = {k: torch.autograd.grad((G * f()).sum(), (x, A, B)) for k, f in forwards.items()}
        loss = lambda: (G * forwards["ours"]()).sum()  # noqa: E731
        for i, (name, t) in enumerate(zip(("dL/dx", "dL/dA", "dL/dB"), (x, A, B))):
            ours = grads["ours"][i]
            d_auto = (ours - grads["autograd"][i]).abs().max().item()
            d_fd = (ours - central_differences(loss, t, FD_EPS)).abs().max().item()
            # the naive layer has no dropout, so it is compared without one only
            d_naive = "-" if dropout else (ours - grads["naive"][i]).abs().max().item()
            ok = d_auto < AUTOGRAD_TOL and d_fd < FD_TOL and (dropout or d_naive < AUTOGRAD_TOL)
            worst = max(worst, d_fd)
            rows.append(["p = 0.5" if dropout else "none", name, tuple(t.shape), d_auto,
                         d_naive, d_fd, "OK" if ok else "FAIL"])
    x, W, b, A, B, G, mask = backward_inputs(dropout=True)
    passed = torch.autograd.gradcheck(
        lambda x, A, B: LoRAFunction.apply(x, W, b, A, B, scaling, mask), (x, A, B),
        eps=FD_EPS, atol=FD_TOL)
    print_table("Hand-derived backward (lora.LoRAFunction), float64: max |difference| per "
                "gradient",
                ["dropout", "gradient", "shape", "vs autograd", "vs naive W0+sBA",
                 "vs central diff.", "check"], rows)
    print(f"OK = below {AUTOGRAD_TOL:g} vs autograd and the naive layer, below {FD_TOL:g} vs "
          f"central differences (eps = {FD_EPS:g}); torch.autograd.gradcheck: {passed}\n")
    return all(r[-1] == "OK" for r in rows) and passed, worst


@dataclass(frozen=True)
class Budget:
    """The timed layer: tokens x features, and interleaved rounds."""
    tokens: int = 8192
    features: int = 512
    repeats: int = 25


QUICK = Budget(tokens=512, features=128, repeats=3)


def timing(args):
    """lora.bench: frozen layer vs ours vs plain autograd vs naive, fwd + input-grad bwd."""
    size = asdict(args.budget)
    res = benchmark_lora_linear(r=8, threads=2, **size)
    what = {"frozen": "nn.Linear alone, weight frozen (the reference)",
            "lora": "our LoRALinear (LoRAFunction, hand-derived backward)",
            "autograd": "base(x) + s (x A^T) B^T, plain autograd",
            "naive": "the naive F.linear(x, W0 + s B A), autograd"}
    order = ["frozen", "lora", "autograd", "naive"]
    rows = [[k, what[k], round(1e3 * res["seconds"][k], 2), round(res["ratio"][k], 3)]
            for k in order]
    print_table(f"Forward + backward of one {res['features']} -> {res['features']} layer, "
                f"r = {res['r']}, {res['tokens']:,} tokens, float32, {res['threads']} threads "
                f"(median of {size['repeats']} interleaved rounds)",
                ["variant", "computes", "ms", "x frozen"], rows)
    ratio = res["ratio"]["lora"]
    print(f"the naive W0 + sBA costs {res['ratio']['naive'] / ratio:.2f}x ours\n")
    return res, order


def plot_timing(res, order, path):
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ms = [1e3 * res["seconds"][k] for k in order]
    bars = ax.bar(order, ms, color=["0.6", "tab:green", "tab:blue", "tab:red"])
    for bar, k in zip(bars, order):
        ax.annotate(f"{res['ratio'][k]:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                                bar.get_height()), ha="center", va="bottom")
    ax.set(ylabel="ms per forward + backward",
           title=f"LoRA layer {res['features']}x{res['features']}, r={res['r']}, "
                 f"{res['tokens']} tokens")
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(__doc__, argv, budget=(Budget(), QUICK))
    out, checks = lesson_dir(args, NAME), Checks(args)
    fraction = shapes_table()
    max_diff, grad_A, grad_B = zero_init_check(args)
    checks.must("B = 0: the adapted model equals its base", max_diff == 0, f"{max_diff:g}")
    checks.must("at step 0 only B gets a gradient", grad_A == 0 < grad_B,
                f"|dL/dA| {grad_A:g}, |dL/dB| {grad_B:.3g}")
    backward_ok, worst_fd = backward_check()
    checks.must("hand-derived backward = autograd = finite differences", backward_ok,
                f"worst vs finite diff. {worst_fd:.1e}")
    res, order = timing(args)
    ratio = res["ratio"]["lora"]
    checks.shown(f"LoRALinear fwd+bwd <= {TARGET_RATIO:.2f}x the frozen layer",
                 ratio <= TARGET_RATIO, f"{ratio:.3f}x")
    plot_timing(res, order, out / "timing.png")
    takeaway(f"the hand-derived backward {'matches' if backward_ok else 'does NOT match'} "
             f"autograd and finite differences (worst {worst_fd:.1e}); one LoRA layer costs "
             f"{ratio:.2f}x the frozen layer, the naive W0 + sBA form "
             f"{res['ratio']['naive'] / ratio:.2f}x ours")
    write_summary(args, NAME, {
        "adapter_fraction_of_layer": fraction, "zero_init_max_abs_diff": max_diff,
        "step0_max_grad_A": grad_A, "step0_max_grad_B": grad_B,
        "backward_checks_ok": backward_ok, "backward_max_fd_diff": worst_fd,
        **{f"ms_{k}": 1e3 * v for k, v in res["seconds"].items()},
        **{f"ratio_{k}": v for k, v in res["ratio"].items()},
        "target_ratio_met": ratio <= TARGET_RATIO})
    return checks.report()


if __name__ == "__main__":
    run_main(main)
