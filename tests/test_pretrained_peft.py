"""Adapters crossing between this project's pretrained models and PEFT on transformers' model of
the same checkpoint, both ways, with equal logits. Llama: the module paths are the files', so
save_adapter / load_adapter work as they are. GPT-2: our separate q/k/v adapters against PEFT's
one adapter on the fused c_attn (lora/fused_io.py). The tests that need peft and transformers
skip without them and say why; the mapping's own round trip runs without."""
import json

import pytest
import torch

from lora import apply_lora, load_adapter, save_adapter
from lora.fused_io import load_adapter_fused, save_adapter_fused
from tiny_gpt.pretrained import build_model, load_pretrained, save_pretrained
from tiny_gpt.pretrained.config import config_from_dict

from test_pretrained_models import gpt2_raw, llama_raw

F32_TOL = 1e-5  # float32 logits of O(1): the same products summed in another order


def needs(name):
    return pytest.importorskip(name, reason=f"{name} is not installed (the optional 'parity' "
                               "extra: pip install -e '.[dev,parity]')")


def tokens():
    return torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))


def randomize_B(model, seed=1):
    """B = 0 at the start would make every adapter invisible; give each a real update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def checkpoint(tmp_path, raw):
    torch.manual_seed(0)
    save_pretrained(build_model(config_from_dict(raw)), tmp_path / "base")
    return tmp_path / "base"


def hf_model(folder):
    transformers = needs("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        out = model(tokens())
    return out[0] if isinstance(out, tuple) else out.logits


# --- Llama: the same names --------------------------------------------------------------------
def test_a_llama_adapter_trained_here_opens_in_peft_with_our_logits(tmp_path):
    peft = needs("peft")
    base = checkpoint(tmp_path, llama_raw())
    ours = apply_lora(load_pretrained(base), ("q_proj", "v_proj", "down_proj"), r=4).eval()
    randomize_B(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_model(base), str(tmp_path / "adapter")).eval()
    assert not torch.allclose(logits(ours), logits(hf_model(base)), atol=1e-3)
    assert torch.allclose(logits(theirs), logits(ours), atol=F32_TOL)


def test_peft_adapter_for_transformers_llama_opens_here(tmp_path):
    peft = needs("peft")
    base = checkpoint(tmp_path, llama_raw())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    theirs = peft.get_peft_model(hf_model(base), config).eval()
    randomize_B(theirs)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter(load_pretrained(base), tmp_path / "adapter").eval()
    assert torch.allclose(logits(ours), logits(theirs), atol=F32_TOL)


# --- GPT-2: separate q, k, v against the fused c_attn -----------------------------------------
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "alpha/sqrt(r)"])
def test_our_gpt2_q_v_adapters_open_in_peft_as_one_c_attn_adapter(tmp_path, rslora):
    peft = needs("peft")
    base = checkpoint(tmp_path, gpt2_raw())
    ours = apply_lora(load_pretrained(base), ("q_proj", "v_proj", "o_proj", "mlp.c_fc"), r=4,
                      alpha=8, use_rslora=rslora).eval()
    randomize_B(ours)
    save_adapter_fused(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_model(base), str(tmp_path / "adapter")).eval()
    c_attn = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert c_attn.lora_A["default"].weight.shape == (8, 32)  # rank 2r: q's and v's A stacked
    assert torch.allclose(logits(theirs), logits(ours), atol=F32_TOL)


def test_peft_c_attn_adapter_opens_here_as_q_k_v_adapters_sharing_A(tmp_path):
    peft = needs("peft")
    base = checkpoint(tmp_path, gpt2_raw())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"],
                             fan_in_fan_out=True)
    theirs = peft.get_peft_model(hf_model(base), config).eval()
    randomize_B(theirs)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter_fused(load_pretrained(base), tmp_path / "adapter").eval()
    attn = ours.transformer.h[1].attn
    assert torch.equal(attn.q_proj.adapters["default"].lora_A, attn.v_proj.adapters["default"].lora_A)
    assert torch.allclose(logits(ours), logits(theirs), atol=F32_TOL)


def test_fusing_then_splitting_gives_back_the_same_logits_without_peft(tmp_path):
    """The mapping is exact: q and v adapters of rank r, fused to rank 2r and split again into
    q, k, v adapters of rank 2r (k's B zero), change no logit."""
    base = checkpoint(tmp_path, gpt2_raw())
    ours = apply_lora(load_pretrained(base), ("q_proj", "v_proj"), r=4, alpha=8).eval()
    randomize_B(ours)
    save_adapter_fused(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config.update(r=8, lora_alpha=16, rank_pattern={}, alpha_pattern={})  # all layers fused
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    back = load_adapter_fused(load_pretrained(base), tmp_path / "adapter").eval()
    assert not back.transformer.h[0].attn.k_proj.adapters["default"].lora_B.any()
    assert torch.allclose(logits(back), logits(ours), atol=F32_TOL)


def test_fusing_refuses_layers_that_adapt_different_projections(tmp_path):
    base = checkpoint(tmp_path, gpt2_raw())
    ours = apply_lora(load_pretrained(base), ("h.0.attn.q_proj", "h.1.attn.v_proj"), r=4)
    with pytest.raises(ValueError, match="must adapt the same projections"):
        save_adapter_fused(ours, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_fused_adapters_are_for_gpt2_only(tmp_path):
    base = checkpoint(tmp_path, llama_raw())
    with pytest.raises(ValueError, match="for the pretrained GPT-2 model"):
        save_adapter_fused(apply_lora(load_pretrained(base), r=4), tmp_path / "adapter")
