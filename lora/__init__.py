"""LoRA from scratch: the layer with its hand-derived backward, injection by module name,
merge / unmerge, several named adapters, adapters on disk in the PEFT layout, and QLoRA.

    function.py  LoRAFunction: y = x W0^T + s (x A^T) B^T with its backward derived by hand
    layer.py     LoRAAdapter (one A, B pair) and LoRALinear (a frozen base + named adapters)
    dora.py      DoRAFunction: DoRA's magnitude and direction, exact and memory-saving backward
    pissa.py     PiSSA: adapters started on W0's top singular part; back to plain LoRA exactly
    loftq.py     LoftQ: the 4-bit base and the adapters initialized together
    inject.py    apply_lora, merge / unmerge / disable over a model, parameter counts
    multi.py     several adapters: add, switch, delete, combine
    mixed_function.py  MixedLoRAFunction: every row of a batch with its own A, B (hand backward)
    mixed.py     mixed_adapters: row b of a batch uses adapter names[b], trainable
    serving.py   three ways to serve a batch of requests for many adapters, row for row equal
    library.py   AdapterLibrary: adapter directories on disk, listed, loaded lazily, unloaded
    io.py        adapters and merged models on disk (safetensors, PEFT's key names)
    fused_io.py  our GPT-2's q/k/v adapters against PEFT's one adapter on the fused c_attn
    analysis.py  the LoRA paper's Sec. 7: subspace similarity and amplification
    qlora.py     QLoRA: quant's 4-bit base with LoRA on top, and its float deployment copy
    stack_check.py  a few steps of QLoRA next to its float twin, before a long run
    bench.py     benchmark_lora_linear: a LoRA layer's cost against the frozen one
"""
from .function import LoRAFunction
from .dora import DoRAFunction
from .pissa import pissa_init, pissa_to_lora
from .loftq import apply_loftq, loftq_init
from .layer import LoRAAdapter, LoRALinear, lora_scaling
from .inject import (apply_lora, count_parameters, disable_adapters, format_table, lora_layers,
                     lora_state_dict, merge_lora, parameter_table, unmerge_lora)
from .multi import (add_adapter, combine_adapters, delete_adapter, set_active_adapters,
                    train_only_adapter)
from .mixed import mixed_adapters
from .mixed_function import MixedLoRAFunction
from .serving import serve_answers, serve_logits
from .library import AdapterLibrary
from .qlora import dequantized_float_model, prepare_qlora
from .stack_check import StackReport, check_qlora_stack
from .io import (base_fingerprint, load_adapter, load_model_weights, save_adapter,
                 save_merged_model)
from .fused_io import load_adapter_fused, save_adapter_fused

__all__ = [
    "LoRAFunction", "LoRAAdapter", "LoRALinear", "lora_scaling", "apply_lora",
    "count_parameters", "disable_adapters", "format_table", "lora_layers", "lora_state_dict",
    "merge_lora", "parameter_table", "unmerge_lora", "add_adapter", "combine_adapters",
    "delete_adapter", "set_active_adapters", "train_only_adapter", "base_fingerprint",
    "load_adapter", "load_model_weights", "save_adapter", "save_merged_model", "prepare_qlora",
    "dequantized_float_model", "StackReport", "check_qlora_stack", "mixed_adapters",
    "MixedLoRAFunction", "serve_answers", "serve_logits", "AdapterLibrary", "DoRAFunction",
    "pissa_init", "pissa_to_lora", "loftq_init", "apply_loftq", "save_adapter_fused",
    "load_adapter_fused",
]
