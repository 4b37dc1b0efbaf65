"""Resuming is exact: the same losses, and the same final weights even when the best weights are
restored at the end; the best weights are restored at all; a checkpoint that does not fit is
refused before anything changes; the loss scaler's state travels with the checkpoint; bad
configs and devices are refused up front."""
import copy
import json

import pytest
import torch

from tiny_gpt import GPT, TrainConfig, VOCAB_SIZE, train
from tiny_gpt.checkpoint import load_checkpoint, save_checkpoint
from tiny_gpt.train import make_optimizer, pick_device


def batches(gen):
    x = torch.randint(VOCAB_SIZE, (4, 17), generator=gen)
    return x[:, :-1], x[:, 1:], None


class Crash(Exception):
    pass


def crashing(after):
    calls = []

    def get(gen):
        calls.append(1)
        if after is not None and len(calls) > after:
            raise Crash()
        return batches(gen)
    return get


def test_resume_after_a_crash_continues_with_identical_losses(small_cfg, tmp_path):
    """A run that crashes after step 5 and is resumed from its last checkpoint (step 4) gives
    the same losses, bit for bit, as a run that never stopped."""
    small_cfg.dropout = 0.1  # dropout makes the global RNG state matter too

    def run(ckpt, resume=False, crash_after=None):
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=8, warmup_steps=2, ckpt_path=str(ckpt), ckpt_every=2,
                          resume=resume, progress=False, log_path=str(tmp_path / "log.jsonl"))
        return train(GPT(small_cfg), crashing(crash_after), cfg, device="cpu").losses

    straight = run(tmp_path / "a.safetensors")
    with pytest.raises(Crash):
        run(tmp_path / "b.safetensors", crash_after=5)
    resumed = run(tmp_path / "b.safetensors", resume=True)
    assert resumed == straight[4:]  # bit-identical, not merely close
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {"step", "loss", "lr", "tokens", "time"} <= set(records[0])


def weight_sum(model):
    return float(model.blocks[0].attn.q_proj.weight.double().sum())


def fit(small_cfg, ckpt, evaluate, resume=False, crash_after=None):
    torch.manual_seed(0)
    model = GPT(small_cfg)
    cfg = TrainConfig(max_steps=8, warmup_steps=2, lr=1e-2, eval_every=2, ckpt_path=str(ckpt),
                      ckpt_every=2, resume=resume, progress=False)
    result = train(model, crashing(crash_after), cfg, evaluate, device="cpu")
    return model, result


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(small_cfg, tmp_path):
    """The best validation is at step 4, the crash after step 5, the last checkpoint at step 4
    -- so the best weights must come back from the file for the resumed run to end right."""
    sums = []
    fit(small_cfg, tmp_path / "probe.safetensors", lambda m: sums.append(weight_sum(m)) or
        {"val_loss": 0.0})
    best_at_step_4 = lambda m: {"val_loss": abs(weight_sum(m) - sums[1])}  # noqa: E731
    straight, res = fit(small_cfg, tmp_path / "a.safetensors", best_at_step_4)
    assert res.best_step == 4 and res.steps == 8  # the best is not the last: restore matters
    with pytest.raises(Crash):
        fit(small_cfg, tmp_path / "b.safetensors", best_at_step_4, crash_after=5)
    resumed, res2 = fit(small_cfg, tmp_path / "b.safetensors", best_at_step_4, resume=True)
    assert (res2.best_step, res2.best_score) == (res.best_step, res.best_score)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name  # bit-identical, not merely close


