"""The measures lesson 13 holds data parallelism to (tiny_gpt/parallel/measure.py), the
by-hand training loop (by_hand.train_by_hand), each rank's device (launch.rank_device) and
the 4-bit base made shardable (quant/sharding.fully_shard_4bit).

The tests that need a process group join a group of one rank in this process (gloo): fast,
and enough for what is checked here -- the 2-rank behaviour is tests/test_parallel.py's."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from lora import add_adapter, apply_lora, prepare_qlora
from quant import Linear4bit
from quant.sharding import fully_shard_4bit
from tiny_gpt import TrainConfig, train
from tiny_gpt.parallel import gather_over_ranks, rank_device, train_by_hand
from tiny_gpt.parallel.launch import free_port
from tiny_gpt.parallel.measure import (coordinate_gap, ddp_outcome, own_mean_gradients,
                                       rel_gap, state_bytes, trainable_grads, trainable_values,
                                       wire_bytes)
from tiny_gpt.step import accumulate_gradients
from tiny_gpt.util.torch_compat import fully_shard_function

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")
CPU = torch.device("cpu")


@pytest.fixture
def one_rank():
    """A gloo group of one rank, in this process, left at the end of the test."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def lora_of(base, seed=0):
    """A LoRA copy (r = 4 on Q, V) of the shared small model; equal seeds, equal copies."""
    torch.manual_seed(seed)
    return apply_lora(copy.deepcopy(base), r=4, alpha=8)


def unequal_batch(gen, rows=4, T=12):
    """(x, y, mask) whose answer masks differ in length row by row."""
    x = torch.randint(0, 90, (rows, T), generator=gen)
    y = torch.randint(0, 90, (rows, T), generator=gen)
    lengths = torch.tensor([T] * (rows // 2) + [2] * (rows - rows // 2))
    return x, y, (torch.arange(T)[None, :] < lengths[:, None]).float()


def random_lengths(gen, rows=4, T=12):
    """(x, y, mask) with answers of random length: micro-batches of unequal loss tokens."""
    x, y, _ = unequal_batch(gen, rows, T)
    lengths = torch.randint(1, T + 1, (rows, 1), generator=gen)
    return x, y, (torch.arange(T)[None, :] < lengths).float()


def test_rel_gap_divides_by_the_largest_reference_value_of_all_tensors():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([0.0])}
    b = {"x": torch.tensor([1.0, 4.0]), "y": torch.tensor([0.2])}
    # largest |diff| 2 (in x) over largest |b| 4: per tensor, y alone would give 0.2 / 0.2 = 1
    assert rel_gap(a, b) == pytest.approx(0.5)


def test_coordinate_gap_measures_each_coordinate_against_its_own_size_and_skips_zeros():
    b = {"w": torch.tensor([1e-3, 10.0, 0.0])}
    a = {"w": torch.tensor([1.1e-3, 10.5, 5.0])}
    # 0.1 on the small coordinate, 0.05 on the large, the zero one (|b| <= eps) left out
    assert coordinate_gap(a, b) == pytest.approx(0.1, rel=1e-4)


def test_trainable_values_and_grads_are_copies_of_the_trainable_ones_without_ddps_prefix():
    class Wrapper(nn.Module):  # names its child "module", as DDP does
        def __init__(self, inner):
            super().__init__()
            self.module = inner
    inner = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    inner[0].requires_grad_(False)
    model = Wrapper(inner)
    inner(torch.ones(1, 3)).sum().backward()
    values, grads = trainable_values(model), trainable_grads(model)
    assert sorted(values) == sorted(grads) == ["1.bias", "1.weight"]
    expected = inner[1].weight.grad.clone()
    with torch.no_grad():
        inner[1].weight.add_(1.0)
    inner[1].weight.grad.zero_()
    assert not torch.equal(values["1.weight"], inner[1].weight)  # a copy, not the tensor
    assert torch.equal(grads["1.weight"], expected)


def test_state_bytes_counts_parameters_and_buffers():
    layer = nn.Linear(3, 4)  # 12 + 4 float32 values
    layer.register_buffer("codes", torch.zeros(10, dtype=torch.uint8))
    assert state_bytes(layer) == 4 * 16 + 10


def test_rank_device_takes_a_gpu_per_rank_only_when_there_are_enough(monkeypatch):
    assert rank_device("cpu", 1, 2) == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("cuda", 1, 2) == torch.device("cuda", 1)
    assert rank_device("cpu", 1, 2) == CPU  # asked for the CPU
    assert rank_device("cuda", 1, 3) == CPU  # 3 ranks, 2 GPUs


def test_wire_bytes_equal_their_formulas(one_rank, small_model):
    model = lora_of(small_model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size()
                for t in list(model.parameters()) + list(model.buffers()))
    sent = wire_bytes(model, [unequal_batch(torch.Generator())], CPU)
    assert sent["allreduce"] == sent["allreduce_formula"] == 4 * trainable
    assert sent["wrap"] == sent["wrap_formula"] == state


def test_ddp_outcome_names_the_reduction_error_and_otherwise_the_gradient_gap(one_rank,
                                                                           small_model):
    shares = [unequal_batch(torch.Generator())]
    refused = ddp_outcome(add_adapter(lora_of(small_model), "spare"), shares, CPU)
    assert refused.startswith("error: Expected to have finished reduction")
    reference = lora_of(small_model)
    accumulate_gradients(reference, shares, CPU)
    outcome = ddp_outcome(lora_of(small_model), shares, CPU, trainable_grads(reference))
    assert outcome.startswith("gradient gap") and float(outcome.split()[-1]) <= 1e-6


def test_on_one_rank_the_own_mean_is_the_mean_over_all_micro_batches(one_rank, small_model):
    from tiny_gpt.parallel.measure import wrap_ddp
    shares = [unequal_batch(torch.Generator().manual_seed(i)) for i in range(2)]
    reference = lora_of(small_model)
    accumulate_gradients(reference, shares, CPU)
    grads = own_mean_gradients(wrap_ddp(lora_of(small_model), CPU), shares, CPU)
    assert rel_gap(grads, trainable_grads(reference)) <= 1e-6


def test_train_by_hand_on_one_rank_trains_as_one_process(one_rank, small_model):
    cfg = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, grad_accum=2, eval_every=0,
                      progress=False, grad_clip=0.05, seed=1)
    batches = lambda g: random_lengths(g)  # noqa: E731
    alone = lora_of(small_model)
    train(alone, batches, cfg, device=CPU)
    by_hand = train_by_hand(lora_of(small_model), batches, cfg, 0, 1, CPU)
    before = trainable_values(lora_of(small_model))
    assert rel_gap(by_hand, before) > 1e-3  # it trained
    assert rel_gap(by_hand, trainable_values(alone)) <= 1e-5  # float32 sums in another order


