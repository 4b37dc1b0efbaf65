"""Putting LoRA into a model: pick layers by name, wrap them, freeze the rest, and the
whole-model switches (merge, unmerge, disable) and views (parameter counts, adapter tensors).

Layers are chosen by module path with the project's one rule (tiny_gpt/util/modules.py): a
target matches a path equal to it or ending in "." + target, so "q_proj" picks every block's
query projection and "blocks.0.attn.q_proj" only the first.
The LoRA paper adapts W_q and W_v (Hu et al. 2021, Sec. 4.2, 7.1), hence the default targets.
A "linear layer" is anything with integer in_features and out_features (nn.Linear, or a 4-bit
Linear4bit from quant), so QLoRA is apply_lora on a quantized model.
"""
from contextlib import contextmanager

from tiny_gpt.util.modules import is_linear_like, replace_module, select_paths

from .layer import LoRALinear, check_adapter_name, check_dora_base, check_lora_args
from .pissa import check_pissa_bases, pissa_init


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


def match_targets(model, targets):
    """Paths of the linear layers that the targets name; unknown targets raise ValueError."""
    linear = [p for p, m in base_modules(model) if is_wrappable(m)]
    return select_paths(linear, targets, "linear layer")


def adapter_names(model):
    """Every adapter name present in the model, in first-seen order."""
    return list(dict.fromkeys(n for _, layer in lora_layers(model) for n in layer.adapters))


def attach_adapter(model, paths, name, r, alpha, dropout=0.0, use_rslora=False,
                   use_dora=False):
    """Give every layer in `paths` an adapter `name`: wrap plain linear layers in LoRALinear
    (which makes it active there), add it to LoRALinear ones (inactive). Checks first, so a bad
    argument leaves the model untouched. Returns the LoRALinear layers."""
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
            m.add_adapter(name, r, alpha, dropout, use_rslora, use_dora)
        else:
            m = LoRALinear(m, r, alpha, dropout, use_rslora, adapter_name=name, use_dora=use_dora)
            replace_module(model, path, m)
        layers.append(m)
    return layers


def freeze_base(model):
    """requires_grad = False for every parameter that is not a LoRA factor."""
    adapter_params = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0, use_rslora=False,
               adapter_name="default", use_dora=False, init_lora_weights=True):
    """Wrap the target linear layers of `model` in LoRALinear (in place), make the new adapter
    active there, freeze every other parameter; returns `model`. Applying LoRA to a layer that
    already has it is an error: use lora.add_adapter for a second adapter.

    use_dora: DoRA adapters (lora/dora.py; the memory-saving backward, as PEFT's; set an
        adapter's .dora_exact for the exact one). init_lora_weights: True (B = 0, LoRA's) or
        "pissa" (lora/pissa.py: the top-r SVD of W0, the residual frozen as the base).
    """
    if init_lora_weights not in (True, "pissa"):
        raise ValueError(f"init_lora_weights must be True or 'pissa', got {init_lora_weights!r}"
                         " (LoftQ is lora.prepare_qlora(..., init_lora_weights='loftq'))")
    paths = match_targets(model, targets)
    wrapped = [p for p in paths if isinstance(model.get_submodule(p), LoRALinear)]
    if wrapped:
        raise ValueError(f"LoRA is already applied to {wrapped}; use lora.add_adapter(...) to "
                         "add a second adapter")
    if init_lora_weights == "pissa":
        check_pissa_bases(model, paths)
    attach_adapter(model, paths, adapter_name, r, alpha, dropout, use_rslora, use_dora)
    freeze_base(model)
    if init_lora_weights == "pissa":
        pissa_init(model, adapter_name)
    return model


def count_parameters(model):
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_table(model):
    """[(module path, trainable, total)] for every module that owns parameters directly."""
    rows = []
    for path, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if params:
            rows.append((path or "(root)", sum(p.numel() for p in params if p.requires_grad),
                         sum(p.numel() for p in params)))
    return rows


def format_table(rows, header=("module", "trainable", "total")):
    """Rows of (name, int, int) -> an aligned text table with a total line."""
    rows = list(rows) + [("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]
    width = max(len(str(r[0])) for r in [header, *rows])
    lines = [f"{header[0]:<{width}}  {header[1]:>10}  {header[2]:>10}"]
    lines += [f"{name:<{width}}  {t:>10,}  {n:>10,}" for name, t, n in rows]
    return "\n".join(lines)


def merge_lora(model):
    """Fold every LoRALinear's active adapters into its base weight; returns `model`. Every
    layer is checked first, so a layer that cannot merge leaves all of them unmerged."""
    layers = lora_layers(model)
    for path, layer in layers:
        layer.check_can_merge(path)  # first: a layer's own reason is the more precise one
    if layers and not any(layer.active for _, layer in layers):  # e.g. the active one deleted
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


def lora_state_dict(model, adapter_name=None):
    """Only the adapter tensors of model.state_dict() (of one adapter, or of all)."""
    out = {}
    for path, layer in lora_layers(model):
        for name, adapter in layer.adapters.items():
            if adapter_name in (None, name):
                out.update(adapter.state_dict(prefix=f"{path}.adapters.{name}."))
    return out