def test_best_weights_are_restored_at_the_end(small_cfg, tmp_path):
    """restore_best=True ends on the weights of the best validation, not the last step's."""
    torch.manual_seed(0)
    model = GPT(small_cfg)
    kept = {}

    def evaluate(m):
        kept[len(kept)] = copy.deepcopy(m.state_dict())
        return {"val_loss": [5.0, 1.0, 3.0, 4.0][len(kept) - 1]}

    cfg = TrainConfig(max_steps=8, warmup_steps=1, lr=1e-2, eval_every=2, progress=False)
    result = train(model, batches, cfg, evaluate, device="cpu")
    assert result.best_step == 4
    assert all(torch.equal(v, kept[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, kept[3][k]) for k, v in model.state_dict().items())


def test_an_early_stopped_run_does_not_train_on_when_resumed(small_cfg, tmp_path):
    ckpt = tmp_path / "c.safetensors"
    scores = iter([3.0, 2.0, 2.5, 2.6, 9.0, 9.0, 9.0])
    cfg = TrainConfig(max_steps=20, warmup_steps=1, eval_every=1, patience=2, progress=False,
                      ckpt_path=str(ckpt))
    first = train(GPT(small_cfg), batches, cfg, lambda m: {"val_loss": next(scores)}, "cpu")
    again = train(GPT(small_cfg), batches, TrainConfig(**{**cfg.__dict__, "resume": True}),
                  lambda m: {"val_loss": next(scores)}, "cpu")
    assert first.stopped_early and again.stopped_early and again.steps == first.steps == 4
    assert again.losses == []


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(small_cfg, tmp_path):
    ckpt = tmp_path / "other.safetensors"
    other = GPT(type(small_cfg)(**{**small_cfg.__dict__, "n_layer": 1}))
    train(other, batches, TrainConfig(max_steps=1, warmup_steps=1, progress=False,
                                      ckpt_path=str(ckpt)), device="cpu")
    model = GPT(small_cfg)
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer(model, TrainConfig())
    with pytest.raises(ValueError, match="does not match this model"):
        load_checkpoint(ckpt, model, opt, torch.Generator())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_loss_scaler_state_is_saved_and_restored(small_model, tmp_path):
    """torch's GradScaler has a CPU form (torch >= 2.3): its scale and growth tracker must come
    back exactly, or an fp16 resume would scale differently from the uninterrupted run."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler arrived in torch 2.3")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    opt = make_optimizer(small_model, TrainConfig())
    for _ in range(2):  # two finite steps: the growth tracker moves to 2
        x, y, _ = batches(torch.Generator().manual_seed(0))
        scaler.scale(small_model(x, y)[1]).backward()
        scaler.step(opt)
        scaler.update()
    state = {"step": 2, "tokens": 0, "best_score": None, "best_step": None, "bad_evals": 0,
             "stopped_early": False}
    save_checkpoint(tmp_path / "s.safetensors", small_model, opt, torch.Generator(), state,
                    scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "s.safetensors", small_model, opt, torch.Generator(), fresh)
    assert fresh.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="with a loss scaler"):
        load_checkpoint(tmp_path / "s.safetensors", small_model, opt, torch.Generator())


def test_an_unwritable_checkpoint_path_is_refused_before_training(small_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    before = copy.deepcopy(small_model.state_dict())
    cfg = TrainConfig(max_steps=3, warmup_steps=1, progress=False,
                      ckpt_path=str(blocker / "ckpt.safetensors"))
    with pytest.raises(ValueError, match="cannot write"):
        train(small_model, batches, cfg, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in small_model.state_dict().items())


@pytest.mark.parametrize("field, value", [
    ("grad_clip", -1.0), ("grad_accum", 0), ("schedule", "linear"), ("lr", 0.0),
    ("lr", float("inf")), ("max_steps", 0), ("optimizer", "adam"), ("precision", "fp8"),
    ("warmup_steps", -1), ("betas", (0.9, 1.0)), ("patience", 0), ("eval_every", 1.5),
    ("min_lr_ratio", 2.0), ("lr", float("nan")), ("max_steps", True)])
def test_a_bad_train_config_is_refused_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


def test_the_monitored_metric_must_be_returned(small_model):
    cfg = TrainConfig(max_steps=2, warmup_steps=1, eval_every=1, progress=False)
    with pytest.raises(KeyError, match="val_loss"):
        train(small_model, batches, cfg, lambda m: {"acc": 1.0}, device="cpu")


@pytest.mark.parametrize("name, phrase", [("nonsense", "unknown device"),
                                          ("cuda:7" if torch.cuda.is_available() else "cuda",
                                           "GPU" if torch.cuda.is_available() else "no CUDA")])
def test_a_device_this_machine_lacks_is_a_clear_error(name, phrase):
    with pytest.raises(ValueError, match=phrase):
        pick_device(name)
