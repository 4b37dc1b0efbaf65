"""Adapters across a fused projection: ours on GPT-2's separate q, k, v against PEFT's on the one
`c_attn` of transformers' GPT2LMHeadModel -- both ways, exactly.

Our GPT-2 (tiny_gpt/pretrained/gpt2.py) splits the file's c_attn, (C, 3C), into q_proj, k_proj
and v_proj, so that LoRA can adapt Q and V apart. PEFT sees one module, whose output rows are
[q; k; v], and gives it one adapter: one A shared by all three. The two map onto each other:

Ours -> PEFT. Adapters on a set S of the three (say q and v), each of rank r with A_p (r, C),
B_p (C, r) and scaling s, are one adapter of rank |S| r on c_attn:

    A = [A_q; A_v]                     (|S| r, C)   the A's stacked
    B = [[B_q, 0], [0, 0], [0, B_v]]   (3C, |S| r)  each B in its projection's rows and its
                                                    own A's columns (k's rows zero)
    B A x = [B_q A_q x; 0; B_v A_v x]               each projection's own update, nothing mixed

with the same scaling s: s = alpha / r needs alpha' = |S| alpha at rank |S| r (rank-stabilized,
alpha / sqrt(r): alpha' = sqrt(|S|) alpha). PEFT gets them as rank_pattern / alpha_pattern for
c_attn, so the other adapted layers keep r and alpha.

PEFT -> ours. A c_attn adapter (A (r, C), B (3C, r)) is, row block by row block, three adapters
of rank r sharing A:  q_proj: (A, B[0:C]),  k_proj: (A, B[C:2C]),  v_proj: (A, B[2C:3C]).

Every other adapted layer only changes its name (our attn.o_proj is GPT-2's attn.c_proj; the
MLP's names are GPT-2's). The names come from the loader's map (loader_maps.py), the one place
that knows GPT-2's layout. DoRA is refused: its magnitude vector belongs to the fused rows.
"""
import json
import math
from pathlib import Path

import torch

from tiny_gpt.pretrained.loader_maps import file_layout
from tiny_gpt.util.safetensors import atomic_write_files, load_file, serialize

from .inject import adapter_names, lora_layers
from .io import (CONFIG_NAME, WEIGHTS_NAME, check_finite_tensors, check_tensors, peft_key,
                 read_adapter_config)
from .multi import add_adapter, set_active_adapters


def module_map(model):
    """{file module path: [our module paths]}: one path, or [q, k, v] for a fused c_attn."""
    if getattr(getattr(model, "config", None), "model_type", None) != "gpt2":
        raise ValueError("fused adapters are for the pretrained GPT-2 model (its c_attn); "
                         "other models use save_adapter / load_adapter as they are")
    return {file[:-len(".weight")]: [p.ours[:-len(".weight")] for p in parts]
            for file, (_, parts) in file_layout(model).items()
            if file.endswith(".weight") and parts[0].kind in ("T", "cols")}


def save_adapter_fused(model, directory, adapter_name="default"):
    """Write our GPT-2's adapter in PEFT's layout for transformers' GPT2LMHeadModel (c_attn,
    c_proj, c_fc with fan_in_fan_out). Returns the directory's Path."""
    found = {p: layer.adapters[adapter_name] for p, layer in lora_layers(model)
             if adapter_name in layer.adapters}
    if not found:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {adapter_names(model)}")
    first = next(iter(found.values()))
    if any(a.use_dora for a in found.values()):
        raise ValueError("DoRA adapters cannot be fused onto c_attn (the magnitude vector "
                         "belongs to the fused rows); save them with save_adapter")
    modules = module_map(model)
    left = sorted(set(found) - {p for ours in modules.values() for p in ours})
    if left:
        raise ValueError(f"no GPT-2 module in PEFT's layout matches the adapted {left}")
    tensors, fused_counts = {}, set()
    for file_module, ours in modules.items():
        adapters = [(i, found[p]) for i, p in enumerate(ours) if p in found]
        if not adapters:
            continue
        if len(ours) == 1:
            tensors[peft_key(file_module, "A")] = adapters[0][1].lora_A.detach()
            tensors[peft_key(file_module, "B")] = adapters[0][1].lora_B.detach()
            continue
        fused_counts.add(tuple(i for i, _ in adapters))
        tensors.update(fuse(file_module, adapters, len(ours)))
    if len(fused_counts) > 1:
        raise ValueError("every layer must adapt the same projections among q, k, v to fuse "
                         f"them under one rank; found {sorted(fused_counts)}")
    # two-part names ("attn.c_proj"): a bare "c_proj" would pick the MLP's c_proj too
    names = {".".join(k.rsplit(".lora_", 1)[0].split(".")[-2:]) for k in tensors}
    config = peft_config(first, names, len(next(iter(fused_counts))) if fused_counts else 0)
    directory = Path(directory)
    atomic_write_files({directory / WEIGHTS_NAME: serialize(tensors, {"format": "pt"}),
                        directory / CONFIG_NAME: json.dumps(config, indent=2).encode("utf-8")})
    return directory


