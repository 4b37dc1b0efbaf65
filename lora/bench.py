"""What does an unmerged LoRA layer cost on top of the frozen layer alone? (lesson 01)

One layer (features -> features), rank r, float32, forward + backward with an input gradient,
four ways:
  frozen    the nn.Linear alone, weight frozen: forward x W0^T + b, backward g W0
  lora      LoRALinear unmerged, through LoRAFunction's hand-derived backward (lora/function.py)
  naive     the one-line F.linear(x, W0 + s B A) with autograd: it forms dW on every forward, and
            autograd then builds the (out, in) gradient of W0 + sBA, a third big matmul
  autograd  base(x) + s (x A^T) B^T with plain autograd, the way typical libraries write it
  peft      PEFT's own LoRA layer with the same A and B, where peft is installed (it is never a
            dependency: `peft_lora` returns None without it, and the variant is left out)

The target for `lora` is at most 1.10x `frozen`. The extra work is a handful of rank-r products
that read an (N, features) activation once each: memory passes, not arithmetic (function.py).

Timings are medians over `repeats` rounds after a warm-up, and the four alternate inside every
round, so a shared, noisy machine slows them alike: trust the ratios more than the seconds.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_gpt.util.timing import medians, ratio_spread, round_robin_times

from .layer import LoRALinear


def peft_lora(model, targets, r, alpha):
    """`model` (changed in place) with PEFT's LoRA layers on `targets` (peft's
    inject_adapter_in_model: its layer classes, its forward; the base frozen, no dropout), or
    None when peft is not installed. Only benchmarks use it: peft is never a dependency."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return inject_adapter_in_model(config, model.requires_grad_(False))


def copy_factors_to_peft(peft_model, model):
    """Give every PEFT LoRA layer of `peft_model` the A and B of the same path in `model` (our
    LoRALinear layers), so that the two compute the same function. -> number of layers."""
    ours = dict(model.named_modules())
    count = 0
    with torch.no_grad():
        for path, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
                module.lora_A["default"].weight.copy_(ours[path].lora_A)
                module.lora_B["default"].weight.copy_(ours[path].lora_B)
                count += 1
    return count


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
    theirs = peft_lora(nn.Sequential(OrderedDict(layer=nn.Linear(features, features))),
                       ["layer"], r, alpha)
    if theirs is not None:
        theirs.layer.base_layer.load_state_dict(base.state_dict())
        copy_factors_to_peft(theirs, nn.Sequential(OrderedDict(layer=layer)))
        forwards["peft"] = theirs.layer

    def step(forward):
        def run():
            forward(x.detach().requires_grad_()).backward(g)
        return run

    times = round_robin_times({k: step(f) for k, f in forwards.items()}, repeats)
    seconds = medians(times)
    spread = ({k: ratio_spread(times, k, "frozen") for k in times} if repeats > 1 else None)
    return {"tokens": tokens, "features": features, "r": r, "threads": torch.get_num_threads(),
            "seconds": seconds, "ratio": {k: v / seconds["frozen"] for k, v in seconds.items()},
            "spread": spread}


if __name__ == "__main__":
    result = benchmark_lora_linear(threads=2)
    print(f"{result['tokens']} tokens, {result['features']} -> {result['features']}, "
          f"r = {result['r']}, float32, {result['threads']} threads")
    for name, sec in result["seconds"].items():
        print(f"  {name:>8}: {sec * 1e3:7.1f} ms   {result['ratio'][name]:.3f}x frozen")
