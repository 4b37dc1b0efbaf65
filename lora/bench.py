"""What does an unmerged LoRA layer cost on top of the frozen layer alone? (lesson 01)

One layer (features -> features), rank r, float32, forward + backward with an input gradient,
four ways:
  frozen    the nn.Linear alone, weight frozen: forward x W0^T + b, backward g W0
  lora      LoRALinear unmerged, through LoRAFunction's hand-derived backward (lora/function.py)
  naive     the seed's F.linear(x, W0 + s B A) with autograd: it forms dW on every forward, and
            autograd then builds the (out, in) gradient of W0 + sBA, a third big matmul
  autograd  base(x) + s (x A^T) B^T with plain autograd, the way typical libraries write it

The target for `lora` is at most 1.20x `frozen`. The extra work is a handful of rank-r products
that read an (N, features) activation once each: memory passes, not arithmetic.

Timings are medians over `repeats` rounds after a warm-up, and the four alternate inside every
round, so a shared, noisy machine slows them alike: trust the ratios more than the seconds.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_gpt.util.timing import round_robin_medians

from .layer import LoRALinear


def benchmark_lora_linear(tokens=8192, features=512, r=8, alpha=16, repeats=10, seed=0,
                          threads=None):
    """Time the four variants above -> dict with seconds and ratios to `frozen`.
    threads: torch's intra-op thread count for this call only (None: leave it as it is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _benchmark(tokens, features, r, alpha, repeats, seed)
    finally:
        torch.set_num_threads(before)


def _benchmark(tokens, features, r, alpha, repeats, seed):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(features, features).requires_grad_(False)
    layer = LoRALinear(base, r, alpha)
    with torch.no_grad():  # a trained-looking B, so no variant works on an all-zero update
        layer.lora_B.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(tokens, features, generator=gen)
    g = torch.randn(tokens, features, generator=gen)  # dL/dy, the same for every variant
    W, b, A, B, s = base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling
    forwards = {
        "frozen": base,
        "lora": layer,
        "naive": lambda x: F.linear(x, W + s * B @ A, b),
        "autograd": lambda x: base(x) + s * (x @ A.t()) @ B.t(),
    }

    def step(forward):
        def run():
            forward(x.detach().requires_grad_()).backward(g)
        return run

    seconds = round_robin_medians({k: step(f) for k, f in forwards.items()}, repeats)
    return {"tokens": tokens, "features": features, "r": r, "threads": torch.get_num_threads(),
            "seconds": seconds, "ratio": {k: v / seconds["frozen"] for k, v in seconds.items()}}


if __name__ == "__main__":
    result = benchmark_lora_linear(threads=2)
    print(f"{result['tokens']} tokens, {result['features']} -> {result['features']}, "
          f"r = {result['r']}, float32, {result['threads']} threads")
    for name, sec in result["seconds"].items():
        print(f"  {name:>8}: {sec * 1e3:7.1f} ms   {result['ratio'][name]:.3f}x frozen")
