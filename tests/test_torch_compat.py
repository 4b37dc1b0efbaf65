"""tiny_gpt/torch_compat.py agrees with torch's own autocast state."""
import torch

from tiny_gpt.util.torch_compat import autocast_dtype, autocast_enabled


def test_autocast_state_is_read_inside_and_outside_a_cpu_autocast_region():
    assert not autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu")
        assert autocast_dtype("cpu") == torch.bfloat16
        assert not autocast_enabled("cuda")  # one device's region says nothing of another's
    assert not autocast_enabled("cpu")
