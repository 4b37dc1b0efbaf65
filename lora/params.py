"""Views of a LoRA model: parameter counts, a per-module table, the adapter tensors alone, and
its base as a logits function."""
from .inject import disable_adapters, lora_layers, named_adapters


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


def lora_state_dict(model, adapter_name=None):
    """Only the adapter tensors of model.state_dict() (of one adapter, or of all), under
    their state_dict keys."""
    out = {}
    for path, layer in lora_layers(model):
        several = hasattr(layer, "adapters")
        for name, adapter in named_adapters(layer).items():
            if adapter_name not in (None, name):
                continue
            prefix = f"{path}.adapters.{name}." if several else f"{path}."
            out.update({prefix + k: v for k, v in adapter.state_dict().items()
                        if not k.startswith("base.")})
    return out


def base_logits(model):
    """The base of a LoRA model as a logits function, idx (B, T) -> logits (B, T, V): the same
    model with its adapters disabled (W0 x + b in every adapted layer; disable_adapters), so no
    copy of the base is kept. At B = 0 it equals the model itself, bit for bit."""
    def logits(idx):
        with disable_adapters(model):
            return model(idx)[0]
    return logits
