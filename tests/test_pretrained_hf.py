"""Our models against transformers' on the same files: tiny random LlamaForCausalLM (grouped-query
attention, llama3 rope scaling, tied and untied heads, a head_dim of its own), Qwen2ForCausalLM
(q/k/v bias) and GPT2LMHeadModel, written by save_pretrained -- one file, shards, bfloat16 --
and read by our loader. Skipped, with the reason, when transformers is not installed."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the "
                                   "optional 'parity' extra: pip install -e '.[dev,parity]')")

from tiny_gpt.pretrained import load_pretrained  # noqa: E402
from tiny_gpt.util.safetensors_mapped import read_header  # noqa: E402

# float32 logits, relative to their largest: the same products summed in another order by two
# attention kernels stay ~1e-7 apart; a wrong rotary layout or a missing transpose is O(1)
REL_TOL = 1e-5
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# weights 10x the usual 0.02, so that activations reach O(1), where the tanh GELU and the
# exact one (or a float32 and a bfloat16 norm) differ by more than the tolerance
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2)

CASES = {
    "llama-gqa-llama3-untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_scaling=LLAMA3, rope_theta=5e5,
        tie_word_embeddings=False)),
    "llama-tied-head_dim": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)),
    "qwen2-bias": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SMALL, num_key_value_heads=1, tie_word_embeddings=True)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2)),
}


def reference(case, seed=0):
    torch.manual_seed(seed)
    model = CASES[case]().eval()
    with torch.no_grad():  # random biases, so a bias that is dropped shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(T=100):
    return torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(1))


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", [{}, {"max_shard_size": "20KB"}], ids=["one-file", "sharded"])
def test_our_logits_equal_transformers_on_its_saved_folder(tmp_path, case, layout):
    theirs = reference(case)
    theirs.save_pretrained(tmp_path, **layout)
    assert any(tmp_path.glob("*.index.json")) == bool(layout)
    ours = load_pretrained(tmp_path).eval()
    with torch.no_grad():
        err = relative_error(ours(tokens())[0], theirs(tokens()).logits)
    print(f"{case} {layout or 'one file'}: relative logits error {err:.1e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("case", ["llama-gqa-llama3-untied", "gpt2"])
def test_a_bfloat16_folder_loads_to_the_float32_model_of_its_values(tmp_path, case):
    theirs = reference(case)
    with torch.no_grad():  # weights rounded to bfloat16 values, which float32 holds exactly
        for p in theirs.parameters():
            p.copy_(p.bfloat16().float())
    # (a copy is cast and saved: casting the reference itself would round its rotary buffer)
    copy.deepcopy(theirs).to(torch.bfloat16).save_pretrained(tmp_path)
    header, _, _ = read_header(tmp_path / "model.safetensors")
    assert {e["dtype"] for e in header.values()} == {"BF16"}
    ours = load_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert relative_error(ours(tokens())[0], theirs(tokens()).logits) <= REL_TOL


@pytest.mark.parametrize("case", ["llama-gqa-llama3-untied", "gpt2"])
def test_our_greedy_generation_equals_transformers(tmp_path, case):
    theirs = reference(case)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    prompt = tokens(T=8)
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 12), expected)
