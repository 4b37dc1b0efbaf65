"""LoftQ (Li et al. 2023): quantize the base and initialize the adapter together, so that the
4-bit model at step 0 is closer to the float one than plain QLoRA's.

QLoRA quantizes W and starts from B = 0: at step 0 its layer computes dequant(Q) x, and the
whole quantization error W - dequant(Q) is left for the adapter to learn away. At 4 bits that
error is small; at 2 bits it is not, and QLoRA's start is poor. LoftQ alternates, T times:

    Q_t       = quantize(W - s B_{t-1} A_{t-1})            (B_0 A_0 = 0: t = 1 is plain QLoRA)
    s B_t A_t = the best rank-r fit of W - dequant(Q_t)    (truncated SVD, Eckart-Young)
                B_t = U_r S_r^(1/2) / sqrt(s),  A_t = S_r^(1/2) V_r^T / sqrt(s)

and reports the relative error ||W - dequant(Q_t) - s B_t A_t||_F / ||W||_F after each t. The
quantizer is the NormalFloat one of QLoRA with 2^bits levels (quant.normal_float_levels: the
same normal-quantile construction as NF4, which it is at bits = 4), block-wise absmax. Codes of
2 or 3 bits are stored in 4-bit nibbles here: the error is that of k bits, the storage that of 4.
"""
import math

import torch

from quant import Linear4bit, normal_float_levels, quantize_4bit

from ..inject import lora_layers, named_adapters


@torch.no_grad()
def loftq_init(weight, r, scaling, bits=4, iters=5, blocksize=64, double_quant=True):
    """-> (Quantized4bit Q, A (r, in), B (out, r), errors): LoftQ for one (out, in) weight.
    errors[0] is plain quantization's ||W - dequant(quantize(W))|| / ||W||, errors[t] the
    error of dequant(Q_t) + s B_t A_t; the returned Q, A, B are those of the last iteration."""
    if not (isinstance(bits, int) and 2 <= bits <= 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be a whole number >= 1, got {iters!r}")
    W = weight.detach().double()
    code = normal_float_levels(bits)
    norm = W.norm().item()
    low_rank = torch.zeros_like(W)                                        # s B A
    errors = []
    for _ in range(iters):
        q = quantize_4bit((W - low_rank).to(weight.dtype), code, blocksize, double_quant,
                          who="loftq_init")
        residual = W - q.dequantize(torch.float64)
        if not errors:
            errors.append(residual.norm().item() / norm)                  # plain quantization
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = S[:r].sqrt() / math.sqrt(scaling)
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        low_rank = scaling * B @ A
        errors.append((residual - low_rank).norm().item() / norm)
    return q, A.to(weight.dtype), B.to(weight.dtype), errors


@torch.no_grad()
def apply_loftq(model, float_model, adapter_name="default", bits=4, iters=5, blocksize=64,
                double_quant=True):
    """For every LoRALinear of a QLoRA `model` whose adapter `adapter_name` sits on a 4-bit
    base: re-quantize that base from the float weight of the same layer in `float_model` (the
    weights before quantization) with LoftQ, and set the adapter's A, B. Other 4-bit layers
    keep plain quantization. Checks every layer before changing any. Returns
    {layer path: errors} (see loftq_init)."""
    layers = [(p, layer) for p, layer in lora_layers(model)
              if adapter_name in named_adapters(layer) and isinstance(layer.base, Linear4bit)]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r} on a 4-bit layer in the model")
    floats = {}
    for path, layer in layers:
        source = float_model.get_submodule(path)
        weight = getattr(source, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()
                and tuple(weight.shape) == (layer.out_features, layer.in_features)):
            raise ValueError(f"float_model has no float ({layer.out_features}, "
                             f"{layer.in_features}) weight at {path}")
        floats[path] = (weight, getattr(source, "bias", None))
    found = {}
    for path, layer in layers:
        adapter = named_adapters(layer)[adapter_name]
        q, A, B, errors = loftq_init(floats[path][0], adapter.r, adapter.scaling, bits, iters,
                                     blocksize, double_quant)
        device = layer.base.codes.device
        layer.base = Linear4bit(q, layer.base.bias, layer.base.compute_dtype).to(device)
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        found[path] = errors
    return found
