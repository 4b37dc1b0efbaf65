"""Claims that lessons 01-03 print, held as tests (those not already in tests/test_lora_*.py).

01: at step 0 only B gets a gradient; the seed's naive F.linear(x, W0 + sBA) is the same
    function, with the same gradients, as the factored layer.
02: Q, V at r = 8 on the default GPT is under 2% of the parameters; AdamW's state is two fp32
    moments per trainable number plus one step counter per tensor; a real fine-tuning run leaves
    every frozen weight bit-for-bit unchanged.
03: one named adapter of a two-adapter model saves and reloads bit-identically; the "cat" 1, 1
    combination gives the stacked model's logits; an adapter file is 4 bytes per number plus a
    small header; training one adapter leaves the other one untouched.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (LoRALinear, add_adapter, apply_lora, combine_adapters, count_parameters,
                  load_adapter, lora_layers, lora_state_dict, save_adapter, save_merged_model,
                  set_active_adapters, train_only_adapter)
from lora.io import WEIGHTS_NAME
from tiny_gpt import GPT, GPTConfig, TrainConfig, get_task, make_batch
from tiny_gpt.finetune import finetune
from tiny_gpt.util.safetensors import load_file
from tiny_gpt.train import make_optimizer

F64_TOL = 1e-12  # float64: the same products summed in another order differ by ~1e-15
F32_TOL = 1e-5   # float32 logits through 2 blocks: rounding of order 1e-6


def tiny_gpt(seed=0):
    torch.manual_seed(seed)  # block_size 64: task lines are up to ~45 characters
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=64)).eval()


def task_batch(task="upper", n=8):
    return make_batch(get_task(task).splits(n_train=n, n_val=4, n_test=4)["train"])


def randomize_B(model, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, std)


# --- lesson 01 ---------------------------------------------------------------------------------

def test_at_step_zero_only_B_gets_a_gradient():
    """dL/dA = s B^T g x^T is exactly zero while B = 0; dL/dB = s g (A x)^T is not."""
    model = apply_lora(tiny_gpt())
    x, y, mask = task_batch()
    model(x, y, mask)[1].backward()
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_A.grad) == 0
        assert layer.lora_B.grad.abs().max() > 0


def test_seed_naive_forward_is_the_same_function():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10).double(), r=3, alpha=6)
    randomize_B(layer, std=1.0)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    W, b, A, B, s = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling
    ours, naive = layer(x), F.linear(x, W + s * B @ A, b)
    g = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (x, A, B), g)
    want = torch.autograd.grad(naive, (x, A, B), g)
    assert torch.allclose(ours, naive, atol=F64_TOL, rtol=0)
    for a, b_ in zip(got, want):
        assert torch.allclose(a, b_, atol=F64_TOL, rtol=0)


# --- lesson 02 ---------------------------------------------------------------------------------

def test_q_v_r8_on_the_default_gpt_is_under_two_percent():
    model = GPT(GPTConfig())
    total_before = model.num_params()
    trainable, total = count_parameters(apply_lora(model, targets=("q_proj", "v_proj"), r=8))
    assert trainable == 4 * 2 * (8 * 128 + 128 * 8)  # blocks x (Q, V) x (A + B)
    assert total == total_before + trainable
    assert trainable / total <= 0.02


def test_adamw_state_is_two_moments_per_trainable_number():
    model = apply_lora(tiny_gpt().train(), r=4)
    opt = make_optimizer(model, TrainConfig())
    x, y, mask = task_batch()
    model(x, y, mask)[1].backward()
    opt.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    nbytes = sum(t.numel() * t.element_size() for t in state)
    assert nbytes == 2 * 4 * sum(p.numel() for p in trainable) + 4 * len(trainable)


def test_finetuning_leaves_every_frozen_weight_unchanged():
    model = tiny_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, r=4)
    splits = get_task("upper").splits(n_train=32, n_val=8, n_test=8)
    finetune(model, splits, TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, eval_every=0,
                                        weight_decay=0.1, progress=False), batch_size=8,
             device="cpu")
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == len(before)
    for n, p in frozen:
        assert torch.equal(p, before[n.replace(".base.", ".")])


# --- lesson 03 ---------------------------------------------------------------------------------

def two_adapter_model():
    model = tiny_gpt()
    add_adapter(model, "upper", r=4, alpha=8)
    add_adapter(model, "swap", r=4, alpha=8)
    randomize_B(model)
    return model


def test_one_named_adapter_saves_and_reloads_bit_identically(tmp_path):
    model = two_adapter_model()
    save_adapter(model, tmp_path, "upper")
    tensors, _ = load_file(tmp_path / WEIGHTS_NAME)
    assert len(tensors) == len(lora_state_dict(model, "upper"))  # the "swap" one stays behind
    fresh = load_adapter(tiny_gpt(), tmp_path, adapter_name="upper")
    set_active_adapters(model, "upper")
    x = task_batch()[0]
    assert torch.equal(fresh(x)[0], model(x)[0])


def test_cat_one_one_gives_the_stacked_logits():
    model = two_adapter_model()
    x = task_batch()[0]
    set_active_adapters(model, ["upper", "swap"])
    stacked = model(x)[0]
    combine_adapters(model, {"upper": 1.0, "swap": 1.0}, "cat", method="cat")
    set_active_adapters(model, "cat")
    assert torch.allclose(model(x)[0], stacked, atol=F32_TOL)


def test_adapter_file_is_four_bytes_per_number_plus_a_small_header(tmp_path):
    model = apply_lora(GPT(GPTConfig()), r=8)
    save_adapter(model, tmp_path / "adapter")
    save_merged_model(model, tmp_path / "merged.safetensors")
    trainable, _ = count_parameters(model)
    header = (tmp_path / "adapter" / WEIGHTS_NAME).stat().st_size - 4 * trainable
    assert 0 < header < 8 * 1024  # 16 tensor entries of JSON: a few KB at most
    assert (tmp_path / "merged.safetensors").stat().st_size >= 4 * GPT(GPTConfig()).num_params()


def train_one_adapter(model, name, task, steps=6, r=4):
    """What lesson 03 does per task: add an adapter, make it active and the only trainable
    thing, fine-tune."""
    add_adapter(model, name, r=r, alpha=2 * r)
    set_active_adapters(model, name)
    train_only_adapter(model, name)
    splits = get_task(task).splits(n_train=32, n_val=8, n_test=8)
    finetune(model, splits, TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=2, eval_every=3,
                                        progress=False), batch_size=8, device="cpu")


def test_training_one_adapter_leaves_the_base_and_the_other_adapter_untouched():
    model = tiny_gpt()
    train_one_adapter(model, "upper", "upper")
    before = copy.deepcopy(model.state_dict())
    train_one_adapter(model, "swap", "swap")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base and "upper" as they were
    new = [k for k in after if k not in before]
    assert new and all(".adapters.swap." in k for k in new)
    assert all(after[k].abs().max() > 0 for k in new if k.endswith("lora_B"))  # swap did train


def test_train_only_adapter_refuses_an_unknown_name():
    model = apply_lora(tiny_gpt())
    with pytest.raises(ValueError, match="unknown adapters"):
        train_only_adapter(model, "nope")
