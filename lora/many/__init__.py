"""Beyond the reading path: many adapters on one base.

    layer.py           MultiLoRALinear (a LoRALinear with named adapters), LoRAAdapter, to_many
    multi.py           add, switch, stack, delete, train one, combine into a new adapter
    mixed_function.py  MixedLoRAFunction: every row of a batch with its own A, B (hand backward)
    mixed.py           mixed_adapters: row b of a batch uses adapter names[b], trainable
    serving.py         three ways to serve a batch of requests for many adapters, row for row
    library.py         AdapterLibrary: adapter directories on disk, listed, loaded lazily
    measure.py         a mixed batch against each row alone (logits, gradients), adapter
                       bytes, tokens per second of each way of serving (lesson 11)
"""
from .layer import LoRAAdapter, MultiLoRALinear, to_many
from .multi import (add_adapter, as_many, combine_adapters, delete_adapter,
                    set_active_adapters, train_only_adapter)
from .mixed_function import MixedLoRAFunction
from .mixed import mixed_adapters
from .serving import merge_drift, serve_answers, serve_logits
from .library import AdapterLibrary

__all__ = ["LoRAAdapter", "MultiLoRALinear", "to_many", "add_adapter", "as_many",
           "combine_adapters", "delete_adapter", "set_active_adapters", "train_only_adapter",
           "MixedLoRAFunction", "mixed_adapters", "merge_drift", "serve_answers",
           "serve_logits", "AdapterLibrary"]
