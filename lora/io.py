"""Adapters on disk, in the PEFT layout, written and read without pickle.

An adapter directory holds two files, both written atomically (temporary file + rename):

    adapter_model.safetensors   only the factors, under PEFT's key names
                                    base_model.model.<module path>.lora_A.weight   (r, in)
                                    base_model.model.<module path>.lora_B.weight   (out, r)
                                    base_model.model.<module path>.lora_magnitude_vector
                                                                    (out,)  DoRA only
    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, lora_dropout,
                                use_rslora, use_dora, bias "none", task_type null, and
                                base_model_fingerprint: a hash of the base model's module paths
                                and weight shapes, so that loading onto another architecture
                                fails with a clear message instead of a shape error deep inside.

task_type is null (PEFT's "no task"): with "CAUSAL_LM" PEFT's from_pretrained would wrap our GPT
in its causal-LM class, which needs the Hugging Face generation API that this GPT does not have.

target_modules holds short names ("q_proj") when they pick out exactly the adapted layers,
otherwise full module paths; PEFT matches both the same way (equal, or ending in "." + name).

Loading checks everything before touching the model: the config's fields and types, the
fingerprint (when the config has one; PEFT's own configs do not), the keys (missing and
unexpected ones listed) and shapes, through tiny_gpt.util.safetensors, which parses JSON and copies
raw bytes, so a hostile file can fail but never execute anything. Those checks of an untrusted
folder are in lora/io_checks.py.

Merged models on disk, and QLoRA's float deployment copy, are in lora/export.py.
"""
import hashlib
import json
from pathlib import Path

import torch

from tiny_gpt.util.safetensors import atomic_write_files, load_file, serialize

from .io_checks import (CONFIG_NAME, WEIGHTS_NAME, check_adapter_directory,
                        check_finite_tensors, check_tensors, read_adapter_config)
from .inject import (DEFAULT, adapter_names, apply_lora, base_modules, is_wrappable,
                     lora_layers, match_targets, named_adapters)




def peft_key(path, factor):
    """PEFT's tensor name for factor "A" or "B" of the layer at `path` (or "magnitude", DoRA's
    m, which PEFT saves without a ".weight")."""
    if factor == "magnitude":
        return f"base_model.model.{path}.lora_magnitude_vector"
    return f"base_model.model.{path}.lora_{factor}.weight"


def base_fingerprint(model):
    """16 hex digits hashing every base module path with its weight shapes (adapters ignored;
    a linear layer counts by in/out features, so a 4-bit base matches its float original)."""
    lines = [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters(recurse=False)]
    for path, m in base_modules(model):
        if is_wrappable(m):
            lines.append(f"{path} linear {m.in_features}->{m.out_features} "
                         f"bias={getattr(m, 'bias', None) is not None}")
        else:
            lines += [f"{path}.{n} {tuple(p.shape)}" for n, p in m.named_parameters(recurse=False)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _target_modules(model, paths):
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return short if set(match_targets(model, short)) == set(paths) else list(paths)


def save_adapter(model, directory, adapter_name="default"):
    """Write adapter `adapter_name` to `directory` (created if needed); returns its Path."""
    found = [(p, named_adapters(layer)[adapter_name]) for p, layer in lora_layers(model)
             if adapter_name in named_adapters(layer)]
    if not found:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {adapter_names(model)}")
    tensors = {}
    for path, adapter in found:
        tensors[peft_key(path, "A")] = adapter.lora_A.detach()
        tensors[peft_key(path, "B")] = adapter.lora_B.detach()
        if getattr(adapter, "use_dora", False):
            tensors[peft_key(path, "magnitude")] = adapter.lora_magnitude_vector.detach()
    first = found[0][1]  # one add_adapter call made them all: the same hyper-parameters
    config = {"peft_type": "LORA", "task_type": None, "r": first.r,
              "lora_alpha": first.alpha, "lora_dropout": first.dropout,
              "use_rslora": first.use_rslora, "use_dora": getattr(first, "use_dora", False),
              "bias": "none",
              "target_modules": _target_modules(model, [p for p, _ in found]),
              "base_model_fingerprint": base_fingerprint(model)}
    directory = Path(directory)
    check_adapter_directory(directory)
    atomic_write_files({directory / WEIGHTS_NAME: serialize(tensors, {"format": "pt"}),
                        directory / CONFIG_NAME: json.dumps(config, indent=2).encode("utf-8")})
    return directory


def load_adapter(model, directory, adapter_name="default", activate=True):
    """Read an adapter directory into `model` as `adapter_name` and make it the active one
    (with activate=False it is added inactive, the active ones unchanged). Layers without LoRA
    are wrapped (and the base frozen). Returns `model`."""
    directory = Path(directory)
    config = read_adapter_config(directory / CONFIG_NAME)
    want, have = config["base_model_fingerprint"], base_fingerprint(model)
    if want is not None and want != have:
        raise ValueError(f"{directory}: the adapter was made for a base model with fingerprint "
                         f"{want}, but this model's fingerprint is {have} (module paths or "
                         "weight shapes differ)")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("the model has merged adapters; call unmerge_lora(model) first")
    try:
        paths = match_targets(model, config["target_modules"])
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None
    tensors, _ = load_file(directory / WEIGHTS_NAME)
    r, expected = config["r"], {}
    for path in paths:
        m = model.get_submodule(path)
        expected[peft_key(path, "A")] = (r, m.in_features)
        expected[peft_key(path, "B")] = (m.out_features, r)
        if config["use_dora"]:
            expected[peft_key(path, "magnitude")] = (m.out_features,)
    check_tensors(tensors, expected, str(directory / WEIGHTS_NAME))
    check_finite_tensors(tensors, str(directory / WEIGHTS_NAME))
    hyper = (r, config["lora_alpha"], config["lora_dropout"], config["use_rslora"])
    if adapter_name == DEFAULT and activate and not lora_layers(model):
        apply_lora(model, paths, *hyper, use_dora=config["use_dora"])
    else:  # beyond the path: a named adapter beside others (lora/many)
        from .many import add_adapter, set_active_adapters
        add_adapter(model, adapter_name, paths, *hyper, use_dora=config["use_dora"])
        if activate:
            set_active_adapters(model, [adapter_name])
    with torch.no_grad():
        for path in paths:
            adapter = named_adapters(model.get_submodule(path))[adapter_name]
            adapter.lora_A.copy_(tensors[peft_key(path, "A")])
            adapter.lora_B.copy_(tensors[peft_key(path, "B")])
            if config["use_dora"]:
                adapter.lora_magnitude_vector.copy_(tensors[peft_key(path, "magnitude")])
    return model
