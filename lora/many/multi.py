"""Several named adapters on one model: add, switch, stack, delete, and combine into a new one.

A layer with several adapters is a MultiLoRALinear (many/layer.py): a ModuleDict of adapters
keyed by name, each with its own r, alpha, scaling and dropout. A one-adapter LoRALinear becomes
one when a second adapter joins it (its adapter is then "default"). The active adapters are
used in forward; when several are active their updates add up ("stacking"):

    y = W0 x + b + sum_i s_i B_i A_i x

A weighted combination builds a NEW adapter whose update is, or approximates, sum_i w_i dW_i
with dW_i = s_i B_i A_i:
  "cat"     A = [A_1; A_2; ...]  (sum r_i, in),  B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
            (out, sum r_i), scaling 1 (alpha = r). Exact, since B A = sum_i w_i s_i B_i A_i;
            the price is rank sum r_i.
  "linear"  dW = sum_i w_i s_i B_i A_i refactored to rank r (default: the largest r_i) by a
            truncated SVD dW ~ U_r S_r V_r^T:  B = U_r S_r^(1/2),  A = S_r^(1/2) V_r^T,  scaling 1.
            Exact only when rank(dW) <= r; otherwise it is the best rank-r approximation in the
            Frobenius norm (Eckart-Young), and the relative error ||dW - B A|| / ||dW|| is reported.
"""
import math

import torch

from tiny_gpt.util.checks import is_number, is_whole_number
from tiny_gpt.util.modules import replace_module

from ..inject import (DEFAULT, adapter_names, freeze_base, lora_layers, match_targets,
                      named_adapters)
from ..layer import LoRALinear, check_lora_args
from ..variants import check_dora_base, variant_layer
from .layer import MultiLoRALinear, check_adapter_name, to_many


def add_adapter(model, name, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0,
                use_rslora=False, use_dora=False):
    """Add adapter `name` to the target layers (wrapping those without LoRA) and freeze every
    non-adapter parameter. The new adapter starts inactive: see set_active_adapters. -> model"""
    _add_inactive(model, match_targets(model, targets), name, r, alpha, dropout, use_rslora,
                  use_dora)
    freeze_base(model)
    return model


def as_many(model, paths=None):
    """Turn the LoRA layers at `paths` (default: all) into MultiLoRALinear, in place (each
    keeps its adapter's tensors, as "default"). -> [(path, MultiLoRALinear)]"""
    found = []
    for path, layer in lora_layers(model):
        if paths is None or path in paths:
            many = to_many(layer)
            if many is not layer:
                replace_module(model, path, many)
            found.append((path, many))
    return found


def attach_adapter(model, paths, name, r, alpha, dropout=0.0, use_rslora=False,
                   use_dora=False):
    """Give every layer in `paths` an adapter `name`: wrap plain linear layers (the adapter
    active there), add it to LoRA layers (inactive). Checks first, so a bad argument leaves the
    model untouched. Returns the MultiLoRALinear layers."""
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists in the model; pick another name")
    modules = [model.get_submodule(p) for p in paths]
    for path, m in zip(paths, modules):
        check_lora_args(r, alpha, dropout, m.in_features, m.out_features)
        if isinstance(m, LoRALinear) and m.merged:
            raise RuntimeError(f"{path} is merged; call unmerge_lora(model) first")
        if use_dora:
            check_dora_base(m.base if isinstance(m, LoRALinear) else m, dropout, path)
    layers = []
    for path, m in zip(paths, modules):
        if isinstance(m, LoRALinear):
            m = to_many(m)
            m.add_adapter(name, r, alpha, dropout, use_rslora, use_dora)
        else:
            m = MultiLoRALinear(variant_layer(use_dora)(m, r, alpha, dropout, use_rslora), name)
        replace_module(model, path, m)
        layers.append(m)
    return layers


def train_only_adapter(model, name):
    """Make adapter `name` the only trainable thing in the model (its A and B in every layer):
    the base and every other adapter get requires_grad = False. -> model"""
    _check_known(model, [name])
    own = set()
    for _, layer in lora_layers(model):
        if name in named_adapters(layer):
            base = {id(p) for p in layer.base.parameters()}
            own |= {id(p) for p in named_adapters(layer)[name].parameters()} - base
    for p in model.parameters():
        p.requires_grad_(id(p) in own)
    return model


def _add_inactive(model, paths, name, r, alpha, dropout=0.0, use_rslora=False, use_dora=False):
    for layer in attach_adapter(model, paths, name, r, alpha, dropout, use_rslora, use_dora):
        layer.set_active([n for n in layer.active if n != name])


