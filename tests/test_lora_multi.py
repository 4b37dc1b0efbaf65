"""Several named adapters: adding, switching, stacking, deleting, combining, merging."""
import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, MultiLoRALinear, add_adapter, apply_lora, combine_adapters,
                  delete_adapter, merge_lora, set_active_adapters, unmerge_lora)

F32_TOL = 1e-5  # float32 products of 32-wide vectors: rounding of order 1e-6


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


def model_with(adapters, seed=0):
    """TwoLayers with adapters {name: r}, every B random so each update is non-zero."""
    torch.manual_seed(seed)
    model = TwoLayers()
    for name, r in adapters.items():
        add_adapter(model, name, r=r, alpha=2 * r)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    return model


def delta(model, path, name):
    return model.get_submodule(path).adapters[name].delta_weight()


def test_new_adapter_is_inactive_until_set_active():
    model = model_with({"a": 2})
    x = torch.randn(4, 32)
    base_out = model.v_proj.base(torch.tanh(model.q_proj.base(x)))
    assert torch.equal(model(x), base_out)
    set_active_adapters(model, "a")
    assert model.q_proj.active == ["a"] and not torch.allclose(model(x), base_out)


def test_stacked_output_is_sum_of_deltas():
    model = model_with({"a": 2, "b": 3})
    set_active_adapters(model, ["a", "b"])
    layer, x = model.q_proj, torch.randn(5, 32)
    want = layer.base(x) + x @ (delta(model, "q_proj", "a") + delta(model, "q_proj", "b")).t()
    assert torch.allclose(layer(x), want, atol=F32_TOL)


def test_switching_and_unknown_names():
    model = model_with({"a": 2, "b": 2})
    x = torch.randn(3, 32)
    set_active_adapters(model, "a")
    ya = model(x)
    set_active_adapters(model, "b")
    assert not torch.allclose(model(x), ya)
    set_active_adapters(model, "a")
    assert torch.equal(model(x), ya)
    with pytest.raises(ValueError, match="unknown adapters \\['c'\\]"):
        set_active_adapters(model, ["a", "c"])
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "a")


def test_delete_adapter_and_last_one_unwraps():
    model = model_with({"a": 2, "b": 2})
    set_active_adapters(model, ["a", "b"])
    delete_adapter(model, "a")
    assert model.q_proj.active == ["b"] and list(model.q_proj.adapters) == ["b"]
    delete_adapter(model, "b")
    assert isinstance(model.q_proj, nn.Linear) and not isinstance(model.q_proj, LoRALinear)


def test_merge_with_several_active_merges_all():
    model = model_with({"a": 2, "b": 3})
    set_active_adapters(model, ["a", "b"])
    x = torch.randn(6, 32)
    before = model(x)
    merge_lora(model)
    assert torch.allclose(model(x), before, atol=F32_TOL)
    with pytest.raises(RuntimeError, match="merged"):
        set_active_adapters(model, "a")
    unmerge_lora(model)
    assert torch.allclose(model(x), before, atol=F32_TOL)


@pytest.mark.parametrize("path", ["q_proj", "v_proj"])
def test_cat_combination_is_exact(path):
    model = model_with({"a": 2, "b": 3})
    errors = combine_adapters(model, {"a": 0.7, "b": -1.5}, "ab", method="cat")
    new = model.get_submodule(path).adapters["ab"]
    assert new.r == 5 and new.scaling == 1.0
    want = 0.7 * delta(model, path, "a") - 1.5 * delta(model, path, "b")
    assert torch.allclose(new.delta_weight(), want, atol=F32_TOL)
    assert errors[path] < F32_TOL
    assert model.get_submodule(path).active == []  # combined adapters start inactive


def test_linear_combination_svd():
    model = model_with({"a": 2, "b": 3})
    exact = combine_adapters(model, {"a": 1.0, "b": 0.5}, "full", method="linear", r=5)
    assert max(exact.values()) < F32_TOL  # rank(dW) <= 2 + 3 = 5: nothing is cut
    cut = combine_adapters(model, {"a": 1.0, "b": 0.5}, "cut", method="linear", r=2)
    dW = delta(model, "q_proj", "a") + 0.5 * delta(model, "q_proj", "b")
    S = torch.linalg.svdvals(dW.double())
    tail = (S[2:].square().sum().sqrt() / S.square().sum().sqrt()).item()  # Eckart-Young
    assert cut["q_proj"] == pytest.approx(tail, rel=1e-4)
    got = delta(model, "q_proj", "cut")
    assert ((got - dW).norm() / dW.norm()).item() == pytest.approx(tail, rel=1e-4)


def test_combine_errors():
    model = model_with({"a": 2})
    with pytest.raises(ValueError, match="method must be"):
        combine_adapters(model, {"a": 1.0}, "x", method="ties")
    with pytest.raises(ValueError, match="unknown adapters"):
        combine_adapters(model, {"a": 1.0, "zz": 1.0}, "x")
    add_adapter(model, "q_only", targets=("q_proj",), r=2, alpha=2)
    with pytest.raises(ValueError, match="same layers"):
        combine_adapters(model, {"a": 1.0, "q_only": 1.0}, "x")


def test_apply_lora_then_add_adapter_keeps_default_active():
    model = apply_lora(TwoLayers(), targets=("q_proj",))
    add_adapter(model, "second", targets=("q_proj", "v_proj"))
    assert model.q_proj.active == ["default"] and model.v_proj.active == []
    assert all(p.requires_grad == ("adapters" in n) for n, p in model.named_parameters())


def test_add_adapter_turns_a_one_adapter_layer_into_a_named_one_with_the_same_tensors():
    """The reading path's LoRALinear has no names; a second adapter makes it a MultiLoRALinear
    in place whose "default" adapter IS the old one (an optimizer holding A and B keeps them)."""
    model = apply_lora(TwoLayers(), targets=("q_proj",), r=2, alpha=4)
    layer = model.q_proj
    assert type(layer) is LoRALinear and not hasattr(layer, "adapters")
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B, x = layer.lora_A, layer.lora_B, torch.randn(3, 32)
    before = model(x)
    add_adapter(model, "second", targets=("q_proj",), r=2, alpha=4)
    many = model.q_proj
    assert isinstance(many, MultiLoRALinear) and isinstance(many, LoRALinear)
    assert many.adapters["default"].lora_A is A and many.adapters["default"].lora_B is B
    assert many.base is layer.base and many.active == ["default"]
    assert torch.equal(model(x), before)


def test_a_dora_layer_keeps_its_magnitudes_when_it_gets_a_second_adapter():
    model = apply_lora(TwoLayers(), targets=("q_proj",), r=2, alpha=4, use_dora=True)
    m = model.q_proj.lora_magnitude_vector
    add_adapter(model, "second", targets=("q_proj",), r=2, alpha=4)
    assert model.q_proj.adapters["default"].lora_magnitude_vector is m
    assert model.q_proj.adapters["default"].use_dora
