"""Beyond the reading path: a trained adapter folded into a plain model, for deployment.

    save_merged_model        the model with its adapters merged, as the plain base
                             architecture's state dict (W0 + s B A in place of W0, no adapter
                             keys), in one safetensors file: it loads without this package
    load_model_weights       such a file into a plain model, keys and shapes checked
    dequantized_float_model  QLoRA's float copy: every 4-bit layer decoded, the adapters merged
"""
import copy

import torch
import torch.nn as nn

from quant import Linear4bit
from tiny_gpt.util.modules import replace_module
from tiny_gpt.util.safetensors import load_file, save_file

from .inject import lora_layers
from .io import check_finite_tensors, check_tensors


def save_merged_model(model, path):
    """Write the model with its active adapters merged, as the plain base architecture's state
    dict, to one safetensors file. `model` itself is left as it is."""
    merged = copy.deepcopy(model)
    for layer_path, layer in lora_layers(merged):
        if not layer.merged:
            layer.merge()
        replace_module(merged, layer_path, layer.base)
    save_file(merged.state_dict(), path, metadata={"format": "pt"})


def load_model_weights(model, path):
    """Load a file from save_merged_model into a plain model (keys and shapes checked)."""
    tensors, _ = load_file(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_tensors(tensors, expected, str(path))
    check_finite_tensors(tensors, str(path))
    model.load_state_dict(tensors)
    return model


def dequantized_float_model(qlora_model):
    """A plain float copy for deployment: every Linear4bit becomes an nn.Linear holding its
    dequantized weight, and each adapter's s*B@A is added into its layer's weight (a merge).

    The merged weight W_deq + sBA is exact in float; re-quantizing it to NF4 would not be
    (sBA is far below the NF4 step size), which is why a QLoRA adapter is merged into a float
    copy of the base rather than into the 4-bit one."""
    model = copy.deepcopy(qlora_model)
    for path, layer in lora_layers(model):
        merged = _float_linear(layer.base)
        with torch.no_grad():
            merged.weight += layer.delta_weight().to(merged.weight.dtype)
        replace_module(model, path, merged)
    for path, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            replace_module(model, path, _float_linear(module))
    return model


def _float_linear(module):
    if isinstance(module, nn.Linear):
        return copy.deepcopy(module)
    weight = module.dequantized_weight(torch.float32)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    return linear.to(weight.device)

