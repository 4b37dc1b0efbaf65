"""Adapters on disk: round trips, the PEFT config, the base fingerprint, and hostile files.
The format-level bad files are built by hand with struct and json."""
import json
import struct

import pytest
import torch

from lora import (LoRALinear, apply_lora, base_fingerprint, load_adapter, load_model_weights,
                  lora_state_dict, save_adapter, save_merged_model)
from lora.io import CONFIG_NAME, WEIGHTS_NAME
from tiny_gpt.model import GPT, GPTConfig
from tiny_gpt.util.safetensors import SafetensorsError, load_file, save_file

F32_TOL = 1e-5  # merged (W0 + sBA) x vs W0 x + s B A x in float32: rounding of order 1e-6
KEY_A = "base_model.model.blocks.0.attn.q_proj.lora_A.weight"


def tiny_gpt(n_embd=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_embd=n_embd, n_head=2, block_size=32)).eval()


def trained_lora(**kw):
    model = apply_lora(tiny_gpt(), r=4, alpha=8, **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0.0, 0.1)
    return model


def tokens():
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))


def raw_safetensors(header, data=b""):
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    return struct.pack("<Q", len(head)) + head + data


def test_round_trip_is_bit_exact(tmp_path):
    model = trained_lora()
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_gpt(), tmp_path)
    saved, loaded = lora_state_dict(model), lora_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    idx = tokens()
    assert torch.equal(fresh(idx)[0], model(idx)[0])
    assert all(p.requires_grad == (".lora_" in n) for n, p in fresh.named_parameters())


def test_files_follow_peft_layout(tmp_path):
    save_adapter(trained_lora(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    # task_type None: PEFT's from_pretrained then wraps our GPT in a plain PeftModel; with
    # "CAUSAL_LM" it would ask the GPT for the Hugging Face generation API, which it lacks
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    assert config["target_modules"] == ["q_proj", "v_proj"]
    tensors, _ = load_file(tmp_path / WEIGHTS_NAME)
    assert len(tensors) == 8 and tensors[KEY_A].shape == (4, 32)
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 10_000  # kilobytes, not megabytes


def test_partial_targets_are_saved_as_full_paths(tmp_path):
    save_adapter(trained_lora(targets=("blocks.1.attn.v_proj",)), tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == [
        "blocks.1.attn.v_proj"]
    fresh = load_adapter(tiny_gpt(), tmp_path)
    assert [n for n, m in fresh.named_modules() if isinstance(m, LoRALinear)] == [
        "blocks.1.attn.v_proj"]


def test_wrong_base_names_both_fingerprints(tmp_path):
    save_adapter(trained_lora(), tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())["base_model_fingerprint"]
    other = tiny_gpt(n_embd=48)
    with pytest.raises(ValueError, match="fingerprint") as err:
        load_adapter(other, tmp_path)
    assert saved in str(err.value) and base_fingerprint(other) in str(err.value)


def hostile(tmp_path):
    """Each case: (what to write as the weights file, a phrase the error must contain)."""
    valid, _ = load_file(tmp_path / WEIGHTS_NAME)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    wrong = dict(valid, **{KEY_A: torch.zeros(5, 32)})
    return {
        "truncated": (raw[:-12], "truncated"),
        "bad_json": (raw_safetensors(b"{not json"), "not valid JSON"),
        "header_past_eof": (struct.pack("<Q", 10_000) + b"{}", "runs past the end"),
        "overlap": (raw_safetensors({"a": entry, "b": {**entry, "data_offsets": [4, 12]}},
                                    bytes(12)), "overlaps"),
        "unknown_dtype": (raw_safetensors({"a": {**entry, "dtype": "F128"}}, bytes(8)),
                          "unknown dtype"),
        "pickle": (b"\x80\x04\x95" + bytes(40), "header length"),
        "missing_key": ({k: v for k, v in valid.items() if k != KEY_A}, "missing keys"),
        "extra_key": (dict(valid, extra=torch.zeros(1)), "unexpected keys ['extra']"),
        "wrong_shape": (wrong, f"{KEY_A} has shape (5, 32)"),
    }


@pytest.mark.parametrize("case", ["truncated", "bad_json", "header_past_eof", "overlap",
                                  "unknown_dtype", "pickle", "missing_key", "extra_key",
                                  "wrong_shape"])
def test_bad_weights_file_fails_clearly(tmp_path, case):
    save_adapter(trained_lora(), tmp_path)
    content, phrase = hostile(tmp_path)[case]
    if isinstance(content, dict):
        save_file(content, tmp_path / WEIGHTS_NAME)
    else:
        (tmp_path / WEIGHTS_NAME).write_bytes(content)
    model = tiny_gpt()
    with pytest.raises((SafetensorsError, ValueError)) as err:
        load_adapter(model, tmp_path)
    assert phrase in str(err.value) and WEIGHTS_NAME in str(err.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # model untouched


@pytest.mark.parametrize("edit, phrase", [
    (lambda c: "{not json", "not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, "missing required fields ['r']"),
    (lambda c: {**c, "r": "4"}, "field 'r'"),
    (lambda c: {**c, "r": True}, "field 'r'"),
    (lambda c: {**c, "peft_type": "PREFIX_TUNING"}, "peft_type 'LORA'"),
    (lambda c: {**c, "lora_alpha": -1}, "lora_alpha > 0"),
    (lambda c: {**c, "target_modules": ["w_proj"]}, "matches no linear layer"),
    (lambda c: [1, 2], "JSON object"),
])
def test_bad_config_fails_clearly(tmp_path, edit, phrase):
    save_adapter(trained_lora(), tmp_path)
    config = edit(json.loads((tmp_path / CONFIG_NAME).read_text()))
    (tmp_path / CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ValueError, match="adapter_config.json") as err:
        load_adapter(tiny_gpt(), tmp_path)
    assert phrase in str(err.value)


def test_merged_model_round_trip(tmp_path):
    model, idx = trained_lora(), tokens()
    save_merged_model(model, tmp_path / "merged.safetensors")
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    tensors, _ = load_file(tmp_path / "merged.safetensors")
    assert tensors.keys() == tiny_gpt().state_dict().keys()  # plain GPT keys, no adapters
    plain = load_model_weights(tiny_gpt(seed=5), tmp_path / "merged.safetensors")
    assert torch.allclose(plain(idx)[0], model(idx)[0], atol=F32_TOL)


def test_load_model_weights_checks_keys(tmp_path):
    state = tiny_gpt().state_dict()
    state.pop("ln_f.weight")
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="missing keys \\['ln_f.weight'\\]"):
        load_model_weights(tiny_gpt(), tmp_path / "bad.safetensors")


def test_config_without_fingerprint_still_loads(tmp_path):
    """PEFT's own configs carry no fingerprint: keys and shapes are then the only check."""
    model = trained_lora()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["base_model_fingerprint"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    fresh = load_adapter(tiny_gpt(), tmp_path)
    assert torch.equal(fresh(tokens())[0], model(tokens())[0])
