"""The checks of an adapter folder, which is untrusted input: refused with a message that names
what is wrong, before the model is touched (lora/io.py calls them) or anything is written.
"""
import json
import math
from pathlib import Path

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REQUIRED = {"peft_type": str, "r": int, "lora_alpha": (int, float), "target_modules": list}
OPTIONAL = {"lora_dropout": ((int, float), 0.0), "use_rslora": (bool, False),
            "bias": (str, "none"), "base_model_fingerprint": (str, None),
            "use_dora": (bool, False)}


def check_adapter_directory(directory):
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