def fuse(file_module, adapters, n_parts):
    """[(row block i, adapter)] -> c_attn's A (k r, C) and B (n_parts C, k r)."""
    r = adapters[0][1].r
    A = torch.cat([a.lora_A.detach() for _, a in adapters], dim=0)  # (k r, C)
    rows = adapters[0][1].lora_B.shape[0]
    B = A.new_zeros(n_parts * rows, len(adapters) * r)  # (3C, k r)
    for col, (i, a) in enumerate(adapters):
        B[i * rows:(i + 1) * rows, col * r:(col + 1) * r] = a.lora_B.detach()
    return {peft_key(file_module, "A"): A, peft_key(file_module, "B"): B}


def peft_config(adapter, short_names, k):
    """PEFT's adapter_config.json; c_attn at rank k r with the alpha that keeps s (above)."""
    grow = math.sqrt(k) if adapter.use_rslora else k
    config = {"peft_type": "LORA", "task_type": None, "r": adapter.r,
              "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
              "use_rslora": adapter.use_rslora, "use_dora": False, "bias": "none",
              "fan_in_fan_out": True, "target_modules": sorted(short_names),
              "rank_pattern": {}, "alpha_pattern": {}}
    if k:
        config["rank_pattern"] = {"c_attn": k * adapter.r}
        config["alpha_pattern"] = {"c_attn": grow * adapter.alpha}
    return config


def load_adapter_fused(model, directory, adapter_name="default", activate=True):
    """Read PEFT's adapter for transformers' GPT2LMHeadModel into our GPT-2: a c_attn adapter
    becomes q_proj, k_proj and v_proj adapters sharing its A. Everything is checked before
    the model is touched. Returns `model`."""
    directory = Path(directory)
    config = read_adapter_config(directory / CONFIG_NAME)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{directory / CONFIG_NAME}: {key} {config[key]} is not read "
                             "here: one rank and one alpha for every layer")
    if config["use_dora"]:
        raise ValueError(f"{directory / CONFIG_NAME}: DoRA adapters cannot be split from c_attn")
    r, targets = config["r"], config["target_modules"]
    chosen = {f: ours for f, ours in module_map(model).items()
              if any(f == t or f.endswith("." + t) for t in targets)}
    if not chosen:
        raise ValueError(f"{directory / CONFIG_NAME}: target_modules {targets} name no GPT-2 "
                         f"module; known: {sorted({f.rsplit('.', 1)[-1] for f in module_map(model)})}")
    tensors, _ = load_file(directory / WEIGHTS_NAME)
    expected = {}
    for file_module, ours in chosen.items():
        m = model.get_submodule(ours[0])
        expected[peft_key(file_module, "A")] = (r, m.in_features)
        expected[peft_key(file_module, "B")] = (len(ours) * m.out_features, r)
    check_tensors(tensors, expected, str(directory / WEIGHTS_NAME))
    check_finite_tensors(tensors, str(directory / WEIGHTS_NAME))
    paths = [p for ours in chosen.values() for p in ours]
    add_adapter(model, adapter_name, paths, r, config["lora_alpha"], config["lora_dropout"],
                config["use_rslora"])
    if activate:
        set_active_adapters(model, [adapter_name])
    with torch.no_grad():
        for file_module, ours in chosen.items():
            A, B = tensors[peft_key(file_module, "A")], tensors[peft_key(file_module, "B")]
            for i, path in enumerate(ours):  # B's row block i belongs to projection i
                adapter = model.get_submodule(path).adapters[adapter_name]
                rows = adapter.lora_B.shape[0]
                adapter.lora_A.copy_(A)
                adapter.lora_B.copy_(B[i * rows:(i + 1) * rows])
    return model
