"""Prefix tuning (Li & Liang 2021): what an empty, a zero and a learned prefix really do."""
import pytest
import torch

from tiny_gpt import TrainConfig, exact_match
from tiny_gpt.finetune import finetune
from tiny_gpt.model import CausalSelfAttention
from tiny_gpt.methods.prefix_tuning import PrefixTuning, text_keys_values

FP32_TOL = 1e-6   # float32 results that differ only in kernel / summation order
FP64_TOL = 1e-12  # float64: the same formula computed two ways


def tokens(cfg, batch=3, T=10, seed=1):
    return torch.randint(cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_no_virtual_tokens_is_exactly_the_base(small_model, small_cfg):
    x = tokens(small_cfg)
    tuned = PrefixTuning(small_model, n_prefix=0)
    assert torch.equal(tuned(x)[0], small_model(x)[0])
    assert torch.equal(tuned.generate(x, 5), small_model.generate(x, 5))


def test_an_empty_prefix_through_the_prefix_path_matches_the_base(small_model, small_cfg):
    """Zero-length keys/values take the explicit-mask attention path instead of is_causal; the
    mask is then the plain causal one, so the result agrees up to kernel rounding."""
    hs = small_cfg.n_embd // small_cfg.n_head
    empty = [(torch.zeros(3, small_cfg.n_head, 0, hs),) * 2 for _ in range(small_cfg.n_layer)]
    x = tokens(small_cfg)
    torch.testing.assert_close(small_model(x, prefix_kv=empty)[0], small_model(x)[0],
                               rtol=FP32_TOL, atol=FP32_TOL)


def test_a_zero_prefix_is_not_the_base_it_shrinks_attention_by_z_over_z_plus_p():
    """A zero key scores 0, so each virtual token takes softmax weight exp(0) / (Z + P); with a
    zero value it adds nothing to the numerator, so  y_prefix = y_base * Z / (Z + P),  where
    Z = sum over the visible real keys of exp(q.k / sqrt(hs)). Checked in float64 on one layer
    (before o_proj, whose bias would make the relation affine rather than a scaling)."""
    torch.manual_seed(0)
    cfg = type("Cfg", (), dict(n_embd=16, n_head=2, dropout=0.0))()
    attn = CausalSelfAttention(cfg).double()
    attn.o_proj = torch.nn.Identity()
    B, T, P, hs = 2, 7, 3, 8
    x = torch.randn(B, T, 16, dtype=torch.float64)
    zero = torch.zeros(B, 2, P, hs, dtype=torch.float64)
    y_base, y_zero = attn(x), attn(x, (zero, zero))
    q, k = attn.split_heads(attn.q_proj(x)), attn.split_heads(attn.k_proj(x))
    scores = (q @ k.transpose(-1, -2) / hs ** 0.5).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))      # (B, nh, T, T)
    Z = scores.exp().sum(-1)                                           # (B, nh, T)
    shrink = (Z / (Z + P)).transpose(1, 2).repeat_interleave(hs, -1)   # (B, T, nh * hs)
    assert (y_zero - y_base).abs().max() > 1e-3                        # really not the base
    torch.testing.assert_close(y_zero, y_base * shrink, rtol=FP64_TOL, atol=FP64_TOL)


def test_the_prefix_is_visible_from_every_position(small_model, small_cfg):
    torch.manual_seed(0)
    tuned = PrefixTuning(small_model, n_prefix=3)
    x = tokens(small_cfg)
    before = tuned(x)[0]
    with torch.no_grad():
        tuned.prefix[:, 1, :, 1] += 1.0  # change one virtual token's values in every layer
    change = (tuned(x)[0] - before).abs().amax(dim=(0, 2))  # (T,): per position
    assert (change > 1e-4).all(), change


