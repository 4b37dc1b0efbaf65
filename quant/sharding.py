"""A 4-bit base that a sharding wrapper (FSDP) can split across ranks.

FSDP shards parameters, not buffers, and FSDP1 flattens them into one buffer of one float
dtype (it refuses integer tensors). So the packed codes of a Linear4bit are held as a frozen
nn.Parameter whose bytes are *viewed* as a float dtype -- the bytes are unchanged, 4 of them
per float32 entry. fsdp_qlora does the same with bitsandbytes' quant_storage.
"""
import torch
import torch.nn as nn

from .linear4bit import COMPUTE_DTYPES, Linear4bit


def store_codes_as(layer, dtype=torch.float32):
    """Hold `layer`'s packed codes as a frozen Parameter viewed as `dtype`; dtype=torch.uint8
    puts them back in a buffer. While stored so, the codes count among parameters() and the
    state_dict holds them in that float view (n / 4 entries for float32): save and load a layer
    whose codes are uint8. -> layer"""
    allowed = (torch.uint8,) + COMPUTE_DTYPES
    if dtype not in allowed:
        raise ValueError(f"store_codes_as: dtype must be one of {allowed}, got {dtype!r}")
    packed = layer.packed_codes().detach()
    width = torch.empty((), dtype=dtype).element_size()
    if packed.numel() % width:
        raise ValueError(f"store_codes_as: {packed.numel()} code bytes do not fill whole "
                         f"{dtype} entries of {width} bytes")
    delattr(layer, "codes")
    if dtype == torch.uint8:
        layer.register_buffer("codes", packed)
    else:
        layer.codes = nn.Parameter(packed.view(dtype), requires_grad=False)
    return layer


def fully_shard_4bit(model, fully_shard, dtype=torch.float32):
    """Shard a model with a 4-bit base the way fsdp_qlora does: every Linear4bit's codes
    stored as `dtype` parameters (store_codes_as), then `fully_shard` (FSDP2's, from
    tiny_gpt.util.torch_compat.fully_shard_function) applied to each block of model.blocks and
    to the model itself, so each block's parameters are gathered only while it runs. -> model"""
    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            store_codes_as(layer, dtype)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model
