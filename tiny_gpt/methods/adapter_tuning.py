"""Adapter tuning: small bottleneck MLPs inserted into a frozen transformer.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", Sec. 2.1. Each block gets
two adapters, one on the output of the attention sublayer and one on the output of the MLP
sublayer, *before* that output is added to the residual stream:

    x -> x + A_attn(Attn(LN(x))) -> x + A_mlp(MLP(LN(x)))
    A(h) = h + W_up act(W_down h + b_down) + b_up          h (..., C), W_down (m, C), W_up (C, m)

The bottleneck width m << C sets the parameter count: 2 m C + m + C per adapter. W_up and b_up
start at zero, so A(h) = h and the adapted model computes exactly what the base does at step 0
(Houlsby uses a near-zero init for the same reason; zero makes the identity exact).

Why it cannot be merged away (unlike LoRA): the nonlinearity between W_down and W_up means the
adapter is not a linear map, so it cannot be folded into the sublayer's last projection. Every
inference forward pass pays for 2 extra small matmuls per adapter, in series with the rest of the
block -- lesson 09 measures that overhead.

We wrap the sublayer modules (``block.attn``, ``block.mlp``) instead of editing the model, so the
base model's code is untouched; the paper also trains the layer norms (left frozen here by
default, so that the adapters are the only trainable parameters; ``train_layer_norms`` turns it on).
"""
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class BottleneckAdapter(nn.Module):
    """h -> h + W_up act(W_down h): a residual bottleneck MLP, the identity at initialization."""

    def __init__(self, n_embd: int, bottleneck: int, activation: str = "gelu"):
        super().__init__()
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive integer, got {bottleneck!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.down = nn.Linear(n_embd, bottleneck)   # default nn.Linear init (Kaiming-uniform)
        self.up = nn.Linear(bottleneck, n_embd)
        nn.init.zeros_(self.up.weight)              # up = 0  ->  A(h) = h exactly at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        """h (..., C) -> (..., C)."""
        return h + self.up(ACTIVATIONS[self.activation](self.down(h)))


class AdaptedSublayer(nn.Module):
    """A sublayer (attention or MLP) followed by an adapter on its output. Any extra arguments
    (the attention's prefix_kv) pass straight through to the sublayer."""

    def __init__(self, sublayer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.sublayer = sublayer
        self.adapter = adapter

    def forward(self, x, *args, **kwargs):
        return self.adapter(self.sublayer(x, *args, **kwargs))


def adapter_layers(model):
    """[(path, AdaptedSublayer)] in model order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaptedSublayer)]


def apply_adapter_tuning(model, bottleneck: int = 8, places=("attn", "mlp"),
                         activation: str = "gelu", train_layer_norms: bool = False):
    """Insert a BottleneckAdapter after the named sublayers of every block (in place), freeze
    every base parameter, and return the model. ``places``: any of "attn", "mlp"."""
    if adapter_layers(model):
        raise ValueError("adapter tuning is already applied to this model")
    unknown = set(places) - {"attn", "mlp"}
    if unknown or not places:
        raise ValueError(f"places must be a non-empty subset of ('attn', 'mlp'), got {places!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    n_embd = model.config.n_embd
    for block in model.blocks:
        for place in places:
            device = next(getattr(block, place).parameters()).device
            adapter = BottleneckAdapter(n_embd, bottleneck, activation).to(device)
            setattr(block, place, AdaptedSublayer(getattr(block, place), adapter))
        if train_layer_norms:  # Houlsby et al. Sec. 2.1 also tune the layer norms per task
            for ln in (block.ln1, block.ln2):
                ln.requires_grad_(True)
    return model


def adapter_parameters(model):
    """The adapters' parameters (what apply_adapter_tuning leaves trainable)."""
    return [p for _, layer in adapter_layers(model) for p in layer.adapter.parameters()]
