import copy

import pytest
import torch

from tiny_gpt import GPT, TrainConfig, VOCAB_SIZE, make_batch, train
from tiny_gpt.util.safetensors import SafetensorsError
from tiny_gpt.train import make_optimizer
from tiny_gpt.step import accumulate_gradients, lr_at


def _examples(lengths, seed=0):
    """Prompt/answer pairs whose answers have the given lengths (unequal loss masks)."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghij"
    out = []
    for n in lengths:
        word = "".join(letters[i] for i in torch.randint(10, (n,), generator=g).tolist())
        out.append((f"upper {word} -> ", word.upper() + "\n"))
    return out


def test_accumulation_with_unequal_masks_equals_the_big_batch(small_cfg):
    """k micro-batches with different numbers of answer tokens give exactly the gradient of
    one batch that holds them all (the normalization is by the total token count)."""
    torch.manual_seed(0)
    model = GPT(small_cfg).double()
    examples = _examples([1, 2, 7, 3, 8, 5])
    big = [make_batch(examples)]
    micro = [make_batch(examples[:1]), make_batch(examples[1:3]), make_batch(examples[3:])]
    grads = []
    for batches in (big, micro):
        model.zero_grad()
        loss, n = accumulate_gradients(model, batches, torch.device("cpu"))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert n == sum(len(a) for _, a in examples)
    for k in grads[0]:
        # float64: same sums in a different order, agreement to ~1e-15 relative
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-12, msg=k)
    # and the naive per-micro-batch mean is measurably different (the pitfall is real)
    model.zero_grad()
    for x, y, m in micro:
        (model(x, y, m)[1] / len(micro)).backward()
    naive = model.blocks[0].attn.q_proj.weight.grad
    assert not torch.allclose(naive, grads[0]["blocks.0.attn.q_proj.weight"], rtol=1e-3)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(max_steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


def _batches(gen):
    x = torch.randint(VOCAB_SIZE, (4, 17), generator=gen)
    return x[:, :-1], x[:, 1:], None


def test_frozen_parameters_get_no_optimizer_state(small_model):
    for name, p in small_model.named_parameters():
        p.requires_grad = name.startswith("blocks.0.attn.q_proj")
    before = {n: p.clone() for n, p in small_model.named_parameters()}
    train(small_model, _batches, TrainConfig(max_steps=3, warmup_steps=1, progress=False),
          device="cpu")
    for n, p in small_model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n
    optimizer = make_optimizer(small_model, TrainConfig())
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in small_model.parameters() if p.requires_grad}


def test_truncated_checkpoint_is_a_clear_error(small_model, tmp_path):
    ckpt = tmp_path / "c.safetensors"
    train(small_model, _batches, TrainConfig(max_steps=1, warmup_steps=1, progress=False,
                                             ckpt_path=str(ckpt)), device="cpu")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    cfg = TrainConfig(max_steps=2, ckpt_path=str(ckpt), resume=True, progress=False)
    with pytest.raises(SafetensorsError, match="truncated"):
        train(small_model, _batches, cfg, device="cpu")


def test_early_stopping_and_best_weights(small_model):
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    cfg = TrainConfig(max_steps=50, warmup_steps=1, eval_every=1, patience=2, progress=False)
    result = train(small_model, _batches, cfg, lambda m: {"val_loss": next(scores)},
                   device="cpu")
    assert result.stopped_early and result.steps == 4
    assert result.best_step == 2 and result.best_score == 2.0


def test_fp16_on_cpu_is_refused_with_a_hint(small_model):
    cfg = TrainConfig(max_steps=1, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="bf16"):
        train(small_model, _batches, cfg, device="cpu")


def _one_batch(gen):
    """The same batch every step (the generator is ignored): a run that learns fits it."""
    x = torch.randint(VOCAB_SIZE, (4, 17), generator=torch.Generator().manual_seed(5))
    return x[:, :-1], x[:, 1:], None


def test_bf16_autocast_trains_on_cpu_as_fp32_does(small_model):
    """Under bf16 autocast the first loss is fp32's to bf16 rounding -- 8 significant bits,
    ~0.4% a value, a few roundings deep through two blocks: 2% -- but not bit for bit (autocast
    is really on); and it learns as fp32 does: 8 steps on one batch take both losses below 70%
    of the start, to within 5% of each other (measured 1.5%: the roundings add up step by
    step)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(max_steps=8, lr=3e-2, warmup_steps=1, precision=precision,
                          progress=False)
        losses[precision] = train(copy.deepcopy(small_model), _one_batch, cfg,
                                  device="cpu").losses
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=2e-2)
    assert fp32[-1] < 0.7 * fp32[0] and bf16[-1] == pytest.approx(fp32[-1], rel=5e-2)


def test_a_step_whose_loss_masks_hold_no_token_is_refused_before_any_change(small_model):
    """S / N with N = 0 would be nan, and nan weights after the step: refused, weights kept."""
    def empty(gen):
        x, y, _ = _batches(gen)
        return x, y, torch.zeros_like(y, dtype=torch.float)
    before = copy.deepcopy(small_model.state_dict())
    with pytest.raises(ValueError, match="hold no loss token .* at least one token with mask 1"):
        train(small_model, empty, TrainConfig(max_steps=2, grad_accum=2, progress=False),
              device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in small_model.state_dict().items())
    assert all(p.grad is None for p in small_model.parameters())


