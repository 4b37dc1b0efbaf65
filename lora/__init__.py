"""LoRA from scratch: the layer with its hand-derived backward, injection by module name,
merge / unmerge, several named adapters, and adapters on disk in the PEFT layout."""
from .function import LoRAFunction
from .layer import LoRAAdapter, LoRALinear
from .inject import (apply_lora, count_parameters, disable_adapters, format_table, lora_layers,
                     lora_state_dict, merge_lora, parameter_table, unmerge_lora)
from .multi import add_adapter, combine_adapters, delete_adapter, set_active_adapters
from .io import (base_fingerprint, load_adapter, load_model_weights, save_adapter,
                 save_merged_model)

__all__ = [
    "LoRAFunction", "LoRAAdapter", "LoRALinear", "apply_lora", "count_parameters",
    "disable_adapters", "format_table", "lora_layers", "lora_state_dict", "merge_lora",
    "parameter_table", "unmerge_lora", "add_adapter", "combine_adapters", "delete_adapter",
    "set_active_adapters", "base_fingerprint", "load_adapter", "load_model_weights",
    "save_adapter", "save_merged_model",
]
