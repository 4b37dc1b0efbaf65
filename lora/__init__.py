"""LoRA from scratch.

The reading path, in order (the whole of LoRA and QLoRA's adapter side):

    function.py  LoRAFunction: y = x W0^T + b + s (x A^T) B^T with its backward derived by hand
    layer.py     LoRALinear: a frozen base + one adapter (A, B, scaling, dropout, merge)
    inject.py    apply_lora by module name, merge_lora / unmerge_lora / disable over a model
    io.py        adapters and merged models on disk (safetensors, PEFT's layout and key names)
    qlora.py     QLoRA: quant's 4-bit base with LoRA on top

Beyond it, each in its own place:

    tuned/       TunedLoRAFunction: fewer passes than the reference, picked in tuned/__init__.py
    many/        several named adapters: switch, stack, combine, per-row batches, serving, a
                 library of adapters on disk
    variants/    DoRA, PiSSA, LoftQ
    export.py    merged models on disk, QLoRA's float deployment copy
    params.py    parameter counts and tables, the adapter tensors of a state dict, the base of
                 a LoRA model as a logits function
    fused_io.py  GPT-2's q/k/v adapters against PEFT's one adapter on the fused c_attn
    analysis.py  the LoRA paper's Sec. 7: subspace similarity and amplification
    stack_check.py  a few steps of QLoRA next to its float twin, before a long run
    bench.py     a LoRA layer's cost against the frozen one, and the tuned forms against the
                 reference
"""
from .function import LoRAFunction
from .layer import LoRALinear, lora_scaling
from .inject import apply_lora, disable_adapters, lora_layers, merge_lora, unmerge_lora
from .io import base_fingerprint, load_adapter, save_adapter
from .qlora import prepare_qlora
from .export import dequantized_float_model, load_model_weights, save_merged_model
from .params import count_parameters, format_table, lora_state_dict, parameter_table
from .variants import DoRAFunction, DoRALinear, apply_loftq, loftq_init, pissa_init, pissa_to_lora
from .many import (AdapterLibrary, LoRAAdapter, MixedLoRAFunction, MultiLoRALinear,
                   add_adapter, combine_adapters, delete_adapter, mixed_adapters,
                   serve_answers, serve_logits, set_active_adapters, train_only_adapter)
from .stack_check import StackReport, check_qlora_stack
from .fused_io import load_adapter_fused, save_adapter_fused

__all__ = [
    "LoRAFunction", "LoRAAdapter", "LoRALinear", "lora_scaling", "apply_lora",
    "count_parameters", "disable_adapters", "format_table", "lora_layers", "lora_state_dict",
    "merge_lora", "parameter_table", "unmerge_lora", "add_adapter", "combine_adapters",
    "delete_adapter", "set_active_adapters", "train_only_adapter", "base_fingerprint",
    "load_adapter", "load_model_weights", "save_adapter", "save_merged_model", "prepare_qlora",
    "dequantized_float_model", "StackReport", "check_qlora_stack", "mixed_adapters",
    "MixedLoRAFunction", "serve_answers", "serve_logits", "AdapterLibrary", "DoRAFunction",
    "DoRALinear", "MultiLoRALinear", "pissa_init", "pissa_to_lora", "loftq_init",
    "apply_loftq", "save_adapter_fused", "load_adapter_fused",
]