def test_loraplus_finds_B_by_its_attribute_not_by_a_substring_of_the_path(small_model):
    """An adapter named "lora_Bx" has parameters ...adapters.lora_Bx.lora_A: its A stays at lr."""
    from lora import add_adapter
    from tiny_gpt.train import param_groups
    model = add_adapter(small_model, "lora_Bx", r=2, alpha=4)
    groups = param_groups(model, TrainConfig(loraplus_lr_ratio=16))
    names = {id(p): n for n, p in model.named_parameters()}
    by_scale = {g["lr_scale"]: sorted({names[id(p)].rsplit(".", 1)[-1] for p in g["params"]})
                for g in groups}
    assert by_scale == {1.0: ["lora_A"], 16.0: ["lora_B"]}


def test_loraplus_puts_lora_B_in_its_own_group_at_ratio_times_the_lr(small_model):
    """LoRA+: lora_B trains at loraplus_lr_ratio x lr, lora_A (and anything else) at lr, through
    the schedule; a ratio with no lora_B to apply to is refused."""
    from lora import apply_lora
    from tiny_gpt.train import param_groups, set_lr
    with pytest.raises(ValueError, match="no trainable parameter is a lora_B"):
        param_groups(small_model, TrainConfig(loraplus_lr_ratio=16))
    model = apply_lora(small_model, r=2, alpha=4)
    optimizer = make_optimizer(model, TrainConfig(loraplus_lr_ratio=16))
    set_lr(optimizer, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]}
             for g in optimizer.param_groups}
    assert by_lr == {0.01: {"lora_A"}, 0.16: {"lora_B"}}
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        TrainConfig(loraplus_lr_ratio=0)


def test_compiled_training_steps_match_eager(small_model):
    """TrainConfig(compile=True): the steps run through torch.compile and train the model's own
    parameters to what eager steps give (float32; the kernels differ, not the math)."""
    from tiny_gpt.data import get_batch
    ids = torch.randint(0, 90, (4096,), generator=torch.Generator().manual_seed(0))
    eager, compiled = small_model, copy.deepcopy(small_model)
    runs = {}
    for name, model, flag in (("eager", eager, False), ("compiled", compiled, True)):
        cfg = TrainConfig(max_steps=3, lr=1e-3, warmup_steps=0, eval_every=0, progress=False,
                          compile=flag)
        runs[name] = train(model, lambda g: (*get_batch(ids, 4, 16, g), None), cfg, device="cpu")
    assert runs["compiled"].losses == pytest.approx(runs["eager"].losses, rel=1e-4)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    with pytest.raises(ValueError, match="TrainConfig.compile must be True or False"):
        TrainConfig(compile="yes")


def test_compile_of_a_4bit_model_is_refused_where_torch_cannot_compile_it(small_model,
                                                                         monkeypatch):
    """Under torch < 2.4 compiling a 4-bit base fails inside torch (seen on 2.1.2): train()
    says so before it changes anything; a float model still compiles there."""
    import importlib
    from quant import quantize_model
    train_module = importlib.import_module("tiny_gpt.train")  # tiny_gpt.train: the function
    monkeypatch.setattr(train_module, "dynamo_traces_function_backward", lambda: False)
    four_bit = quantize_model(copy.deepcopy(small_model), targets=("q_proj",))
    before = {k: v.clone() for k, v in four_bit.state_dict().items()}
    cfg = TrainConfig(max_steps=1, eval_every=0, progress=False, compile=True)
    with pytest.raises(ValueError, match=r"cannot compile a model with a compressed \(4-bit\) "
                                         r"weight, such as 'blocks.0.attn.q_proj'"):
        train(four_bit, _batches, cfg, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in four_bit.state_dict().items())
    train_module.check_compilable(small_model)  # float weights only: allowed


def test_three_steps_of_train_are_three_textbook_sgd_steps_on_the_big_batch(small_model):
    """train() with SGD (momentum 0.9), a constant lr, no clipping and 2 micro-batches a step
    ends with the weights of three plain steps of torch's SGD, each on the loss of one batch
    holding both micro-batches, gradients fresh every step. Float32, the same sums in another
    order: 1e-5 of the weights' scale. A loop that forgot to zero the gradients, normalised
    per micro-batch, or stepped the lr would land elsewhere."""
    cfg = TrainConfig(max_steps=3, lr=0.1, warmup_steps=0, schedule="constant",
                      optimizer="sgd", grad_clip=0, grad_accum=2, progress=False)
    reference = copy.deepcopy(small_model)
    train(small_model, _batches, cfg, device="cpu")
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(3):
        x1, y1, _ = _batches(gen)
        x2, y2, _ = _batches(gen)
        optimizer.zero_grad()
        reference(torch.cat([x1, x2]), torch.cat([y1, y2]))[1].backward()
        optimizer.step()
    for (name, p), q in zip(small_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("grad_clip, factor", [(1.0, 0.1), (20.0, 1.0), (0, 1.0)])
def test_a_step_clips_the_global_gradient_norm_to_grad_clip(grad_clip, factor):
    """Two parameters whose gradients have a global norm of 10 (6 and 8): clipped to 1 they
    are scaled by 1/10; a limit above the norm, or 0 (off), leaves them as they are. Plain SGD
    with lr 1 makes the step the (clipped) gradient itself; the gradients are cleared after."""
    from tiny_gpt.step import optimizer_step
    model = torch.nn.Linear(1, 1)
    grads = [torch.tensor([[6.0]]), torch.tensor([8.0])]
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), None, grad_clip)
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(b - p.detach(), g * factor)
        assert p.grad is None
