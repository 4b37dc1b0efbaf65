"""Picking modules by name and swapping them by path: the one rule behind LoRA injection
(lora/inject.py), 4-bit quantization of a model (quant/linear4bit.py), checkpointing part of a
model (tiny_gpt/memory/checkpointing.py) and QLoRA (lora/qlora.py).

A target names a module by its full dotted path ("blocks.0.attn.q_proj") or by the last parts
of it ("q_proj", "attn.q_proj"). QLoRA hands the same targets to the quantizer and to LoRA, so
both must read them the same way; a target that names nothing is an error that lists what
exists, raised before any module is touched. Beside the rule, what kind a module or weight is.
"""
from typing import Iterable, List

import torch


def path_matches(path: str, target: str) -> bool:
    """True if `target` is the module's full path or its last dotted parts."""
    return path == target or path.endswith("." + target)


def is_linear_like(module) -> bool:
    """Anything that maps in_features -> out_features (nn.Linear, Linear4bit, LoRALinear)."""
    return all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features"))


def is_compressed_weight(weight) -> bool:
    """Is `weight` a frozen weight stored compressed -- no tensor, but something with
    .dequantize(dtype), as a 4-bit base's Quantized4bit? (A Tensor has a .dequantize of its
    own, for torch's quantized tensors, so tensors are ruled out first.)"""
    return (not isinstance(weight, torch.Tensor)
            and callable(getattr(weight, "dequantize", None)))


def float_weight(module):
    """module.weight if it is a float tensor (nn.Linear), else None (e.g. a 4-bit layer)."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def factory_kind(module) -> dict:
    """{device, dtype} for new tensors that belong beside `module` (LoRA's factors): its
    device, its float weight's dtype (float32 when it has none, as a 4-bit layer)."""
    tensors, weight = [*module.parameters(), *module.buffers()], float_weight(module)
    return dict(device=tensors[0].device if tensors else None,
                dtype=torch.float32 if weight is None else weight.dtype)


def dense(weight, dtype):
    """The (out, in) float weight to compute with: a compressed weight (is_compressed_weight)
    decoded to `dtype`, a tensor as it is. The one home of QLoRA's habit "decode, use, drop;
    decode again in backward": a function that calls this in forward and again in backward
    keeps only the compressed form alive between the two (quant's DequantMatmul, LoRAFunction)."""
    return weight.dequantize(dtype) if is_compressed_weight(weight) else weight


def as_names(targets, role: str = "target") -> tuple:
    """A name or an iterable of names -> a tuple of non-empty strings (else a ValueError)."""
    names = (targets,) if isinstance(targets, str) else targets
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(f"{role}s must be a module name or a list of names, got {targets!r}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"every {role} must be a non-empty module name (a string), got {bad!r}")
    return names


def select_paths(paths: Iterable[str], targets, kind: str, role: str = "target") -> List[str]:
    """The paths (in their order) that any target matches.

    paths: the candidate module paths, e.g. every linear layer's. kind: what they are, for the
    message ("linear layer"). An empty target list, or a target matching no path, raises a
    ValueError that names it and lists the short names and full paths available."""
    paths, names = list(paths), as_names(targets, role)
    if not names:
        raise ValueError(f"{role}s is empty; name at least one {kind}")
    for name in names:
        if not any(path_matches(p, name) for p in paths):
            short = sorted({p.rsplit(".", 1)[-1] for p in paths})
            raise ValueError(f"{role} {name!r} matches no {kind}. Available short names: "
                             f"{short}; full paths: {paths}")
    return [p for p in paths if any(path_matches(p, n) for n in names)]


def replace_module(model, path: str, new) -> None:
    """Put `new` where the submodule at `path` was (the parent's attribute is reassigned)."""
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
