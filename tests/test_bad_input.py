"""Bad input across the public API: a clear error that says what was wrong and what is allowed,
raised before anything changes -- the model, the files on disk, the global state. Operations
over many layers complete or leave every layer as it was. (Training configs, devices and
checkpoints: tests/test_train_resume.py; safetensors files: tests/test_safetensors.py.)"""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, add_adapter, apply_lora, combine_adapters, delete_adapter,
                  load_adapter, load_model_weights, merge_lora, save_adapter, save_merged_model,
                  unmerge_lora)
from lora.inject import adapter_names
from lora.io import CONFIG_NAME, WEIGHTS_NAME
from quant import Linear4bit, dequantize_nf4, quantize_model, quantize_nf4
from tiny_gpt import GPTConfig, TrainConfig, VOCAB_SIZE, decode, load_text, train
from tiny_gpt.util.safetensors import load_file, save_file
from conftest import small_gpt


def same_state(a: dict, b: dict):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model):
    return copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(alpha=float("inf")), "alpha must be > 0 and finite"),
    (dict(alpha=float("nan")), "alpha must be > 0 and finite"),
    (dict(alpha="16"), "alpha must be > 0 and finite"),
    (dict(alpha=True), "alpha must be > 0 and finite"),
    (dict(dropout="0.1"), "dropout must be in \\[0, 1\\)"),
    (dict(targets=None), "targets must be a module name or a list"),
    (dict(targets=("q_proj", 3)), "every target must be a non-empty module name"),
    (dict(targets=()), "targets is empty"),
    (dict(r=2.0), "r must be an integer")])
def test_apply_lora_refuses_bad_arguments_and_leaves_the_model_alone(kwargs, phrase):
    model = small_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match=phrase):
        apply_lora(model, **kwargs)
    assert same_state(model.state_dict(), before)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def lora_model():
    model = apply_lora(small_gpt(), r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    return model


def test_a_config_with_infinite_alpha_is_refused(tmp_path):
    save_adapter(lora_model(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": float("inf")}))
    assert "Infinity" in (tmp_path / CONFIG_NAME).read_text()
    model = small_gpt()
    with pytest.raises(ValueError, match="finite lora_alpha"):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_tensors_holding_nan_or_inf_are_refused(tmp_path, bad):
    save_adapter(lora_model(), tmp_path)
    tensors, meta = load_file(tmp_path / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = bad
    save_file(tensors, tmp_path / WEIGHTS_NAME, meta)
    model = small_gpt()
    with pytest.raises(ValueError, match=f"tensors \\['{key}'\\] hold nan or inf"):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_merged_weights_holding_nan_are_refused(tmp_path):
    save_merged_model(lora_model(), tmp_path / "m.safetensors")
    tensors, meta = load_file(tmp_path / "m.safetensors")
    tensors[sorted(tensors)[0]] *= float("nan")
    save_file(tensors, tmp_path / "m.safetensors", meta)
    model = small_gpt(seed=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="hold nan or inf"):
        load_model_weights(model, tmp_path / "m.safetensors")
    assert same_state(model.state_dict(), before)


def test_save_adapter_that_fails_midway_leaves_both_old_files(tmp_path, monkeypatch):
    """The weights and the config are written to temporary names first and renamed together:
    a failure while writing the second leaves the old pair, and no stray file."""
    model = lora_model()
    save_adapter(model, tmp_path)
    old = {n: (tmp_path / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)}
    with torch.no_grad():
        model.blocks[0].attn.q_proj.lora_B.add_(1.0)
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        save_adapter(model, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(old)


def test_merge_lora_with_one_layer_that_cannot_merge_merges_none():
    """A 4-bit base has no float weight to merge into: checked for every layer first."""
    model = small_gpt()
    quantize_model(model, targets=("blocks.1.attn.v_proj",))
    apply_lora(model, r=2, alpha=4)
    before = snapshot(model)
    with pytest.raises(TypeError, match="no float .weight"):
        merge_lora(model)
    assert same_state(model.state_dict(), before)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))


def test_unmerge_lora_with_one_unmerged_layer_unmerges_none():
    model = merge_lora(lora_model())
    model.blocks[1].attn.v_proj.unmerge()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="blocks.1.attn.v_proj: not merged"):
        unmerge_lora(model)
    assert same_state(model.state_dict(), before)


def test_quantize_model_with_nan_in_a_late_layer_swaps_no_layer():
    model = small_gpt()
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_a_linear4bit_fed_the_wrong_width_says_so():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="in_features = 64, got shape \\(3, 48\\)"):
        layer(torch.randn(3, 48))


@pytest.mark.parametrize("ids", [[-1], [200], [5, 96]])
def test_decode_refuses_ids_outside_the_vocabulary(ids):
    with pytest.raises(ValueError, match="outside the vocabulary 0..95"):
        decode(ids)


def test_load_text_names_the_file_for_each_problem(tmp_path):
    with pytest.raises(ValueError, match="no such text file: .*missing.txt"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text: byte 0xe9 at byte "
                                         "offset 3"):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "accent.txt").write_text("café", encoding="utf-8")
    with pytest.raises(ValueError, match="accent.txt: character 'é'"):
        load_text(tmp_path / "accent.txt")


@pytest.mark.parametrize("field, value", [("n_head", 0), ("n_layer", -1), ("n_embd", 2.5),
                                          ("dropout", 1.0), ("block_size", True)])
