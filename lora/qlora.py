"""QLoRA = a 4-bit base (quant) + LoRA adapters (lora): the one place where the two meet.

Dettmers et al. 2023 ("QLoRA", Sec. 3): every linear layer of the frozen base is stored in NF4
with double-quantized scales, and LoRA adapters in 16/32-bit are trained on top:

    y = dequant(W_nf4) x + (alpha / r) B A x        gradient flows to A, B (and x), never to W

``quant`` knows nothing of LoRA, and the LoRA layer nothing of 4-bit: a ``LoRALinear`` wraps
anything with ``in_features`` / ``out_features``, so the composition is two calls in a row.
This file uses only ``quant``'s public API (``from quant import ...``), as do the float
deployment copy (lora/export.py) and LoftQ (lora/variants/loftq.py).
"""
import copy

import torch

from quant import quantize_model

from .inject import apply_lora, match_targets


def prepare_qlora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0,
                  use_rslora=False, blocksize=64, double_quant=True,
                  compute_dtype=torch.float32, bits=4, init_lora_weights=True, loftq_iters=5):
    """Quantize every nn.Linear of ``model`` in place (NF4; bits=3 or 2: the NormalFloat code
    book of that many bits), then put LoRA on ``targets``. Returns the model; only the
    adapters' A and B require grad. Unknown targets are refused before anything is quantized,
    so a typo leaves the model as it was.

    init_lora_weights: True (B = 0, QLoRA's), or "loftq": the target layers quantized and their
    adapters initialized together from the float weights, loftq_iters alternations
    (lora/variants/loftq.py); the per-layer errors are then in ``model.loftq_errors``."""
    if init_lora_weights not in (True, "loftq"):
        raise ValueError(f"init_lora_weights must be True or 'loftq', got {init_lora_weights!r}")
    match_targets(model, targets)
    float_model = copy.deepcopy(model) if init_lora_weights == "loftq" else None
    quantize_model(model, blocksize=blocksize, double_quant=double_quant,
                   compute_dtype=compute_dtype, bits=bits)
    apply_lora(model, targets=targets, r=r, alpha=alpha, dropout=dropout,
               use_rslora=use_rslora)
    if float_model is not None:  # beyond the path: LoftQ (lora/variants/loftq.py)
        from .variants import apply_loftq
        model.loftq_errors = apply_loftq(model, float_model, bits=bits, iters=loftq_iters,
                                         blocksize=blocksize, double_quant=double_quant)
    return model
