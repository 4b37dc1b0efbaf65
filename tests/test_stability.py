"""The mechanisms of lessons 08_mixed_precision (the dynamic loss scaler, fp16 gradient storage
in tiny_gpt/memory/loss_scaling.py, fp32 master weights) and 09_stability_and_evaluation (same
seed => same run)."""
import pytest
import torch

from lora import apply_lora
from tiny_gpt import GPT, TrainConfig, make_batch, sample_batch, train
from tiny_gpt.memory.loss_scaling import DynamicLossScaler, Fp16Backward, scaled_fp16_grads


def _sgd_param(value=1.0):
    p = torch.nn.Parameter(torch.full((3,), value))
    return p, torch.optim.SGD([p], lr=0.1)


def _scaled_step(scaler, p, opt, g):
    """One step whose loss is sum(g * p): its gradient is g (g = inf makes it overflow)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale((p * g).sum()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


def test_an_overflowing_scale_is_halved_and_the_step_skipped():
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=100)
    p, opt = _sgd_param()
    _scaled_step(scaler, p, opt, float("inf"))
    assert scaler.get_scale() == 2.0 ** 9
    assert torch.equal(p.detach(), torch.ones(3))  # the step was skipped
    _scaled_step(scaler, p, opt, 1.0)
    assert scaler.get_scale() == 2.0 ** 9
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))  # a finite step is taken


def test_the_scale_grows_after_n_good_steps_and_an_overflow_resets_the_count():
    scaler = DynamicLossScaler(init_scale=4.0, growth_interval=3)
    p, opt = _sgd_param()
    scales = []
    for g in (1.0, 1.0, 1.0, 1.0, float("inf"), 1.0, 1.0, 1.0):
        _scaled_step(scaler, p, opt, g)
        scales.append(scaler.get_scale())
    assert scales == [4.0, 4.0, 8.0, 8.0, 4.0, 4.0, 4.0, 8.0]


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') "
                    "is torch >= 2.3")
def test_the_scaler_follows_torch_grad_scaler():
    """The same stream of finite and overflowing steps gives the same scales and weights as
    torch.amp.GradScaler (its CPU version)."""
    ours = DynamicLossScaler(init_scale=2.0 ** 6, growth_interval=2)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=2)
    (p1, opt1), (p2, opt2) = _sgd_param(), _sgd_param()
    for g in (1.0, float("inf"), 2.0, 1.0, 1.0, float("nan"), 1.0, 3.0):
        _scaled_step(ours, p1, opt1, g)
        _scaled_step(ref, p2, opt2, g)
        assert ours.get_scale() == ref.get_scale()
        torch.testing.assert_close(p1.detach(), p2.detach(), rtol=0, atol=0)


def test_a_second_unscale_before_update_is_refused_and_divides_nothing():
    """unscale_ twice in one step would divide the gradients by S twice (torch's GradScaler
    refuses it too); after update() the next step may unscale again."""
    scaler = DynamicLossScaler(init_scale=4.0)
    p, opt = _sgd_param()
    scaler.scale((p * 2.0).sum()).backward()
    scaler.unscale_(opt)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.unscale_(opt)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    scaler.step(opt)  # uses the one unscaling, does not unscale again
    assert torch.equal(p.detach(), torch.full((3,), 1.0 - 0.1 * 2.0))
    scaler.update()
    opt.zero_grad()
    scaler.scale((p * 2.0).sum()).backward()
    scaler.unscale_(opt)
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def _lora_model(small_cfg, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = GPT(small_cfg)
    torch.manual_seed(seed + 1)
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():  # nonzero B, so that every adapter factor gets a gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.1)
    return model


def _batch():
    return make_batch([("upper cat -> ", "CAT\n"), ("upper dog ant -> ", "DOG ANT\n")])


def test_unscaled_gradients_equal_the_fp32_gradients(small_cfg):
    """Scaling by a power of two is exact in floating point, so without fp16 storage the
    unscaled gradients are bit-identical to the unscaled run's. With fp16 storage every linear
    layer's output gradient is rounded to 11 significant bits (~5e-4 relative) on the way back;
    a dozen such roundings compound, and single entries that are sums of cancelling terms can be
    off by far more, so the comparison is of the whole gradient vector's norm."""
    model = _lora_model(small_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y, m = _batch()
    model(x, y, m)[1].backward()
    ref = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    scaler = DynamicLossScaler(init_scale=2.0 ** 12)
    scaler.scale(model(x, y, m)[1]).backward()
    opt = torch.optim.SGD(params, lr=0.0)
    scaler.unscale_(opt)
    assert not scaler.found_inf
    for p, g in zip(params, ref):
        assert torch.equal(p.grad, g)
    unscaled, _, _ = scaled_fp16_grads(model, (x, y, m), 2.0 ** 12)
    flat = torch.cat([g.flatten() for g in ref])
    assert ((unscaled - flat).norm() / flat.norm()).item() < 5e-3


def test_fp16_storage_flushes_tiny_gradients_and_overflows_huge_ones():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    for factor, expect_zero, expect_inf in ((1e-9, True, False), (1e6, False, True)):
        with Fp16Backward(layer) as sim:
            (layer(x).sum() * factor).backward()  # output grad = factor, below 6e-8 / above 65504
        assert (sim.flushed == sim.nonzero) is expect_zero
        assert (sim.overflowed > 0) is expect_inf
        layer.zero_grad()


def test_a_small_adamw_step_is_lost_in_bf16_but_not_in_fp32():
    """A 1e-4 relative step is below half of bf16's spacing (2^-8 relative): rounding undoes
    it. In fp32 (spacing 2^-23 relative) the weight moves."""
    w0 = torch.tensor([0.5, -0.75, 1.0, -1.5])
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = torch.optim.AdamW([p], lr=1e-4 * 0.5, weight_decay=0.0)
        for _ in range(10):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[dtype] = (p.detach().float() - w0).abs()
    assert torch.all(moved[torch.bfloat16] == 0)
    assert torch.all(moved[torch.float32] > 0)


def _run(small_cfg, seed, dropout=0.1):
    model = _lora_model(small_cfg, seed=seed, dropout=dropout)
    examples = [("upper cat -> ", "CAT\n"), ("upper dog ant -> ", "DOG ANT\n"),
                ("upper eel -> ", "EEL\n")]
    cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, seed=seed, eval_every=0,
                      progress=False)
    res = train(model, lambda g: sample_batch(examples, 4, g), cfg, device="cpu")
    return res.losses, [p.detach() for p in model.parameters() if p.requires_grad]