def _check_known(model, names):
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the model has {known}")


def _check_unmerged(layers, action):
    merged = [path for path, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"cannot {action}: {merged} are merged; call unmerge_lora first")


def set_active_adapters(model, names):
    """Use these adapters (a name or a list; several are stacked) in every layer that has them."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    _check_unmerged(lora_layers(model), "change the active adapters")
    if names == [DEFAULT] and not any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        return model  # one-adapter layers: "default" is all they have, always active
    for _, layer in as_many(model):
        layer.set_active([n for n in names if n in layer.adapters])
    return model


def delete_adapter(model, name):
    """Remove adapter `name`; a layer left with no adapter becomes its plain base layer again."""
    _check_known(model, [name])
    layers = [(p, layer) for p, layer in lora_layers(model) if name in named_adapters(layer)]
    _check_unmerged(layers, f"delete adapter {name!r}")
    for path, layer in as_many(model, {p for p, _ in layers}):
        layer.delete_adapter(name)
        if not layer.adapters:
            replace_module(model, path, layer.base)
    return model


@torch.no_grad()
def _combined_factors(adapters, method, r):
    """[(weight, LoRAAdapter)] -> (B (out, k), A (k, in), relative Frobenius error)."""
    target = sum(w * a.delta_weight() for w, a in adapters)               # (out, in)
    if method == "cat":
        A = torch.cat([a.lora_A for _, a in adapters])                     # (sum r_i, in)
        B = torch.cat([w * a.scaling * a.lora_B for w, a in adapters], 1)  # (out, sum r_i)
    else:
        U, S, Vh = torch.linalg.svd(target.double(), full_matrices=False)
        root = S[:r].sqrt()                                                # (r,)
        B, A = (U[:, :r] * root).to(target.dtype), (root[:, None] * Vh[:r]).to(target.dtype)
    norm = target.norm()
    error = ((target - B @ A).norm() / norm).item() if norm > 0 else 0.0
    return B, A, error


def combine_adapters(model, weights, new_name, method="linear", r=None):
    """New adapter `new_name` ~ sum of weights[name] * dW_name (see the module docstring).

    weights: {adapter name: float}. method: "cat" (exact, rank sum r_i) or "linear" (SVD to rank
    r, default max r_i). The new adapter starts inactive. Returns {layer path: relative error}.
    """
    if method not in ("linear", "cat"):
        raise ValueError(f"method must be 'linear' or 'cat', got {method!r}")
    if method == "cat" and r is not None:
        raise ValueError("r applies to method='linear' only; 'cat' has rank sum r_i")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must be a non-empty dict {adapter name: weight}, got "
                         f"{weights!r}")
    bad = {n: w for n, w in weights.items() if not (is_number(w) and math.isfinite(w))}
    if bad:
        raise ValueError(f"every weight must be a finite number; got {bad}")
    if not (r is None or is_whole_number(r, 1)):
        raise ValueError(f"r must be None (the largest r of the adapters combined) or a whole "
                         f"number >= 1, got {r!r}")
    _check_known(model, list(weights))
    layers = [(p, named_adapters(l)) for p, l in lora_layers(model)
              if any(n in named_adapters(l) for n in weights)]
    dora = sorted({n for _, a in layers for n in weights if n in a
                   and getattr(a[n], "use_dora", False)})
    if dora:
        raise ValueError(f"DoRA adapters {dora} are not a sum of s B A; they cannot be combined")
    partial = [p for p, a in layers if not all(n in a for n in weights)]
    if partial:
        raise ValueError(f"layers {partial} lack some of {list(weights)}; combine adapters that "
                         "sit on the same layers")
    factors = {}
    for path, named in layers:
        adapters = [(w, named[n]) for n, w in weights.items()]
        rank = max(a.r for _, a in adapters) if r is None else r
        if method == "linear":
            layer = model.get_submodule(path)
            check_lora_args(rank, 1.0, 0.0, layer.in_features, layer.out_features)
        factors[path] = _combined_factors(adapters, method, rank)
    rank = next(iter(factors.values()))[1].shape[0]
    # alpha = rank (no rslora) makes the new scaling 1: the weights and s_i live in B.
    _add_inactive(model, list(factors), new_name, rank, alpha=rank)
    with torch.no_grad():
        for path, (B, A, _) in factors.items():
            adapter = model.get_submodule(path).adapters[new_name]
            adapter.lora_A.copy_(A)
            adapter.lora_B.copy_(B)
    return {path: error for path, (_, _, error) in factors.items()}
