"""Initializations beyond B = 0: PiSSA (the model equals its base at step 0, the adapter holds
the top singular part, and converts exactly to a rank-2r LoRA for the original base), the
k-bit NormalFloat code books, and LoftQ (its error below plain quantization's, falling with
the iterations, and largest where the bits are fewest)."""
import copy

import pytest
import torch

from lora import apply_lora, lora_layers, prepare_qlora
from lora.variants.loftq import apply_loftq, loftq_init
from lora.variants.pissa import pissa_init, pissa_to_lora
from quant import NF4_CODE, normal_float_levels, quantize_4bit
from tiny_gpt import GPT, GPTConfig
from conftest import small_gpt


def logits(model, seed=1):
    idx = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)[0]


def test_pissa_starts_at_the_base_with_the_top_singular_part():
    base = small_gpt()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    initial = pissa_init(model)
    ref = logits(base)
    assert (logits(model) - ref).abs().max() / ref.abs().max() < 1e-5
    layer = model.blocks[0].attn.q_proj
    W0 = base.blocks[0].attn.q_proj.weight.double()
    S = torch.linalg.svdvals(W0)
    delta = layer.delta_weight().double()
    assert torch.allclose(torch.linalg.svdvals(delta)[:4], S[:4], rtol=1e-5)
    # the residual holds the rest: its largest singular value is W0's fifth
    assert torch.linalg.svdvals(layer.base.weight.double())[0] == pytest.approx(S[4].item(),
                                                                                rel=1e-4)
    assert set(initial) == {p for p, _ in lora_layers(model)}


def test_pissa_to_lora_is_exact_on_the_original_base():
    base = small_gpt()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    initial = pissa_init(model)
    with torch.no_grad():  # "training": move the factors
        for _, layer in lora_layers(model):
            layer.lora_A.add_(0.05)
            layer.lora_B.mul_(1.3)
    trained = logits(model)
    pissa_to_lora(model, initial)
    assert (logits(model) - trained).abs().max() / trained.abs().max() < 1e-5
    for path, layer in lora_layers(model):
        original = base.get_submodule(path).weight
        assert (layer.base.weight - original).abs().max() < 1e-5
        assert layer.r == 8 and layer.scaling == 1.0


def test_pissa_refuses_a_4bit_base_before_changing_anything():
    model = prepare_qlora(small_gpt(), r=2, alpha=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="4-bit"):
        pissa_init(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        pissa_init(apply_lora(small_gpt()), "nope")


def test_k_bit_normal_float_code_books():
    assert torch.equal(normal_float_levels(4), NF4_CODE)
    for bits in (2, 3, 4):
        code = normal_float_levels(bits)
        assert code.numel() == 2 ** bits and (code == 0).sum() == 1
        assert code.max() == 1 and code.min() >= -1 and torch.all(code[1:] > code[:-1])


def test_loftq_error_below_plain_quantization_and_falling():
    torch.manual_seed(0)
    W = torch.randn(64, 96) * 0.05
    gaps = {}
    for bits in (2, 3, 4):
        q, A, B, errors = loftq_init(W, r=8, scaling=2.0, bits=bits, iters=4)
        assert len(errors) == 5 and errors[1] < errors[0]
        assert errors[-1] <= errors[1] * 1.001
        rebuilt = q.dequantize(torch.float32) + 2.0 * B @ A
        assert (W - rebuilt).norm() / W.norm() == pytest.approx(errors[-1], rel=1e-4)
        gaps[bits] = errors[0] - errors[-1]
    assert gaps[2] > gaps[4]  # fewer bits, more error for the low-rank part to take
    with pytest.raises(ValueError, match="bits must be"):
        loftq_init(W, 8, 2.0, bits=1)


def test_apply_loftq_sets_base_and_adapter_closer_to_the_float_model():
    """QLoRA at step 0 is dequant(Q) x (B = 0); LoftQ's 4-bit base plus its adapter is closer
    to the float weights in every adapted layer, and so its logits are closer to the float
    model's."""
    base = small_gpt()
    plain = prepare_qlora(copy.deepcopy(base), r=4, alpha=8)
    loftq = copy.deepcopy(plain)
    errors = apply_loftq(loftq, base, bits=4, iters=3)
    assert set(errors) == {p for p, _ in lora_layers(loftq)}
    assert all(e[-1] < e[0] for e in errors.values())
    ref = logits(base)
    assert (logits(loftq) - ref).norm() < (logits(plain) - ref).norm()
    with pytest.raises(ValueError, match="no float"):
        apply_loftq(copy.deepcopy(plain), GPT(GPTConfig(block_size=32, n_layer=2, n_head=2,
                                                        n_embd=16)))


def test_init_lora_weights_options():
    base = small_gpt()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, init_lora_weights="pissa")
    ref = logits(base)
    assert (logits(model) - ref).abs().max() / ref.abs().max() < 1e-5
    assert model.blocks[0].attn.q_proj.lora_B.abs().max() > 0
    with pytest.raises(ValueError, match="init_lora_weights"):
        apply_lora(small_gpt(), init_lora_weights="gaussian")
    with pytest.raises(ValueError, match="PiSSA needs a float"):
        from quant import quantize_model
        apply_lora(quantize_model(small_gpt()), init_lora_weights="pissa")
    q = prepare_qlora(copy.deepcopy(base), r=4, alpha=8, bits=2, init_lora_weights="loftq",
                      loftq_iters=2)
    assert all(len(e) == 3 and e[-1] < e[0] for e in q.loftq_errors.values())
    with pytest.raises(ValueError, match="bits must be"):
        prepare_qlora(small_gpt(), bits=5)


@pytest.mark.parametrize("bits", [2, 3])
def test_k_bit_linear_uses_only_its_levels_and_errs_more_than_nf4(bits):
    from quant import Linear4bit
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Linear4bit.from_linear(linear, blocksize=64, double_quant=False, bits=bits)
    rows = layer.dequantized_weight() / layer.weight.block_scales()[:, None]  # (32, 64) in [-1, 1]
    levels = normal_float_levels(bits)
    assert torch.isin(rows.round(decimals=5), levels.round(decimals=5)).all()
    err = (layer.dequantized_weight() - linear.weight).norm()
    nf4 = (Linear4bit.from_linear(linear, 64, False).dequantized_weight() - linear.weight).norm()
    assert err > nf4


def test_loftq_quantizes_the_residual_of_the_previous_low_rank_fit():
    """The alternation itself, on a small case: iteration 2 quantizes W - s B_1 A_1, where
    B_1, A_1 are what one iteration returns -- not W again (which would make every iteration
    the same as the first). Codes and scales are compared exactly: the same input to the same
    quantizer gives the same bytes."""
    torch.manual_seed(0)
    W, s = torch.randn(32, 64) * 0.05, 2.0
    _, A1, B1, _ = loftq_init(W, r=4, scaling=s, bits=2, iters=1)
    q2, _, _, errors = loftq_init(W, r=4, scaling=s, bits=2, iters=2)
    low_rank = s * B1.double() @ A1.double()
    expected = quantize_4bit((W.double() - low_rank).float(), normal_float_levels(2), 64, True)
    assert torch.equal(q2.codes, expected.codes)
    assert torch.equal(q2.scales8.codes, expected.scales8.codes)
    assert errors[2] < errors[1]  # at 2 bits the second quantization helps, visibly
