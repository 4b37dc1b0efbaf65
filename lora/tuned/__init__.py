"""Tuned forms of LoRA's kernels, beside the reference they speed up, and the ONE place that
picks between the two: `lora_function`, which LoRALinear's forward calls.

    products.py  summed_weight (W0 + sBA), input_grad_and_v (g [W0 + sBA | sB]),
                 token_sum_product: the shared pieces (DoRA uses them too)
    function.py  TunedLoRAFunction and Tuning, the switch of each tuned form

The rule per call, from the flop counts in function.py (N tokens, in -> out features, rank r):
the summed forward when N > in, the one-pass backward when N (in + out) > in * out, the token
split always. Set the environment variable LORA_REFERENCE=1, or call use_reference(True), and
every LoRALinear runs the reference LoRAFunction instead (lora/function.py).
"""
import os

from ..function import LoRAFunction
from .function import Tuning, TunedLoRAFunction

CHOICE = {"reference": os.environ.get("LORA_REFERENCE", "") == "1"}  # the one switch


def use_reference(flag=True):
    """Run the reference LoRAFunction (True) or the tuned one (False) from now on; returns
    the previous setting."""
    previous, CHOICE["reference"] = CHOICE["reference"], bool(flag)
    return previous


def tuning_for(n_tokens, in_features, out_features):
    """The Tuning the rule above picks for one call."""
    return Tuning(summed_forward=n_tokens > in_features,
                  one_pass_backward=n_tokens * (in_features + out_features)
                  > in_features * out_features,
                  token_split=True)


def lora_function(x, weight, bias, lora_A, lora_B, scaling, mask=None):
    """y = x W0^T + b + s (x_d A^T) B^T for x (N, in), by the reference or the tuned Function."""
    if CHOICE["reference"]:
        return LoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, mask)
    tuning = tuning_for(x.shape[0], lora_A.shape[1], lora_B.shape[0])
    return TunedLoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, mask, tuning)