def test_a_bad_gpt_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be"):
        GPTConfig(**{field: value})


@pytest.mark.parametrize("bad", [96, -1])
def test_a_token_id_outside_the_vocabulary_is_a_clear_error(bad):
    x = torch.zeros(1, 4, dtype=torch.long)
    x[0, 2] = bad
    with pytest.raises(ValueError, match="token ids must lie in 0..95"):
        small_gpt()(x)


def test_float_token_ids_are_refused():
    with pytest.raises(TypeError, match="integer tensor"):
        small_gpt()(torch.zeros(1, 4))


# --- the last bad inputs: each refused with what is wrong and what is allowed, nothing changed


def two_adapters():
    model = add_adapter(lora_model(), "second", r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("second.lora_B"):
                p.normal_()
    return model


def test_merge_after_deleting_the_active_adapter_says_nothing_is_active():
    model = delete_adapter(two_adapters(), "default")
    before = snapshot(model)
    with pytest.raises(ValueError, match="no active adapter to merge; the model has \\['second'\\]"
                                         ": choose the ones to merge with set_active_adapters"):
        merge_lora(model)
    assert same_state(model.state_dict(), before)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("method", ["cat", "linear"])
@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1", None])
def test_combine_with_a_weight_that_is_not_a_finite_number_is_refused(method, weight):
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match="every weight must be a finite number; got "
                                         "\\{'default': "):
        combine_adapters(model, {"default": weight, "second": 1.0}, "both", method=method)
    assert same_state(model.state_dict(), before) and "both" not in adapter_names(model)


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_combine_linear_with_a_rank_below_1_is_refused_not_replaced(r):
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match="r must be None \\(the largest r of the adapters "
                                         "combined\\) or a whole number >= 1, got"):
        combine_adapters(model, {"default": 0.5, "second": 0.5}, "both", method="linear", r=r)
    assert same_state(model.state_dict(), before) and "both" not in adapter_names(model)


@pytest.mark.parametrize("in_the_way", [CONFIG_NAME, WEIGHTS_NAME])
def test_save_adapter_where_a_folder_has_a_files_name_writes_nothing(tmp_path, in_the_way):
    model = lora_model()
    save_adapter(model, tmp_path / "old")  # an older adapter beside, to see nothing moves
    (tmp_path / "new" / in_the_way).mkdir(parents=True)
    with pytest.raises(ValueError, match=f"\\['{in_the_way}'\\] are folders where save_adapter "
                                         "writes its files; remove them or save to another"):
        save_adapter(model, tmp_path / "new")
    assert [p.name for p in (tmp_path / "new").iterdir()] == [in_the_way]
    assert (tmp_path / "new" / in_the_way).is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file is a file; save_adapter needs a directory"):
        save_adapter(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, "float32"])
def test_dequantize_to_a_dtype_that_is_not_floating_point_is_refused(dtype):
    q = quantize_nf4(torch.randn(8, 8))
    with pytest.raises(ValueError, match="dtype must be None \\(the original, torch.float32\\) "
                                         "or a floating-point torch.dtype"):
        dequantize_nf4(q, dtype=dtype)


@pytest.mark.parametrize("w, what", [([[1.0, 2.0]], "an object of type list"),
                                     (3.0, "an object of type float"),
                                     (torch.ones(4, 4, dtype=torch.int64), "a torch.int64 tensor")])
def test_quantize_nf4_of_something_not_a_float_tensor_is_refused(w, what):
    with pytest.raises(TypeError, match=f"quantize_nf4: w must be a floating-point "
                                        f"torch.Tensor, got {what}; convert it first"):
        quantize_nf4(w)


@pytest.mark.parametrize("written_with_its_class", [True, False])
def test_resume_from_a_checkpoint_of_another_optimizer_changes_nothing(tmp_path,
                                                                        written_with_its_class):
    """SGD's momentum buffers are not AdamW's moments: refused before the model, the RNG or
    the file change (the model was loaded, and torch seeded, before the failure once). A file
    written before checkpoints named the optimizer's class is judged by its hyper-parameters."""
    def batches(gen):
        x = torch.randint(VOCAB_SIZE, (4, 17), generator=gen)
        return x[:, :-1], x[:, 1:], None

    ckpt = tmp_path / "c.safetensors"
    train(small_gpt(), batches, TrainConfig(max_steps=2, optimizer="sgd", ckpt_path=str(ckpt),
                                      progress=False), device="cpu")
    saved = "SGD"
    if not written_with_its_class:
        tensors, meta = load_file(ckpt)
        trainer = json.loads(meta["trainer"])
        del trainer["optimizer"]
        save_file(tensors, ckpt, {"trainer": json.dumps(trainer)})
        saved = "an optimizer without betas"
    data, model = ckpt.read_bytes(), small_gpt(seed=1)
    before, rng = snapshot(model), torch.get_rng_state()
    with pytest.raises(ValueError, match=f"holds the state of {saved}, this run uses AdamW; "
                                         "resume with the optimizer it was trained with"):
        train(model, batches, TrainConfig(max_steps=4, ckpt_path=str(ckpt), resume=True,
                                          progress=False), device="cpu")
    assert same_state(model.state_dict(), before)
    assert torch.equal(torch.get_rng_state(), rng) and ckpt.read_bytes() == data