def test_same_seed_gives_identical_losses_and_another_seed_does_not(small_cfg):
    losses_a, weights_a = _run(small_cfg, seed=0)
    losses_b, weights_b = _run(small_cfg, seed=0)
    losses_c, _ = _run(small_cfg, seed=1)
    assert losses_a == losses_b  # bit-identical floats, dropout masks included
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert losses_a != losses_c


def test_fp16_storage_rounds_every_output_gradient_to_a_float16_value():
    """Not just counted: the gradient that flows on IS the float16 one. With x = 1 (one row),
    the bias and weight gradients are the output gradient itself, so they must equal g rounded
    to float16 -- exactly -- for a g whose float32 values float16 cannot hold (1 + 2^-13 needs 13
    significant bits, float16 keeps 11) and one below float16's smallest subnormal."""
    layer = torch.nn.Linear(2, 3)
    g = torch.tensor([[1 + 2 ** -13, -3.0000002, 1e-9]])
    assert not torch.equal(g.half().float(), g)
    with Fp16Backward(layer) as sim:
        (layer(torch.ones(1, 2)) * g).sum().backward()
    assert torch.equal(layer.bias.grad, g.half().float()[0])
    assert torch.equal(layer.weight.grad, g.half().float().t().expand(3, 2))
    assert (sim.nonzero, sim.flushed) == (3, 1)
