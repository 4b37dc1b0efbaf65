"""PiSSA (Meng et al. 2024): start the adapter on the principal part of W0 instead of at zero.

LoRA starts from B = 0, so its first steps move the model along a random A. PiSSA takes the r
largest singular directions of the frozen weight itself, W0 = U S V^T:

    s B A = U_r S_r V_r^T      B = U_r S_r^(1/2) / sqrt(s)     (out, r)
                               A = S_r^(1/2) V_r^T / sqrt(s)   (r, in)
    W_res = W0 - s B A         the frozen base from now on

At step 0 the layer computes W_res x + s B A x = W0 x: the model equals its base (up to float
rounding), as with B = 0, but the trained factors are the part of W0 that matters most, and
the rest is frozen. (U_r, S_r, V_r: the top r of the SVD, computed in float64.)

The catch is on disk: a PiSSA adapter belongs to W_res, not to W0. `pissa_to_lora` turns it
into a plain LoRA adapter of rank 2r for the original base, exactly (PEFT does the same when
asked to convert): with (A0, B0) the factors at initialization and (A, B) after training,

    W_res + s B A = W0 + s B A - s B0 A0 = W0 + [sB, -sB0] [A; A0]

so the base gets back W_res + s B0 A0 = W0 and the adapter becomes B' = [sB, -sB0] (out, 2r),
A' = [A; A0] (2r, in) with scaling 1 (alpha = 2r).
"""
import math

import torch
import torch.nn as nn

from tiny_gpt.util.modules import float_weight

from ..inject import lora_layers, named_adapters
from ..layer import LoRALinear


def check_pissa_bases(model, paths):
    """Raise unless every module at `paths` has a float weight to take the SVD of."""
    bad = [p for p in paths if float_weight(_base(model.get_submodule(p))) is None]
    if bad:
        raise ValueError(f"PiSSA needs a float base weight (an SVD of W0); {bad} have none "
                         "(4-bit)")


def _base(module):
    return module.base if isinstance(module, LoRALinear) else module


def _layers_with(model, name):
    layers = [(p, m) for p, m in lora_layers(model) if name in named_adapters(m)]
    if not layers:
        raise ValueError(f"no adapter {name!r} in the model")
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"PiSSA needs unmerged layers; {merged} are merged")
    check_pissa_bases(model, [p for p, _ in layers])
    return layers


@torch.no_grad()
def pissa_init(model, adapter_name="default"):
    """Initialize adapter `adapter_name` from the top-r SVD of each base weight and freeze the
    residual as the base (see the module docstring). Every layer is checked before any is
    changed. Returns {layer path: (A0, B0)}, the initial factors, for pissa_to_lora."""
    layers = _layers_with(model, adapter_name)
    initial = {}
    for path, layer in layers:
        adapter = named_adapters(layer)[adapter_name]
        weight = layer.base.weight
        U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
        root = S[:adapter.r].sqrt() / math.sqrt(adapter.scaling)         # (r,)
        B = (U[:, :adapter.r] * root).to(weight.dtype)                    # (out, r)
        A = (root[:, None] * Vh[:adapter.r]).to(weight.dtype)             # (r, in)
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        weight.sub_(adapter.delta_weight().to(weight.dtype))              # W_res = W0 - sBA
        initial[path] = (A.clone(), B.clone())
    return initial


@torch.no_grad()
def pissa_to_lora(model, initial, adapter_name="default"):
    """Give back every layer its original W0 and replace the PiSSA adapter by the plain LoRA
    adapter of rank 2r that gives the same layer (see the module docstring). `initial`:
    pissa_init's return. The adapter keeps its name and dropout; its alpha becomes 2r."""
    layers = _layers_with(model, adapter_name)
    missing = [p for p, _ in layers if p not in initial]
    if missing:
        raise ValueError(f"no initial factors for {missing}: pass what pissa_init returned")
    for path, layer in layers:
        adapter = named_adapters(layer)[adapter_name]
        A0, B0 = initial[path]
        s = adapter.scaling
        layer.base.weight.add_((s * B0 @ A0).to(layer.base.weight.dtype))
        A = torch.cat([adapter.lora_A, A0])                                  # (2r, in)
        B = torch.cat([s * adapter.lora_B, -s * B0], dim=1)                  # (out, 2r)
        trainable = adapter.lora_A.requires_grad, adapter.lora_B.requires_grad
        adapter.lora_A = nn.Parameter(A, requires_grad=trainable[0])
        adapter.lora_B = nn.Parameter(B, requires_grad=trainable[1])
        adapter.r = adapter.alpha = 2 * adapter.r
        adapter.scaling, adapter.use_rslora = 1.0, False                     # alpha = 2r
    return model
