"""check_qlora_stack passes a sound 4-bit stack and catches broken ones, with a clear message,
leaving the caller's models as they were."""
import copy

import pytest
import torch

from lora import apply_lora, prepare_qlora
from lora.stack_check import check_qlora_stack
from quant import Linear4bit
from tiny_gpt import GPT, GPTConfig, get_task, make_batch


def twins(seed=0):
    torch.manual_seed(seed)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    torch.manual_seed(1)
    qlora = prepare_qlora(copy.deepcopy(base), r=4)
    torch.manual_seed(1)
    float_twin = apply_lora(copy.deepcopy(base), r=4)
    return qlora, float_twin


def batches(n=3):
    train = get_task("upper").splits(n_train=8 * n, n_val=1, n_test=1)["train"]
    return [make_batch(train[8 * i: 8 * (i + 1)]) for i in range(n)]


def first_4bit_layer(model):
    return next(m for m in model.modules() if isinstance(m, Linear4bit))


def test_a_sound_stack_passes_and_the_models_are_left_alone():
    qlora, float_twin = twins()
    before = {k: v.clone() for k, v in qlora.state_dict().items()}
    report = check_qlora_stack(qlora, float_twin, batches())
    assert not report.problems()
    assert len(report.loss_gaps) == 3 and max(report.loss_gaps) < 0.05
    assert min(report.grad_cosine) > 0.9
    assert all(torch.equal(before[k], v) for k, v in qlora.state_dict().items())


def test_wrong_scales_are_caught():
    qlora, float_twin = twins()
    for m in qlora.modules():  # every 4-bit layer's weight 8x too large: scales stored wrong
        if isinstance(m, Linear4bit):
            m.scale_absmax.mul_(8)
            m.scale_offset.mul_(8)
    # a random model's loss hardly moves (every output is near uniform), but the gradients
    # that flow through 8x weights do: the cosine catches it
    with pytest.raises(ValueError, match="not sound on the small subset: .*cosine"):
        check_qlora_stack(qlora, float_twin, batches())


def test_a_nan_in_the_stack_is_caught_as_non_finite():
    qlora, float_twin = twins()
    first_4bit_layer(qlora).scale_offset.fill_(float("nan"))
    with pytest.raises(ValueError, match="step 1: the 4-bit model's loss or adapter gradient "
                                         "is not finite"):
        check_qlora_stack(qlora, float_twin, batches())
    report = check_qlora_stack(qlora, float_twin, batches(), raise_on_failure=False)
    assert report.non_finite and report.problems()


def test_twins_with_different_adapters_are_refused():
    qlora, _ = twins()
    torch.manual_seed(2)
    other = apply_lora(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)), r=4)
    with pytest.raises(ValueError, match="start from other values"):
        check_qlora_stack(qlora, other, batches())
