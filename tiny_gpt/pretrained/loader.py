"""Loading a Hugging Face folder (config.json + safetensors) into this package's models.

    model = load_pretrained("DIR")              # float32; dtype=torch.bfloat16 to halve it

The order is what keeps a big checkpoint's memory down and a bad one from doing harm:
  1. config.json is read and checked (config.py): a bad field is refused before anything else.
  2. Every weight file's header is read and checked (tiny_gpt/util/safetensors_mapped.py), and
     the names and shapes it lists are compared with the model's (loader_maps.py): a missing,
     unexpected or misshapen tensor, or one not stored as F32, F16 or BF16, is refused by name
     before a single weight is read.
  3. The model is built on the meta device -- shapes, no memory -- and each of its modules is
     then given its tensors as they are read, one at a time, from the memory-mapped files. At
     no point are the file and the model both in memory: only the model and one tensor.
  4. A hook may build a module from its weights instead (linear_hook): quant/load_4bit.py uses
     it to quantize each linear weight as it arrives, so a 4-bit model never exists in float.

save_pretrained writes a model back as such a folder (the family's own names and layout, one
file or shards), so the loader is tested without transformers too.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..util.modules import replace_module
from ..util.safetensors_mapped import Checkpoint, save_checkpoint_files
from .build import check_dtype, empty_model
from .config import config_to_dict, read_config
from .loader_maps import canonical_name, check_against, file_layout, ours_to_file

WEIGHT_DTYPES = ("F32", "F16", "BF16")


def load_pretrained(folder, dtype=None, linear_hook=None, embedding_dtype=None):
    """A Hugging Face folder (Llama family or GPT-2) -> a model of this package, weights in
    `dtype` (default float32, whatever the file stores).

    linear_hook(path, weight, bias) -> nn.Module or None: called for every nn.Linear with its
    weight (out, in) and bias (or None) as read; a module returned takes the layer's place.
    embedding_dtype: the token embedding's own dtype, when it should be stored in fewer bits
    than the rest (a frozen QLoRA base; the hidden states keep `dtype`, upcast_head.py)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    cfg = read_config(folder)
    dtype = check_dtype(torch.float32 if dtype is None else dtype)
    model = empty_model(cfg, dtype, embedding_dtype)
    layout = file_layout(model)
    with Checkpoint(folder) as checkpoint:
        names = {canonical_name(k, cfg): k for k in checkpoint.where}
        shapes = checkpoint.shapes()
        check_against({k: shapes[v] for k, v in names.items()}, layout, cfg, str(folder))
        check_float(checkpoint, [names[k] for k in layout], str(folder))
        reader = PartReader(checkpoint, layout, names)
        fill(model, reader, linear_hook)
    return model


def check_float(checkpoint, names, where):
    """Weights are stored as F32, F16 or BF16; an integer or boolean tensor in a weight's
    place is refused by name rather than converted."""
    dtypes = {n: checkpoint.where[n].entries[n]["dtype"] for n in names}
    bad = sorted(n for n, d in dtypes.items() if d not in WEIGHT_DTYPES)
    if bad:
        raise ValueError(f"{where}: weights must be stored as {WEIGHT_DTYPES}; "
                         f"{bad[:5]} are {sorted({dtypes[n] for n in bad})}")


class PartReader:
    """Reads our parameter `name` from the file tensor that holds it. A fused file tensor
    (GPT-2's c_attn) serves three parameters in a row: the last one read is kept for them."""

    def __init__(self, checkpoint, layout, names):
        self.checkpoint, self.names = checkpoint, names
        self.source = {part.ours: (file, part) for file, (_, parts) in layout.items()
                       for part in parts}
        self.last = (None, None)

    def __call__(self, name, dtype):
        file, part = self.source[name]
        if self.last[0] != (file, dtype):
            self.last = (None, None)  # drop the previous tensor before reading the next
            self.last = ((file, dtype), self.checkpoint.tensor(self.names[file], dtype))
        return part.take(self.last[1]).contiguous()


def fill(model, read, linear_hook=None):
    """Give every parameter of the meta-built `model` its values, module by module:
    read(name, dtype) gives parameter `name`'s values in the dtype it was built with (and it
    keeps the requires_grad it was built with)."""
    for path, module in list(model.named_modules()):
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        values = {name: read(f"{path}.{name}" if path else name, p.dtype)
                  for name, p in own.items()}
        if linear_hook is not None and isinstance(module, nn.Linear):
            new = linear_hook(path, values["weight"], values.get("bias"))
            if new is not None:
                replace_module(model, path, new)
                continue
        for name, value in values.items():
            setattr(module, name, nn.Parameter(value, own[name].requires_grad))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # every parameter has a Part (a test holds this); this says so if one did not
        raise RuntimeError(f"the loader left parameters without values: {left[:5]}")


def save_pretrained(model, folder, dtype=None, max_shard_bytes=None):
    """Write `model` (plain: no adapters, no 4-bit layers) as a Hugging Face folder:
    config.json and model.safetensors, or shards with their index past max_shard_bytes.
    dtype: the stored dtype (default: the model's)."""
    cfg = model.config
    state = {k: v.detach() if dtype is None else v.detach().to(check_dtype(dtype))
             for k, v in model.state_dict().items()}
    layout = file_layout(model)
    expected = {p.ours for _, parts in layout.values() for p in parts}
    if set(state) != expected:
        raise ValueError("save_pretrained writes a plain model (no LoRA, no 4-bit layers): "
                         f"found {sorted(set(state) - expected)[:5]} beyond the base weights")
    folder = Path(folder)
    config = json.dumps(config_to_dict(cfg), indent=2).encode("utf-8")
    save_checkpoint_files(ours_to_file(state, layout), folder, max_shard_bytes,
                          extra_files={"config.json": config})
    return folder
