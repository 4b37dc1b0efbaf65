"""apply_lora on the tiny GPT: zero-init equivalence, freezing, optimizer state, targets,
parameter counts, whole-model merge / unmerge, disabling, and the adapter state dict."""
import pytest
import torch

from lora import (LoRALinear, apply_lora, count_parameters, disable_adapters, format_table,
                  lora_state_dict, merge_lora, parameter_table, unmerge_lora)
from conftest import small_gpt

F32_TOL = 1e-5  # float32 logits through 2 blocks: rounding differences of order 1e-6


def tokens(seed=1):
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(seed))


def randomize_B(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.1)


def test_zero_init_leaves_gpt_output_unchanged():
    model, idx = small_gpt(), tokens()
    before = model(idx)[0]
    apply_lora(model)
    assert torch.equal(model(idx)[0], before)


def test_only_lora_factors_train_and_get_optimizer_state():
    model, idx = small_gpt().train(), tokens()
    apply_lora(model, r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _, loss = model(idx, targets=idx)
    loss.backward()
    opt.step()
    stateful = {id(p) for p in opt.state}
    assert {n for n, p in model.named_parameters() if id(p) in stateful} == set(trainable)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None


def test_targets_by_suffix_and_full_path():
    model = apply_lora(small_gpt(), targets=("q_proj", "blocks.1.mlp.up_proj"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"blocks.0.attn.q_proj", "blocks.1.attn.q_proj", "blocks.1.mlp.up_proj"}


def test_unknown_target_lists_available_names():
    with pytest.raises(ValueError, match="x_proj") as err:
        apply_lora(small_gpt(), targets=("q_proj", "x_proj"))
    assert "v_proj" in str(err.value) and "blocks.0.mlp.down_proj" in str(err.value)


def test_applying_twice_is_an_error():
    model = apply_lora(small_gpt())
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, targets=("q_proj",))


def test_parameter_counts():
    model = apply_lora(small_gpt(), r=4)
    total_before = small_gpt().num_params()
    lora = 2 * 2 * (4 * 32 + 32 * 4)  # layers x (q, v) x (A + B)
    assert count_parameters(model) == (lora, total_before + lora)
    rows = parameter_table(model)
    assert (sum(r[1] for r in rows), sum(r[2] for r in rows)) == count_parameters(model)
    assert ("blocks.0.attn.q_proj", 256, 256) in rows
    assert f"{lora:,}" in format_table(rows).splitlines()[-1]


def test_merge_lora_keeps_output_and_unmerge_restores_weights():
    model, idx = apply_lora(small_gpt()), tokens()
    randomize_B(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base" in n}
    before = model(idx)[0]
    merge_lora(model)
    assert torch.allclose(model(idx)[0], before, atol=F32_TOL)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=F32_TOL)


def test_disable_adapters_gives_base_output():
    base, idx = small_gpt(), tokens()
    expected = base(idx)[0]
    model = apply_lora(base)
    randomize_B(model)
    adapted = model(idx)[0]
    assert not torch.allclose(adapted, expected)
    with disable_adapters(model):
        assert torch.equal(model(idx)[0], expected)
    assert torch.equal(model(idx)[0], adapted)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        with disable_adapters(model):
            pass


def test_lora_state_dict_holds_only_adapter_tensors():
    model = apply_lora(small_gpt(), r=4)
    state = lora_state_dict(model)
    assert len(state) == 2 * 2 * 2
    assert all(k.endswith(("_proj.lora_A", "_proj.lora_B")) for k in state)
    assert lora_state_dict(model, "missing") == {}


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    """Recomputing each block in backward re-runs LoRAFunction's forward: same gradients."""
    grads = []
    for checkpointing in (False, True):
        model = apply_lora(small_gpt(), r=4)
        randomize_B(model)  # small_gpt() reseeds the global RNG: both runs get the same factors
        model.config.gradient_checkpointing = checkpointing
        model.train()
        _, loss = model(tokens(), targets=tokens())
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=F32_TOL)
