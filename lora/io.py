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
raw bytes, so a hostile file can fail but never execute anything.

Merged models on disk, and QLoRA's float deployment copy, are in lora/export.py.
"""
import hashlib
import json
import math
from pathlib import Path

import torch

from tiny_gpt.util.safetensors import atomic_write_files, load_file, serialize

from .inject import (DEFAULT, adapter_names, apply_lora, base_modules, is_wrappable,
                     lora_layers, match_targets, named_adapters)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REQUIRED = {"peft_type": str, "r": int, "lora_alpha": (int, float), "target_modules": list}
OPTIONAL = {"lora_dropout": ((int, float), 0.0), "use_rslora": (bool, False),
            "bias": (str, "none"), "base_model_fingerprint": (str, None),
            "use_dora": (bool, False)}


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
    _check_adapter_directory(directory)
    atomic_write_files({directory / WEIGHTS_NAME: serialize(tensors, {"format": "pt"}),
                        directory / CONFIG_NAME: json.dumps(config, indent=2).encode("utf-8")})
    return directory


def _check_adapter_directory(directory):
    """Refuse, before writing anything, a directory that is a file, or one where a folder has
    taken the name of one of the two files (the rename into place would fail halfway)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; save_adapter needs a directory to write "
                         f"{WEIGHTS_NAME} and {CONFIG_NAME} into")
    folders = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if (directory / name).is_dir()]
    if folders:
        raise ValueError(f"{directory}: {folders} are folders where save_adapter writes its "
                         "files; remove them or save to another directory")


def _check_types(config, path):
    types = {**REQUIRED, **{k: t for k, (t, _) in OPTIONAL.items()}}
    for key, kind in types.items():
        value = config[key]
        if key == "base_model_fingerprint" and value is None:
            continue  # configs written by PEFT itself have no fingerprint
        # JSON true/false are Python bools, which isinstance(..., int) would accept
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(f"{path}: field {key!r} must be {kind}, got {value!r}")


def read_adapter_config(path):
    """Parse and validate adapter_config.json -> dict with the optional fields filled in."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{path}: missing required fields {missing}")
    config = {**{k: default for k, (_, default) in OPTIONAL.items()}, **config}
    _check_types(config, path)
    if not (config["r"] >= 1 and 0 < config["lora_alpha"] < math.inf
            and 0 <= config["lora_dropout"] < 1):
        raise ValueError(f"{path}: need r >= 1, finite lora_alpha > 0 and 0 <= lora_dropout "
                         f"< 1, got {config['r']}, {config['lora_alpha']}, "
                         f"{config['lora_dropout']}")
    if config["peft_type"] != "LORA" or config["bias"] != "none":
        raise ValueError(f"{path}: need peft_type 'LORA' and bias 'none', got "
                         f"{config['peft_type']!r} and {config['bias']!r}")
    targets = config["target_modules"]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a non-empty list of strings")
    return config


def check_tensors(found, expected, where):
    """found {name: Tensor} against expected {name: shape}; one ValueError listing every problem."""
    problems = []
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    problems += [f"{k} has shape {tuple(found[k].shape)}, the model needs {tuple(expected[k])}"
                 for k in sorted(set(found) & set(expected))
                 if tuple(found[k].shape) != tuple(expected[k])]
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def check_finite_tensors(tensors, where):
    """A nan or inf factor would turn every output of the model into nan: refuse it by name."""
    bad = [k for k, t in sorted(tensors.items())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{where}: tensors {bad} hold nan or inf values")


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
