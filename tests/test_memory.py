"""The memory ledger against sizes counted by hand, and CPU offload against plain training."""
import copy

import pytest
import torch
import torch.nn as nn

from lora import apply_lora, count_parameters
from quant import quantize_model
from tiny_gpt import GPT, GPTConfig, VOCAB_SIZE
from tiny_gpt.memory.ledger import SavedTensorMeter, measure_step, weight_ledger
from tiny_gpt.memory.offload import FrozenBaseOffload
from tiny_gpt.memory.step_time import time_step
from tiny_gpt.util.timing import round_robin_phase_medians

F32 = 4  # bytes per float32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def sum_loss(model, x, y, mask, total):
    return model(x).sum()  # a sum saves nothing for backward: only the chain's tensors count


def test_saved_activations_of_linear_relu_linear_by_hand():
    model, x = chain(), torch.randn(6, 4)
    with SavedTensorMeter(model) as meter:
        model(x).sum()
    # Linear 1 saves its input x (6, 4) for dL/dW1 (and W1, a weight: not counted);
    # ReLU saves its output r (6, 5); Linear 2 saves r again (same storage: counted once).
    assert meter.bytes == (6 * 4 + 6 * 5) * F32


def test_autocast_saves_bfloat16_copies_and_counts_them_by_dtype():
    model, x = chain(), torch.randn(6, 4)
    with SavedTensorMeter(model) as meter, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum()
    # autocast casts each Linear's input and weight to bf16, and the casts are what is saved:
    # Linear 1 keeps x (6, 4) for dL/dW1 (not W1: x needs no gradient); ReLU its bf16 output
    # r (6, 5), which Linear 2 shares; Linear 2 keeps the bf16 copy of W2 (3, 5) for dL/dr
    bf16 = 2 * (6 * 4 + 6 * 5 + 3 * 5)
    assert meter.by_dtype() == {"bfloat16": bf16} and meter.bytes == bf16


def test_a_frozen_layer_saves_no_input():
    model, x = chain(), torch.randn(6, 4)
    model[0].requires_grad_(False)  # dL/dW1 not needed, and x needs no grad: nothing to save
    with SavedTensorMeter(model) as meter:
        model(x).sum()
    assert meter.bytes == 6 * 5 * F32


def test_full_step_ledger_by_hand():
    model = chain()
    n_params = 4 * 5 + 5 + 5 * 3 + 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = [(torch.randn(6, 4), None, None)]
    ledger = measure_step(model, batch, opt, loss_fn=sum_loss)
    assert ledger.trainable == n_params * F32 and ledger.frozen == 0
    assert ledger.by_dtype == {"float32": n_params * F32}
    assert ledger.grads == n_params * F32
    # AdamW: exp_avg and exp_avg_sq like each parameter, plus one float32 step per tensor
    assert ledger.optimizer == 2 * n_params * F32 + 4 * F32
    assert ledger.activations == (6 * 4 + 6 * 5) * F32
    assert ledger.activations_by_dtype == {"float32": ledger.activations}
    assert ledger.total == ledger.weights + ledger.grads + ledger.optimizer + ledger.activations


def test_sgd_with_momentum_keeps_one_buffer_per_parameter():
    model = chain()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ledger = measure_step(model, [(torch.randn(6, 4), None, None)], opt, loss_fn=sum_loss)
    assert ledger.optimizer == ledger.trainable


def test_micro_batches_report_the_peak_not_the_sum():
    model = chain()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    batches = [(torch.randn(6, 4), None, None), (torch.randn(2, 4), None, None)]
    ledger = measure_step(model, batches, opt, loss_fn=sum_loss)
    assert ledger.activations == (6 * 4 + 6 * 5) * F32


@pytest.fixture
def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16))


def batch(B=3, T=12):
    torch.manual_seed(1)
    return [(torch.randint(VOCAB_SIZE, (B, T)), torch.randint(VOCAB_SIZE, (B, T)), None)]


def test_lora_ledger_matches_the_parameter_count(small_gpt):
    apply_lora(small_gpt, r=2, alpha=4)
    trainable, total = count_parameters(small_gpt)
    opt = torch.optim.AdamW([p for p in small_gpt.parameters() if p.requires_grad])
    ledger = measure_step(small_gpt, batch(), opt)
    n_tensors = sum(1 for p in small_gpt.parameters() if p.requires_grad)
    assert ledger.trainable == ledger.grads == trainable * F32
    assert ledger.frozen == (total - trainable) * F32
    assert ledger.optimizer == 2 * trainable * F32 + n_tensors * F32


def test_a_4bit_base_counts_its_uint8_and_float_buffers_as_frozen_weights(small_gpt):
    quantize_model(small_gpt)
    ledger = weight_ledger(small_gpt)
    buffers = sum(b.numel() * b.element_size() for b in small_gpt.buffers())
    params = sum(p.numel() * F32 for p in small_gpt.parameters())
    # the buffers (packed uint8 codes, float scales and code book) are frozen by nature
    assert ledger.frozen == buffers and ledger.trainable == params
    assert ledger.by_dtype["uint8"] == sum(b.numel() for b in small_gpt.buffers()
                                           if b.dtype == torch.uint8)


def test_tied_weight_is_counted_once(small_gpt):
    n = sum(p.numel() for p in small_gpt.parameters())
    assert weight_ledger(small_gpt).trainable == n * F32


def test_offloaded_step_gives_the_same_grads_and_frees_saved_weights(small_gpt):
    """On CPU the "device" copy is a second CPU tensor: the mechanism runs, nothing is saved."""
    apply_lora(small_gpt, r=2, alpha=4)
    twin = copy.deepcopy(small_gpt)
    (x, y, _), = batch()
    with SavedTensorMeter(small_gpt) as plain:
        loss = small_gpt(x, y)[1]
    loss.backward()
    with FrozenBaseOffload(twin, "cpu") as offload:
        with SavedTensorMeter(twin, then=(offload.pack, offload.unpack)) as meter:
            loss = twin(x, y)[1]
        loss.backward()
        q = twin.blocks[0].attn.q_proj.base.weight
        assert q.untyped_storage().data_ptr() == offload.home[q].untyped_storage().data_ptr()
    assert offload.offloaded_saves > 0  # the frozen weights saved for backward were swapped out
    for (name, p), (_, p0) in zip(twin.named_parameters(), small_gpt.named_parameters()):
        torch.testing.assert_close(p.data, p0.data, rtol=0, atol=0)  # weights back in place
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p0.grad, rtol=0, atol=0)  # same ops, same bits
    # the weight copies it moved were never held as activations: the same count as without
    assert meter.bytes == plain.bytes > 0


def test_time_step_splits_the_step_into_phases(small_gpt):
    opt = torch.optim.SGD(small_gpt.parameters(), lr=1e-3)
    t = time_step(small_gpt, batch(), opt)
    assert set(t) == {"forward", "backward", "optimizer", "total"}
    assert all(v > 0 for v in t.values())
    assert t["total"] == pytest.approx(t["forward"] + t["backward"] + t["optimizer"])


def test_round_robin_phase_medians_takes_the_median_of_each_phase():
    values = iter([{"total": v} for v in [9.0, 1.0, 5.0, 3.0, 7.0]])
    assert round_robin_phase_medians({"a": lambda: next(values)}, repeats=3, warmup=2) == {
        "a": {"total": 5.0}}  # the two warm-up calls (9, 1) are dropped; median of 5, 3, 7
