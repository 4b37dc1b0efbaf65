"""Putting LoRA into a model: pick layers by name, wrap them, freeze the rest; and the
whole-model switches: merge, unmerge, disable.

Layers are chosen by module path with the project's one rule (tiny_gpt/util/modules.py): a
target matches a path equal to it or ending in "." + target, so "q_proj" picks every block's
query projection and "blocks.0.attn.q_proj" only the first.
The LoRA paper adapts W_q and W_v (Hu et al. 2021, Sec. 4.2, 7.1), hence the default targets.
A "linear layer" is anything with integer in_features and out_features (nn.Linear, or a 4-bit
Linear4bit from quant), so QLoRA is apply_lora on a quantized model.

Every LoRA layer is a LoRALinear (the variants and the several-adapter layer of lora/many are
subclasses of it), so lora_layers finds them all, and merge / unmerge / disable only call the
methods every LoRALinear has.
"""
from contextlib import contextmanager

from tiny_gpt.util.modules import is_linear_like, replace_module, select_paths

from .layer import LoRALinear, check_lora_args

DEFAULT = "default"  # the adapter's name in PEFT's layout, as a one-adapter layer's is called


def is_wrappable(module):
    """A layer LoRA can wrap: linear-like and not already a LoRALinear."""
    return is_linear_like(module) and not isinstance(module, LoRALinear)


def base_modules(model, prefix=""):
    """(path, module) for every submodule of the base model: each LoRALinear is seen as its
    base layer, at its own path, and its adapters are skipped."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, LoRALinear):
            yield path, child.base
        else:
            yield path, child
            yield from base_modules(child, path + ".")


def lora_layers(model):
    """[(path, LoRALinear)] in model order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def named_adapters(layer):
    """{name: adapter} of a LoRA layer: a layer with several (lora/many) keeps them in
    .adapters; a LoRALinear is its own one adapter, called "default" as in PEFT."""
    adapters = getattr(layer, "adapters", None)
    return {DEFAULT: layer} if adapters is None else adapters


def adapter_names(model):
    """Every adapter name present in the model, in first-seen order."""
    return list(dict.fromkeys(n for _, layer in lora_layers(model) for n in named_adapters(layer)))


def match_targets(model, targets):
    """Paths of the linear layers that the targets name; unknown targets raise ValueError."""
    linear = [p for p, m in base_modules(model) if is_wrappable(m)]
    return select_paths(linear, targets, "linear layer")


def freeze_base(model):
    """requires_grad = False for every parameter that is not a LoRA factor."""
    layers = [layer for _, layer in lora_layers(model)]
    base = {id(p) for layer in layers for p in layer.base.parameters()}
    adapter_params = {id(p) for layer in layers for p in layer.parameters()} - base
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, use_rslora=False,
               use_dora=False, init_lora_weights=True):
    """Wrap the target linear layers of `model` in LoRALinear (in place), freeze every other
    parameter; returns `model`. Applying LoRA to a layer that already has it is an error: use
    lora.add_adapter for a second adapter. Every argument is checked before the model changes.

    use_dora: DoRA layers (lora/variants/dora.py). init_lora_weights: True (B = 0, LoRA's) or
    "pissa" (lora/variants/pissa.py: the top-r SVD of W0, the residual frozen as the base).
    """
    if init_lora_weights not in (True, "pissa"):
        raise ValueError(f"init_lora_weights must be True or 'pissa', got {init_lora_weights!r}"
                         " (LoftQ is lora.prepare_qlora(..., init_lora_weights='loftq'))")
    paths = match_targets(model, targets)
    wrapped = [p for p in paths if isinstance(model.get_submodule(p), LoRALinear)]
    if wrapped:
        raise ValueError(f"LoRA is already applied to {wrapped}; use lora.add_adapter(...) to "
                         "add a second adapter")
    bases = [model.get_submodule(p) for p in paths]
    for base in bases:
        check_lora_args(r, alpha, dropout, base.in_features, base.out_features)
    layer_class = LoRALinear
    if use_dora or init_lora_weights == "pissa":  # beyond the path: the variants
        from .variants import check_variant, variant_layer
        check_variant(model, paths, dropout, use_dora, init_lora_weights)
        layer_class = variant_layer(use_dora)
    for path, base in zip(paths, bases):
        replace_module(model, path, layer_class(base, r, alpha, dropout, use_rslora))
    freeze_base(model)
    if init_lora_weights == "pissa":
        from .variants import pissa_init
        pissa_init(model)
    return model


def merge_lora(model):
    """Fold every LoRA layer's update into its base weight; returns `model`. Every layer is
    checked first, so a layer that cannot merge leaves all of them unmerged."""
    layers = lora_layers(model)
    for path, layer in layers:
        layer.check_can_merge(path)  # first: a layer's own reason is the more precise one
    # a layer with several adapters (lora/many) may have none active, e.g. the active deleted
    if layers and not any(getattr(layer, "active", True) for _, layer in layers):
        raise ValueError(f"no active adapter to merge; the model has {adapter_names(model)}: "
                         "choose the ones to merge with set_active_adapters first")
    return _every_layer_or_none(model, "check_can_merge", "merge")


def unmerge_lora(model):
    """Undo merge_lora; returns `model`. Checked first for every layer, as merge_lora is."""
    return _every_layer_or_none(model, "check_can_unmerge", "unmerge")


def _every_layer_or_none(model, check, action):
    """Run layer.<check>(path) on every LoRALinear, and only if none raised, layer.<action>()."""
    layers = lora_layers(model)
    for path, layer in layers:
        getattr(layer, check)(path)
    for _, layer in layers:
        getattr(layer, action)()
    return model


@contextmanager
def disable_adapters(model):
    """Inside the block the model computes its base output (adapters kept, just skipped)."""
    named = lora_layers(model)
    merged = [p for p, layer in named if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged adapters ({merged}); call unmerge_lora first")
    layers = [layer for _, layer in named]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag
