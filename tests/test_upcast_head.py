"""The tied head over an embedding stored in bfloat16 (tiny_gpt/pretrained/upcast_head.py), and
the models and loaders that store it so."""
import pytest
import torch
import torch.nn.functional as F

from quant import load_pretrained_4bit
from tiny_gpt.pretrained import build_model, load_pretrained, save_pretrained
from tiny_gpt.pretrained.config import config_from_dict
from tiny_gpt.pretrained.upcast_head import UpcastLinear, tied_logits
from tiny_gpt.util.finite_differences import central_differences

from test_pretrained_models import gpt2_raw, llama_raw, tokens

FD_TOL = 1e-7  # float64, and linear in h: central differences exact up to rounding


def seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_gradcheck_float64_with_slices_that_do_not_divide_the_rows():
    weight = seeded(7, 5)  # stored in float32, h in float64: 7 rows in slices of 3, 3, 1
    h = seeded(2, 3, 5, seed=1, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda h: UpcastLinear.apply(h, weight, 3), (h,))


def test_backward_matches_central_finite_differences():
    weight = seeded(7, 5).to(torch.bfloat16)
    h = seeded(4, 5, seed=1, dtype=torch.float64).requires_grad_()
    probe = seeded(4, 7, seed=2, dtype=torch.float64)  # L = sum(logits * probe)

    def loss(inp):
        return (UpcastLinear.apply(inp, weight, 2) * probe).sum()

    loss(h).backward()
    numeric = central_differences(lambda: loss(h), h, eps=1e-6)
    assert (numeric - h.grad).abs().max() < FD_TOL


def test_equals_the_whole_upcast_weight_and_keeps_no_float_copy_for_backward():
    weight = seeded(50, 16).to(torch.bfloat16)
    h = seeded(3, 16, seed=1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = tied_logits(h, weight, rows=8)
        (logits * seeded(3, 50, seed=2)).sum().backward()
    grad = h.grad.clone()
    h.grad = None
    whole = F.linear(h, weight.float())
    (whole * seeded(3, 50, seed=2)).sum().backward()
    torch.testing.assert_close(logits, whole, rtol=1e-6, atol=1e-6)  # same products, per slice
    torch.testing.assert_close(grad, h.grad, rtol=1e-6, atol=1e-6)
    assert not any(t.dtype == torch.float32 and t.numel() >= weight.numel() for t in saved)


def test_a_weight_in_the_hidden_dtype_is_a_plain_linear_and_a_trained_low_one_is_refused():
    weight = seeded(6, 4).requires_grad_()
    h = seeded(2, 4, seed=1)
    tied_logits(h, weight).sum().backward()
    assert weight.grad is not None  # full fine-tuning trains the tied embedding
    with pytest.raises(ValueError, match="trained embedding must be stored"):
        tied_logits(h, weight.detach().to(torch.bfloat16).requires_grad_())


@pytest.mark.parametrize("raw", [llama_raw(tie_word_embeddings=True), gpt2_raw()],
                         ids=["llama", "gpt2"])
def test_a_bfloat16_embedding_gives_the_logits_of_its_values_in_float32(tmp_path, raw):
    """Stored in bfloat16, the embedding is upcast when read and sliced in the head: the
    model computes what a float32 model holding the same (bf16-rounded) values computes."""
    torch.manual_seed(0)
    model = build_model(config_from_dict(raw))
    with torch.no_grad():  # round the embedding to bfloat16's values, in float32
        model.tok_emb.weight.copy_(model.tok_emb.weight.to(torch.bfloat16).float())
    save_pretrained(model, tmp_path)
    low = load_pretrained(tmp_path, embedding_dtype=torch.bfloat16)
    assert low.tok_emb.weight.dtype == torch.bfloat16
    assert low.final_norm.weight.dtype == torch.float32
    torch.testing.assert_close(low(tokens())[0], model(tokens())[0], rtol=1e-5, atol=1e-5)
    out = low.generate(tokens()[:, :4], 3)  # no-grad decoding goes through the same head
    assert torch.equal(out, model.generate(tokens()[:, :4], 3))


def test_4bit_loading_stores_the_embedding_as_asked_and_refuses_a_bad_dtype(tmp_path):
    save_pretrained(build_model(config_from_dict(llama_raw(tie_word_embeddings=True))),
                    tmp_path)
    model = load_pretrained_4bit(tmp_path, embedding_dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    logits, loss = model(tokens(), tokens())
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="embedding_dtype must be one of"):
        load_pretrained(tmp_path, embedding_dtype=torch.int8)
