"""How fast is NF4 here? Quantize / dequantize throughput and the cost of the dequant-matmul.

The number that matters for QLoRA training is the overhead of DequantMatmul over a plain float
matmul with the same weight: dequantizing costs a few memory passes over the weight, while the
matmul costs 2 * tokens * in * out flops, so for enough tokens the ratio approaches 1.

Timings are medians over `repeats` after a warm-up, and the plain and 4-bit matmuls alternate
inside one loop, so that a shared, noisy machine slows both alike: trust the ratio more than
the seconds. MB = 10^6 bytes of the float32 weight (read by quantize, written by dequantize).
"""
import statistics
import time

import torch
import torch.nn.functional as F

from .linear4bit import DequantMatmul
from .nf4 import quantize_nf4


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fns, repeats):
    """Warm each fn up once, then time them round-robin `repeats` times -> list of medians."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(_seconds(fn))
    return [statistics.median(ts) for ts in times]


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

    quantize_s, dequantize_s = _median_seconds(
        [lambda: quantize_nf4(w, blocksize, double_quant), lambda: q.dequantize(torch.float32)],
        repeats)
    matmul_s, dequant_matmul_s = _median_seconds(
        [lambda: F.linear(x, w_deq), lambda: DequantMatmul.apply(x, q, None)], repeats)
    return {"shape": (out_features, in_features), "tokens": tokens,
            "threads": torch.get_num_threads(), "bits_per_param": q.bits_per_param,
            "quantize_MB_per_s": mb / quantize_s, "dequantize_MB_per_s": mb / dequantize_s,
            "matmul_s": matmul_s, "dequant_matmul_s": dequant_matmul_s,
            "ratio": dequant_matmul_s / matmul_s}


if __name__ == "__main__":
    for key, value in benchmark_nf4().items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