def test_causality_still_holds_among_real_tokens(small_model, small_cfg):
    tuned = PrefixTuning(small_model, n_prefix=3)
    x = tokens(small_cfg)
    t = 6
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % small_cfg.vocab_size
    a, b = tuned(x)[0], tuned(x2)[0]
    # positions before t never see token t: masked scores are exactly -inf, weight exactly 0
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=FP32_TOL, atol=FP32_TOL)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("reparam_hidden", [None, 16])
def test_gradients_reach_the_prefix_only(small_model, small_cfg, reparam_hidden):
    tuned = PrefixTuning(small_model, n_prefix=3, reparam_hidden=reparam_hidden)
    x = tokens(small_cfg)
    tuned(x, targets=x)[1].backward()
    for p in small_model.parameters():
        assert not p.requires_grad and p.grad is None
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in tuned.prefix_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    if reparam_hidden is None:  # every layer's keys and values get a gradient
        assert (tuned.prefix.grad.abs().sum(dim=(2, 3, 4)) > 0).all()


def test_parameter_count_and_bake_keeps_outputs(small_model, small_cfg):
    L, C, P = small_cfg.n_layer, small_cfg.n_embd, 4
    direct = PrefixTuning(small_model, n_prefix=P)
    assert sum(p.numel() for p in direct.prefix_parameters()) == P * L * 2 * C
    tuned = PrefixTuning(small_model, n_prefix=P, reparam_hidden=16)
    trained_size = P * C + (C * 16 + 16) + (16 * L * 2 * C + L * 2 * C)  # P', 2 Linear layers
    assert sum(p.numel() for p in tuned.prefix_parameters()) == trained_size
    x = tokens(small_cfg)
    before = tuned(x)[0]
    tuned.bake()
    assert sum(p.numel() for p in tuned.prefix_parameters()) == P * L * 2 * C
    torch.testing.assert_close(tuned(x)[0], before, rtol=FP32_TOL, atol=FP32_TOL)


def test_text_init_matches_the_keys_and_values_the_model_computes(small_model, small_cfg):
    """Checked against forward hooks on k_proj / v_proj while the model reads the text."""
    text = "hello"
    seen = []
    hooks = [getattr(b.attn, n).register_forward_hook(lambda m, i, o: seen.append(o))
             for b in small_model.blocks for n in ("k_proj", "v_proj")]
    from tiny_gpt import encode
    small_model(torch.tensor([encode(text)]))
    for h in hooks:
        h.remove()
    table = text_keys_values(small_model, text)  # (L, 2, nh, P, hs)
    hs = small_cfg.n_embd // small_cfg.n_head
    for i, out in enumerate(seen):  # out (1, P, C), in order block0 k, block0 v, block1 k, ...
        expected = out[0].view(len(text), small_cfg.n_head, hs).transpose(0, 1)
        torch.testing.assert_close(table[i // 2, i % 2], expected, rtol=FP32_TOL, atol=FP32_TOL)
    tuned = PrefixTuning(small_model, n_prefix=len(text), init_text=text)
    assert torch.equal(tuned.prefix.detach(), table)


def test_training_loop_and_scoring_work_unchanged(small_model):
    examples = [('upper "cat" -> "', 'CAT"\n'), ('upper "dog" -> "', 'DOG"\n')] * 4
    tuned = PrefixTuning(small_model, n_prefix=4)
    frozen = {n: p.detach().clone() for n, p in small_model.named_parameters()}
    cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, eval_every=2, progress=False)
    result = finetune(tuned, {"train": examples, "val": examples[:2]}, cfg, batch_size=4,
                      device="cpu", with_accuracy=True)
    assert len(result.evals) == 2 and "val_acc" in result.evals[0][1]
    assert 0.0 <= exact_match(tuned, examples[:2]) <= 1.0
    for n, p in small_model.named_parameters():
        assert torch.equal(p, frozen[n]), n


def test_bad_arguments_raise(small_model):
    with pytest.raises(ValueError, match="n_prefix"):
        PrefixTuning(small_model, n_prefix=-1)
    with pytest.raises(ValueError, match="init_text"):
        PrefixTuning(small_model, n_prefix=3, init_text="toolong")
    with pytest.raises(ValueError, match="init_text"):
        PrefixTuning(small_model, n_prefix=3, init_text="abc", reparam_hidden=8)
