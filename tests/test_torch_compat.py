"""tiny_gpt/util/torch_compat.py agrees with torch's own autocast state and papers over the
differences of torch 2.1."""
import pytest
import torch

from tiny_gpt.util.torch_compat import autocast_dtype, autocast_enabled


def test_autocast_state_is_read_inside_and_outside_a_cpu_autocast_region():
    assert not autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu")
        assert autocast_dtype("cpu") == torch.bfloat16
        assert not autocast_enabled("cuda")  # one device's region says nothing of another's
    assert not autocast_enabled("cpu")


def test_turning_off_autocast_where_torch_has_none_is_a_no_op(monkeypatch):
    """torch < 2.5 has no MPS autocast, and torch.autocast("mps", enabled=False) raised there:
    the training loop's fp32 context must not fail on such a device type."""
    import tiny_gpt.util.torch_compat as compat
    monkeypatch.setattr(compat, "autocast_available", lambda device_type: device_type == "cpu")
    with compat.autocast("mps", enabled=False):
        pass
    assert not compat.autocast_enabled("mps")
    with compat.autocast("cpu", dtype=torch.bfloat16):
        assert compat.autocast_enabled("cpu")  # torch's own spelling of this differs before 2.4


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps", "xpu", "hpu", "meta"])
def test_autocast_available_gives_torchs_own_answer(device_type):
    """Where torch can say (torch >= 2.4), our answer is torch's, for every device type -- a
    hard-coded True for "mps", which torch < 2.5 lacks, would fail here. Everywhere, a device
    type we call available takes a disabled torch.autocast without error (no GPU needed)."""
    from tiny_gpt.util.torch_compat import autocast_available
    ours = autocast_available(device_type)
    if hasattr(torch.amp, "is_autocast_available"):
        assert ours == torch.amp.is_autocast_available(device_type)
    if ours:
        with torch.autocast(device_type, enabled=False):
            pass
