"""Beyond the reading path: the LoRA variants, each a small change to the layer or its start.

    dora.py   DoRA (Liu et al. 2024): DoRAFunction, magnitude and direction, and DoRALinear
    pissa.py  PiSSA (Meng et al. 2024): adapters started on W0's top singular part
    loftq.py  LoftQ (Li et al. 2023): the 4-bit base and the adapters initialized together

apply_lora reaches them through check_variant and variant_layer, its one dispatch.
"""
from ..layer import LoRALinear
from .dora import DoRAFunction, DoRALinear, check_dora_base, dora_reference
from .loftq import apply_loftq, loftq_init
from .pissa import check_pissa_bases, pissa_init, pissa_to_lora


def check_variant(model, paths, dropout, use_dora, init_lora_weights):
    """Raise, before anything changes, unless the layers at `paths` can take the variant."""
    if use_dora:
        for path in paths:
            check_dora_base(model.get_submodule(path), dropout, path)
    if init_lora_weights == "pissa":
        check_pissa_bases(model, paths)


def variant_layer(use_dora):
    """The layer class apply_lora wraps with."""
    return DoRALinear if use_dora else LoRALinear


__all__ = ["DoRAFunction", "DoRALinear", "check_dora_base", "dora_reference", "apply_loftq",
           "loftq_init", "check_pissa_bases", "pissa_init", "pissa_to_lora", "check_variant",
           "variant_layer"]
