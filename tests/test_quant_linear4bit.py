"""DequantMatmul's backward, Linear4bit against the dense path, and quantize_model."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import DequantMatmul, Linear4bit, Quantized4bit, quantize_model, quantize_nf4
from tiny_gpt.util.finite_differences import central_differences

# float64: gradcheck's own default tolerances; finite differences of a function that is linear
# in x are exact up to rounding, ~1e-16 * |L| / eps, so 1e-7 is generous.
FD_TOL = 1e-7
FP32_TOL = 1e-5  # same float32 matmul on the same numbers: differences only from op order
BF16_TOL = 1e-2  # bf16 keeps 8 mantissa bits: ~4e-3 relative per rounding


def seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_linear(in_features=96, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def test_gradcheck_float64_on_input_and_bias():
    q = quantize_nf4(seeded(5, 6), blocksize=8)  # a partial block too: 30 = 3 * 8 + 6
    x = seeded(2, 3, 6, seed=1, dtype=torch.float64).requires_grad_()  # (batch, tokens, in)
    bias = seeded(5, seed=2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: DequantMatmul.apply(x, q, b), (x, bias))


def test_backward_matches_central_finite_differences():
    q = quantize_nf4(seeded(4, 6), blocksize=8)
    x = seeded(3, 6, seed=1, dtype=torch.float64).requires_grad_()
    probe = seeded(3, 4, seed=2, dtype=torch.float64)  # L = sum(y * probe): a generic dL/dy

    def loss(inp):
        return (DequantMatmul.apply(inp, q, None) * probe).sum()

    loss(x).backward()
    numeric = central_differences(lambda: loss(x), x, eps=1e-6)
    assert (numeric - x.grad).abs().max() < FD_TOL


def test_backward_saves_no_float_weight():
    q = quantize_nf4(seeded(32, 64))
    saved = []
    x = seeded(5, 64, seed=1).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        DequantMatmul.apply(x, q, None).sum().backward()
    assert all(t.numel() < 32 * 64 for t in saved)


def test_parity_with_dense_path_float32():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear)
    x = seeded(2, 5, 96, seed=1)
    dense = F.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(layer(x), dense, atol=FP32_TOL, rtol=FP32_TOL)
    # the quantization error itself, separately: ~9% relative for this uniform-init layer
    error = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.15


def test_parity_with_dense_path_bfloat16():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = seeded(8, 96, seed=1)
    w = layer.dequantized_weight()
    assert w.dtype == torch.bfloat16
    dense = F.linear(x.bfloat16(), w, linear.bias.bfloat16()).float()
    out = layer(x)
    assert out.dtype == torch.float32  # cast back to the input's dtype
    torch.testing.assert_close(out, dense, atol=BF16_TOL, rtol=BF16_TOL)


def test_module_holds_no_float_weight():
    layer = Linear4bit.from_linear(make_linear(96, 40), blocksize=64)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert isinstance(layer.weight, Quantized4bit) and not isinstance(layer.weight, torch.Tensor)
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == 96 * 40 // 2
    n_blocks = 96 * 40 // 64
    for name, buffer in layer.state_dict().items():
        if buffer.is_floating_point():  # code book (16) and scales: at most one per block
            assert buffer.numel() <= max(16, n_blocks), name
    # the cached look-up tables have a fixed size, whatever the weight, and are never saved
    assert layer.pair_levels.shape == (256, 2) and layer.scale_levels.shape == (256,)
    assert {"pair_levels", "scale_levels"}.isdisjoint(layer.state_dict())
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert "in_features=96" in repr(layer) and "blocksize=64" in repr(layer)


def test_dtype_casts_leave_the_4bit_weight_alone():
    layer = Linear4bit.from_linear(make_linear())
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)  # casts the bias, not the codes, scales or code book
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(torch.float32), before)


def test_gradient_flows_to_input_not_to_weight():
    layer = Linear4bit.from_linear(make_linear())
    x = seeded(4, 96, seed=1).requires_grad_()
    layer(x).pow(2).sum().backward()
    expected = 2 * layer(x).detach() @ layer.dequantized_weight()  # dL/dx = dL/dy @ W
    torch.testing.assert_close(x.grad, expected, atol=FP32_TOL, rtol=FP32_TOL)
    assert layer.bias.grad is not None
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())


def test_compute_dtype_checks():
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit.from_linear(make_linear(), compute_dtype=torch.int8)
    if not torch.cuda.is_available():
        layer = Linear4bit.from_linear(make_linear(), compute_dtype=torch.float16)
        with pytest.raises(RuntimeError, match="CUDA"):
            layer(seeded(2, 96))


class TinyBlock(nn.Module):
    """Module names as in tiny_gpt: attn.{q,k,v,o}_proj and mlp.{up,down}_proj."""

    def __init__(self, d=64):
        super().__init__()
        self.attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj",
                                                                "o_proj")})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(d, 2 * d), "down_proj": nn.Linear(2 * d, d)})


def tiny_model():
    torch.manual_seed(0)
    return nn.ModuleDict({"wte": nn.Embedding(10, 64),
                          "blocks": nn.ModuleList([TinyBlock(), TinyBlock()])})


def kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Linear4bit))}


def test_quantize_model_swaps_exactly_the_targets():
    model = quantize_model(tiny_model(), targets=("q_proj", "v_proj"))
    swapped = {n for n, kind in kinds(model).items() if kind == "Linear4bit"}
    assert swapped == {f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert isinstance(model["wte"], nn.Embedding)


def test_quantize_model_full_paths_exclude_and_defaults():
    model = quantize_model(tiny_model(), targets=["blocks.1.attn.q_proj"])
    assert [n for n, k in kinds(model).items() if k == "Linear4bit"] == ["blocks.1.attn.q_proj"]
    model = quantize_model(tiny_model(), exclude=("down_proj",))
    assert {n for n, k in kinds(model).items() if k == "Linear"} == {
        "blocks.0.mlp.down_proj", "blocks.1.mlp.down_proj"}


def test_quantize_model_unknown_target_lists_available():
    with pytest.raises(ValueError, match=r"'qproj'.*blocks\.0\.attn\.q_proj"):
        quantize_model(tiny_model(), targets=("qproj",))
    with pytest.raises(ValueError, match="exclude"):
        quantize_model(tiny_model(), exclude=("nope",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 compute needs CUDA")
def test_parity_with_dense_path_float16_on_cuda():
    linear = make_linear().cuda()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float16)
    x = seeded(8, 96, seed=1).cuda()
    dense = F.linear(x.half(), layer.dequantized_weight(), linear.bias.half()).float()
    torch.testing.assert_close(layer(x), dense, atol=BF16_TOL, rtol=BF16_TOL)  # fp16 is finer


def test_loading_one_layer_leaves_every_other_code_book_and_nf4_code_alone():
    """On CPU, code.to(device) returns the same tensor: without a copy every Linear4bit's code
    buffer would be NF4_CODE itself, and load_state_dict into one would rewrite all of them."""
    from quant import NF4_CODE
    before = NF4_CODE.clone()
    a, b = Linear4bit.from_linear(make_linear(seed=0)), Linear4bit.from_linear(make_linear(seed=1))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    state["code"] = torch.linspace(-1, 1, 16)
    a.load_state_dict(state)
    assert torch.equal(NF4_CODE, before)
    assert torch.equal(b.code, before)
    assert torch.equal(quantize_nf4(torch.randn(64)).code, before)


def test_forward_and_backward_build_no_table(monkeypatch):
    # the pair table and the scales' 8-bit map are built once, at construction, and moved
    # with the module: a forward that rebuilt them (or copied the map to the device) would
    # hit these
    import quant.double_quant as double_quant
    import quant.tuned as tuned
    layer = Linear4bit.from_linear(make_linear(), double_quant=True)
    x = torch.randn(3, layer.in_features, requires_grad=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a look-up table was built during forward or backward")
    monkeypatch.setattr(tuned, "pair_table", refuse)
    monkeypatch.setattr(double_quant, "DYNAMIC_MAP", None)  # .to() on it would fail
    layer(x).sum().backward()
    assert x.grad is not None


def test_loading_another_code_book_rebuilds_the_cached_table():
    # the pair table is derived from the code book; loading a state dict with other levels
    # must dequantize with those levels, not with the table built at construction
    from quant.tuned import pair_table
    layer = Linear4bit.from_linear(make_linear(), double_quant=False)
    state = layer.state_dict()
    state["code"] = state["code"] * 0.5
    layer.load_state_dict(state)
    assert torch.equal(layer.pair_levels, pair_table(layer.code))
    plain = Quantized4bit(layer.codes, layer.code, layer.weight.shape, layer.weight.dtype,
                          layer.weight.blocksize, layer.absmax)  # no cached table
    assert torch.equal(layer.dequantized_weight(torch.float32), plain.dequantize(torch.float32))


def test_codes_stored_as_float_bytes_are_the_same_weight_and_stay_uncast():
    """quant.sharding.store_codes_as: the packed bytes become a frozen float parameter (for
    FSDP to shard),
    the layer computes exactly as before, a dtype cast leaves those bytes alone, and going
    back to uint8 restores the buffer."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(5, 64)
    before, packed = layer(x), layer.codes.clone()
    from quant.sharding import store_codes_as
    store_codes_as(layer, torch.float32)
    assert isinstance(layer.codes, nn.Parameter) and not layer.codes.requires_grad
    assert layer.codes.dtype == torch.float32 and layer.codes.numel() == packed.numel() // 4
    assert "codes" in dict(layer.named_parameters()) and torch.equal(layer(x), before)
    layer.to(torch.float64)
    assert layer.codes.dtype == torch.float32 and torch.equal(layer.packed_codes(), packed)
    store_codes_as(layer, torch.uint8)
    assert "codes" in dict(layer.named_buffers()) and torch.equal(layer.codes, packed)
    with pytest.raises(ValueError, match="dtype must be one of"):
        store_codes_as(layer, torch.int32)


def test_a_layer_built_on_a_device_keeps_every_buffer_there():
    """A weight quantized where it lives (prepare_qlora on a model already on the GPU) gives a
    layer whose look-up tables sit beside its codes: a table left in CPU memory would make the
    first GPU forward fail ("indices on another device"). The meta device stands in for the GPU."""
    from dataclasses import replace
    q = quantize_nf4(seeded(40, 96))
    meta = lambda t: t.to("meta")
    q = replace(q, codes=meta(q.codes), code=meta(q.code),
                scales8=replace(q.scales8, codes=meta(q.scales8.codes),
                                absmax=meta(q.scales8.absmax), offset=meta(q.scales8.offset)))
    layer = Linear4bit(q)
    assert {name: t.device.type for name, t in layer.named_buffers()} == \
        {name: "meta" for name, _ in layer.named_buffers()}
