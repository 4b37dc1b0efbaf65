"""The hand-written Llama-family and GPT-2 models, without transformers: their configs and what
each piece of their math must do (the logits against transformers' are in
test_pretrained_hf.py)."""
import math

import pytest
import torch

from lora import apply_lora
from tiny_gpt import TrainConfig, masked_cross_entropy, train
from tiny_gpt.pretrained import ModelConfig, build_model, read_config, shipped_config
from tiny_gpt.pretrained.build import empty_model
from tiny_gpt.pretrained.config import config_from_dict
from tiny_gpt.pretrained.llama import RMSNorm, apply_rotary, llama3_scaled, rotary_angles

F32_TOL = 1e-5  # float32: the same sums in another order


def llama_raw(**over):
    raw = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False}
    return {**raw, **over}


def gpt2_raw(**over):
    raw = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
           "n_positions": 64}
    return {**raw, **over}


def model_of(raw, seed=0):
    torch.manual_seed(seed)
    return build_model(config_from_dict(raw)).eval()


def tokens(B=2, T=12, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- configs ----------------------------------------------------------------------------------
def test_shipped_configs_have_the_published_parameter_counts():
    # SmolLM2-135M and Llama-3.2-1B as their model cards count them (both tie the head)
    assert empty_model(shipped_config("smollm2-135m")).num_params() == 134_515_008
    assert empty_model(shipped_config("llama-3.2-1b")).num_params() == 1_235_814_400
    tiny = shipped_config("tiny")
    assert tiny.num_hidden_layers <= 4 and tiny.vocab_size <= 1024


def test_an_unknown_shipped_config_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="shipped: .*smollm2-135m"):
        shipped_config("smollm3")