def test_fully_shard_4bit_keeps_the_output_and_holds_the_codes_as_float_parameters(one_rank,
                                                                                   small_model):
    fully_shard = fully_shard_function("cpu")
    if fully_shard is None:
        pytest.skip(f"torch {torch.__version__} has no FSDP2 fully_shard on CPU")
    torch.manual_seed(0)
    model = prepare_qlora(small_model, r=4, alpha=8)
    x = torch.randint(0, 90, (2, 12))
    before = model(x)[0].detach()
    n_4bit = sum(isinstance(m, Linear4bit) for m in model.modules())
    fully_shard_4bit(model, fully_shard)
    codes = [p for n, p in model.named_parameters() if n.endswith("codes")]
    assert n_4bit > 0 and len(codes) == n_4bit
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in codes)
    assert torch.equal(model(x)[0].detach(), before)


@pytest.fixture
def torchrun_env(monkeypatch):
    """The variables torchrun sets, for a group of one process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)


def test_gather_over_ranks_hands_back_every_ranks_result_and_leaves_the_group(torchrun_env):
    assert gather_over_ranks(lambda rank: {"rank": rank, "x": 41 + 1}, 1) == (
        0, [{"rank": 0, "x": 42}])
    assert not dist.is_initialized()


def test_gather_over_ranks_refuses_another_world_size_before_running(torchrun_env):
    ran = []
    with pytest.raises(SystemExit, match="runs on 2 processes .* got 1"):
        gather_over_ranks(ran.append, 2)
    assert ran == [] and not dist.is_initialized()
