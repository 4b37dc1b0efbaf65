"""How fast is NF4 here? Quantize / dequantize throughput and the cost of the dequant-matmul.

The number that matters for QLoRA training is the overhead of DequantMatmul over a plain float
matmul with the same weight: dequantizing costs a few memory passes over the weight, while the
matmul costs 2 * tokens * in * out flops, so for enough tokens the ratio approaches 1.

Timings are medians over `repeats` after a warm-up, and the plain and 4-bit matmuls alternate
inside one loop, so that a shared, noisy machine slows both alike: trust the ratio more than
the seconds. MB = 10^6 bytes of the float32 weight (read by quantize, written by dequantize).
"""
import torch
import torch.nn.functional as F

from tiny_gpt.util.timing import medians, ratio_spread, round_robin_medians, round_robin_times

from . import kernels
from .linear4bit import DequantMatmul
from .nf4 import quantize_nf4


@torch.no_grad()
def benchmark_nf4(out_features=4096, in_features=4096, tokens=2048, repeats=5, blocksize=64,
                  double_quant=True, seed=0):
    """Time NF4 on one (out, in) N(0, 0.02^2) weight and a (tokens, in) input, float32 -> dict."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    x = torch.randn(tokens, in_features, generator=gen)
    q = quantize_nf4(w, blocksize, double_quant)
    w_deq = q.dequantize(torch.float32)
    mb = w.numel() * 4 / 1e6

    coding = round_robin_medians({"quantize": lambda: quantize_nf4(w, blocksize, double_quant),
                                  "dequantize": lambda: q.dequantize(torch.float32)}, repeats)
    matmuls = round_robin_medians({"float": lambda: F.linear(x, w_deq),
                                   "4-bit": lambda: DequantMatmul.apply(x, q, None)}, repeats)
    quantize_s, dequantize_s = coding["quantize"], coding["dequantize"]
    matmul_s, dequant_matmul_s = matmuls["float"], matmuls["4-bit"]
    return {"shape": (out_features, in_features), "tokens": tokens,
            "threads": torch.get_num_threads(), "bits_per_param": q.bits_per_param,
            "quantize_MB_per_s": mb / quantize_s, "dequantize_MB_per_s": mb / dequantize_s,
            "matmul_s": matmul_s, "dequant_matmul_s": dequant_matmul_s,
            "ratio": dequant_matmul_s / matmul_s}


@torch.no_grad()
def against_bitsandbytes(out_features=4096, in_features=4096, repeats=5, seed=0):
    """Our NF4 next to bitsandbytes' CPU kernels on one weight (blocksize 64, double-quantized
    scales), taking turns: seconds of each, the ratios, and whether the packed 4-bit codes are
    identical. None when bitsandbytes is not installed (it is never a dependency)."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    ours = quantize_nf4(w, 64, True)
    theirs, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    times = round_robin_times({
        "quantize": lambda: quantize_nf4(w, 64, True),
        "quantize (bitsandbytes)": lambda: bnb.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"),
        "dequantize": lambda: ours.dequantize(torch.float32),
        "dequantize (bitsandbytes)": lambda: bnb.dequantize_4bit(theirs, state)}, repeats)
    seconds = medians(times)
    return {"shape": (out_features, in_features), "seconds": seconds,
            "quantize_ratio": seconds["quantize"] / seconds["quantize (bitsandbytes)"],
            "dequantize_ratio": seconds["dequantize"] / seconds["dequantize (bitsandbytes)"],
            "spread": {op: ratio_spread(times, op, op + " (bitsandbytes)")
                       for op in ("quantize", "dequantize")} if repeats > 1 else None,
            "codes_identical": torch.equal(ours.codes, theirs.reshape(-1)),
            "max_dequant_gap": (ours.dequantize(torch.float32)
                                - bnb.dequantize_4bit(theirs, state)).abs().max().item()}


def with_kernels(tuned, fn):
    """fn, run with quant.kernels' tuned loops on or off (put back as they were after)."""
    def run():
        before, kernels.TUNED = kernels.TUNED, tuned
        try:
            return fn()
        finally:
            kernels.TUNED = before
    return run


@torch.no_grad()
def tuned_against_reference(out_features=4096, in_features=4096, repeats=5, seed=0):
    """quantize_nf4 and dequantize with the tuned loops (quant/tuned.py) against the reference
    (quant/blockwise.py), taking turns on one N(0, 0.02^2) weight, double-quantized:
    {"seconds": medians, "spread": {op: tuned / reference per round}, "identical": bool}."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    q = quantize_nf4(w)
    runs = {}
    for label, tuned in (("tuned", True), ("reference", False)):
        runs[f"quantize, {label}"] = with_kernels(tuned, lambda: quantize_nf4(w))
        runs[f"dequantize, {label}"] = with_kernels(tuned, lambda: q.dequantize(torch.float32))
    times = round_robin_times(runs, repeats)
    identical = (torch.equal(runs["quantize, tuned"]().codes, runs["quantize, reference"]().codes)
                 and torch.equal(runs["dequantize, tuned"](), runs["dequantize, reference"]()))
    return {"seconds": medians(times), "identical": identical,
            "spread": {op: ratio_spread(times, f"{op}, tuned", f"{op}, reference")
                       for op in ("quantize", "dequantize")}}


if __name__ == "__main__":
    for key, value in benchmark_nf4().items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