@pytest.mark.parametrize("raw, message", [
    (llama_raw(model_type="mistral"), "unknown model_type 'mistral'"),
    ({k: v for k, v in llama_raw().items() if k != "num_hidden_layers"},
     "missing field 'num_hidden_layers'"),
    (llama_raw(hidden_size="32"), "'hidden_size' must be an integer"),
    (llama_raw(num_hidden_layers=True), "'num_hidden_layers' must be an integer"),
    (llama_raw(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
    (llama_raw(num_attention_heads=5), "divisible by num_attention_heads=5"),
    (llama_raw(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not implemented"),
    (llama_raw(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "needs numbers for .*low_freq_factor"),
    (llama_raw(hidden_act="gelu"), "hidden_act 'gelu'"),
    (gpt2_raw(n_head=5), "divisible by n_head=5"),
    (gpt2_raw(activation_function="relu"), "activation_function 'relu'"),
])
def test_a_malformed_config_is_refused_naming_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_read_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        read_config(tmp_path)


def test_both_rope_spellings_read_the_same():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    old = config_from_dict(llama_raw(rope_theta=5e5, rope_scaling=scaling))
    new = config_from_dict({**{k: v for k, v in llama_raw().items() if k != "rope_theta"},
                            "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert (old.rope_theta, old.rope_scaling) == (new.rope_theta, new.rope_scaling) != (5e5, None)


def test_qwen2_has_bias_on_q_k_v_but_not_o():
    attn = model_of(llama_raw(model_type="qwen2")).blocks[0].self_attn
    assert [getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")] \
        == [True, True, True, False]


# --- the pieces of the math -------------------------------------------------------------------
def test_rotary_turns_channel_i_towards_channel_i_plus_half():
    """Rotate-half layout: channels i and i + d/2 are one pair (not 2i and 2i+1)."""
    d, p = 8, 3
    freq = torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = rotary_angles(freq, torch.tensor([[p]]), torch.float32)
    e1 = torch.zeros(1, 1, 1, d)
    e1[..., 1] = 1.0
    out = apply_rotary(e1, cos, sin).flatten()
    expected = torch.zeros(d)
    expected[1], expected[1 + d // 2] = math.cos(p * 0.1), math.sin(p * 0.1)
    assert torch.allclose(out, expected, atol=1e-7)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=torch.Generator().manual_seed(0))

    def score(m, n):
        cq, sq = rotary_angles(freq, torch.tensor([[m]]), torch.float64)
        ck, sk = rotary_angles(freq, torch.tensor([[n]]), torch.float64)
        return (apply_rotary(q.double(), cq, sq) * apply_rotary(k.double(), ck, sk)).sum()

    assert torch.allclose(score(7, 3), score(107, 103), atol=1e-9)  # float64 rounding
    assert abs(score(7, 3) - score(7, 10)) > 1e-2  # another distance, another score


def test_llama3_scaling_divides_long_wavelengths_keeps_short_blends_between():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    freq = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    scaled = llama3_scaled(freq, scaling)
    wavelength = 2 * math.pi / freq
    long, short = wavelength > 64 / 1.0, wavelength < 64 / 4.0
    between = ~long & ~short
    assert long.any() and short.any() and between.any()
    assert torch.equal(scaled[long], freq[long] / 8) and torch.equal(scaled[short], freq[short])
    ratio = scaled[between] / freq[between]  # from 1 (short end) down towards 1/8 (long end)
    assert ((ratio > 1 / 8) & (ratio < 1)).all() and (ratio.diff() <= 0).all()


def test_rmsnorm_computes_in_float32_and_casts_back():
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 30).bfloat16()
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 64))
    norm = norm.bfloat16()
    x32 = x.float()
    reference = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    in_bf16 = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
    assert not torch.equal(in_bf16, reference)  # so the test can tell the two apart


def test_grouped_query_attention_equals_multi_head_with_each_kv_head_repeated():
    """Key/value head j serves query heads 2j and 2j+1 (repeat_interleave): a full multi-head
    model whose k and v rows are those heads, copied in that order, gives the same logits."""
    gqa = model_of(llama_raw(num_key_value_heads=2))
    mha = model_of(llama_raw(num_key_value_heads=4))
    state, hd = dict(gqa.state_dict()), 8
    for name, t in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = t.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(mha(tokens())[0], gqa(tokens())[0], atol=F32_TOL)


@pytest.mark.parametrize("raw", [llama_raw(), llama_raw(tie_word_embeddings=True), gpt2_raw()],
                         ids=["llama", "llama-tied", "gpt2"])
def test_loss_is_the_masked_cross_entropy_of_the_logits(raw):
    model, x, y = model_of(raw), tokens(), tokens(seed=2)
    mask = (torch.arange(12) > 5).long().expand(2, 12)
    logits, loss = model(x, y, loss_mask=mask)
    assert logits.shape == (2, 12, 64)
    assert torch.equal(loss, masked_cross_entropy(logits, y, mask))


def test_a_sequence_past_the_context_is_refused():
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        model_of(llama_raw())(tokens(T=65))


# --- decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [llama_raw(), llama_raw(model_type="qwen2"), gpt2_raw()],
                         ids=["llama-gqa", "qwen2", "gpt2"])
def test_generation_with_the_kv_cache_equals_recomputing_everything(raw):
    model = model_of(raw)
    cached = model.generate(tokens(T=7), 20)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, model.generate(tokens(T=7), 20, use_cache=False))


def test_generation_stops_at_eos_and_fills_finished_rows_with_it():
    model = model_of(llama_raw())
    free = model.generate(tokens(T=5), 12)
    eos = int(free[0, 7])  # the token row 0 produces third
    out = model.generate(tokens(T=5), 12, eos_id=eos)
    first = (out[0, 5:] == eos).nonzero()[0].item()
    assert first <= 2 and (out[0, 5 + first:] == eos).all()
    assert torch.equal(out[:, :5 + first + 1], free[:, :5 + first + 1])


def test_generation_past_the_context_is_refused_before_any_work():
    with pytest.raises(ValueError, match="exceed max_position_embeddings 64"):
        model_of(llama_raw()).generate(tokens(T=60), 5)


# --- the rest of the project on these models --------------------------------------------------
@pytest.mark.parametrize("impl", ["torch", "manual"])
def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients(impl):
    def grads(checkpointing):
        model = apply_lora(model_of(llama_raw()), r=4).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0, 0.1, generator=torch.Generator().manual_seed(3))
        model.config.gradient_checkpointing, model.config.checkpoint_impl = checkpointing, impl
        _, loss = model(tokens(), tokens(seed=2))
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (loss0, g0), (loss1, g1) = grads(False), grads(True)
    assert len(g0) == 8 and torch.equal(loss0, loss1)  # A and B on q, v in two layers
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)  # recomputed: same math


@pytest.mark.parametrize("raw", [llama_raw(), gpt2_raw()], ids=["llama", "gpt2"])
def test_lora_on_q_and_v_starts_equal_to_the_base_and_trains_with_the_project_loop(raw):
    model = model_of(raw)
    with torch.no_grad():
        before = model(tokens())[0]
    apply_lora(model, targets=("q_proj", "v_proj"), r=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens())[0], before)  # B = 0
    x = tokens(B=4, T=16, seed=5)
    cfg = TrainConfig(max_steps=20, lr=5e-2, warmup_steps=0, eval_every=0, progress=False)
    result = train(model, lambda gen: (x[:, :-1], x[:, 1:], None), cfg, device="cpu")
    assert result.losses[-1] < 0.95 * result.losses[0]  # it learns the one batch it sees
