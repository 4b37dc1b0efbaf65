"""A tuned form of LoRA's Function, beside the reference it speeds up, and the ONE place that
picks between the two: `lora_function`, which every LoRALinear's forward calls.

    function.py  TunedLoRAFunction (in-place sums, the token split) and token_sum_product

The tuned one runs unless the environment variable LORA_REFERENCE=1 is set or use_reference(True)
is called: then every LoRALinear runs the reference LoRAFunction (lora/function.py).
"""
import os

from ..function import LoRAFunction
from .function import TunedLoRAFunction, split_tokens, token_sum_product

CHOICE = {"reference": os.environ.get("LORA_REFERENCE", "") == "1"}  # the one switch


def use_reference(flag=True):
    """Run the reference LoRAFunction (True) or the tuned one (False) from now on; returns
    the previous setting."""
    previous, CHOICE["reference"] = CHOICE["reference"], bool(flag)
    return previous


def lora_function(x, weight, bias, lora_A, lora_B, scaling, mask=None):
    """y = x W0^T + b + s (x_d A^T) B^T for x (N, in), by the reference or the tuned Function."""
    if CHOICE["reference"]:
        return LoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, mask)
    return TunedLoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, mask,
                                   split_tokens(x.shape[0]))


__all__ = ["LoRAFunction", "TunedLoRAFunction", "lora_function", "split_tokens",
           "token_sum_product", "use_reference"]
