"""Our adapter files against the real PEFT library, both ways, when PEFT is installed (it is
never a dependency: this test is skipped without it). PeftModel.from_pretrained opens our
directory on our GPT as it is, and gives our logits; an adapter PEFT saved loads into ours."""
import pytest
import torch

from lora import apply_lora, load_adapter, save_adapter
from conftest import small_gpt

peft = pytest.importorskip("peft", reason="PEFT is not installed (optional)")
F32_TOL = 1e-5  # the same float32 products, summed by two implementations


def randomize_B(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def tokens():
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))


def test_peft_from_pretrained_opens_our_adapter_and_gives_our_logits(tmp_path):
    ours = apply_lora(small_gpt(), r=4, alpha=8).eval()
    randomize_B(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(small_gpt(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(tokens())[0], ours(tokens())[0], atol=F32_TOL)


def test_an_adapter_saved_by_peft_loads_into_ours(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(small_gpt(), config).eval()
    randomize_B(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(small_gpt(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(ours(tokens())[0], theirs(tokens())[0], atol=F32_TOL)
