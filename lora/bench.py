"""What does an unmerged LoRA layer cost on top of the frozen layer alone? (lesson 01) And what
does the tuned LoRA Function buy over the reference? (benchmark_tuned_forms, lora/tuned)

One layer (features -> features), rank r, float32, forward + backward with an input gradient,
four ways:
  frozen    the nn.Linear alone, weight frozen: forward x W0^T + b, backward g W0
  lora      LoRALinear unmerged, through LoRAFunction's hand-derived backward (lora/function.py)
  naive     minLoRA's F.linear(x, W0 + s B A) with autograd: it forms dW on every forward, and
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

from .function import LoRAFunction
from .layer import LoRALinear
from .tuned import TunedLoRAFunction


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


def _layer_and_data(tokens, features, r, alpha, seed):
    """A LoRALinear on a frozen nn.Linear with a trained-looking B (so no variant works on an
    all-zero update), x (N, features) and dL/dy, the same for every variant."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(features, features).requires_grad_(False)
    layer = LoRALinear(base, r, alpha)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(tokens, features, generator=gen)
    return layer, x, torch.randn(tokens, features, generator=gen)


def _step_times(forwards, layer, x, g, repeats):
    """{name: [seconds of forward + backward per round]}, the forwards taking turns, PEFT's
    layer with the same base, A and B joining where peft is installed."""
    features, r, alpha = layer.in_features, layer.r, layer.alpha
    theirs = peft_lora(nn.Sequential(OrderedDict(layer=nn.Linear(features, features))),
                       ["layer"], r, alpha)
    if theirs is not None:
        theirs.layer.base_layer.load_state_dict(layer.base.state_dict())
        copy_factors_to_peft(theirs, nn.Sequential(OrderedDict(layer=layer)))
        forwards = {**forwards, "peft": theirs.layer}

    def step(forward):
        return lambda: forward(x.detach().requires_grad_()).backward(g)

    return round_robin_times({k: step(f) for k, f in forwards.items()}, repeats)


def _benchmark(tokens, features, r, alpha, repeats, seed):
    layer, x, g = _layer_and_data(tokens, features, r, alpha, seed)
    base = layer.base
    W, b, A, B, s = base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling
    forwards = {
        "frozen": base,
        "lora": layer,
        "naive": lambda x: F.linear(x, W + s * B @ A, b),
        "autograd": lambda x: base(x) + s * (x @ A.t()) @ B.t(),
    }
    times = _step_times(forwards, layer, x, g, repeats)
    seconds = medians(times)
    spread = ({k: ratio_spread(times, k, "frozen") for k in times} if repeats > 1 else None)
    return {"tokens": tokens, "features": features, "r": r, "threads": torch.get_num_threads(),
            "seconds": seconds, "ratio": {k: v / seconds["frozen"] for k, v in seconds.items()},
            "spread": spread}


KERNEL_SHAPES = ((512, 8192), (2048, 256), (576, 512))  # (features, tokens) of the table


def benchmark_tuned_forms(tokens=8192, features=512, r=8, alpha=16, repeats=10, seed=0):
    """One LoRA layer, forward + backward, the reference LoRAFunction against the tuned one
    without and with the token split, as LoRALinear runs it (lora/tuned picks), and PEFT's
    layer where installed, taking turns -> {name: ratio to the reference (RatioSpread)}."""
    layer, x, g = _layer_and_data(tokens, features, r, alpha, seed)
    args = (layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling, None)
    forwards = {"reference": lambda x: LoRAFunction.apply(x, *args),
                "tuned, in place": lambda x: TunedLoRAFunction.apply(x, *args, False),
                "tuned, + token split": lambda x: TunedLoRAFunction.apply(x, *args, True),
                "LoRALinear": layer}
    times = _step_times(forwards, layer, x, g, repeats)
    return {k: ratio_spread(times, k, "reference") for k in times}


def print_tuned_forms(repeats=10):
    """The table of benchmark_tuned_forms at the three KERNEL_SHAPES."""
    for features, tokens in KERNEL_SHAPES:
        ratios = benchmark_tuned_forms(tokens, features, repeats=repeats)
        print(f"{features} wide x {tokens} tokens, r = 8, float32, {torch.get_num_threads()} "
              "threads: time / reference's (median [quartiles] of the rounds)")
        for name, ratio in ratios.items():
            print(f"  {name:>22}: {ratio}")


if __name__ == "__main__":
    result = benchmark_lora_linear(threads=2)
    print(f"{result['tokens']} tokens, {result['features']} -> {result['features']}, "
          f"r = {result['r']}, float32, {result['threads']} threads")
    for name, sec in result["seconds"].items():
        print(f"  {name:>8}: {sec * 1e3:7.1f} ms   {result['ratio'][name]:.3f}x frozen")
    print_tuned_forms()
