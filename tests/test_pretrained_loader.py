"""The loader on folders this project writes itself in the Hugging Face layout (no transformers
needed): round trips, sharding, dtypes, every refusal, and loading straight into 4-bit."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora import prepare_qlora
from quant import Linear4bit, load_pretrained_4bit, quantize_model
from tiny_gpt.pretrained import build_model, load_pretrained, save_pretrained
from tiny_gpt.pretrained.config import config_from_dict
from tiny_gpt.pretrained.loader_maps import file_layout
from tiny_gpt.util.safetensors import SafetensorsError, load_file, save_file
from tiny_gpt.util import safetensors_mapped
from tiny_gpt.util.safetensors_mapped import INDEX_NAME, MappedFile

from test_pretrained_models import gpt2_raw, llama_raw, tokens

FAMILIES = {"llama": llama_raw(), "llama-tied": llama_raw(tie_word_embeddings=True),
            "llama-bias": llama_raw(attention_bias=True, mlp_bias=True),
            "qwen2": llama_raw(model_type="qwen2", tie_word_embeddings=True),
            "gpt2": gpt2_raw()}


def saved(tmp_path, raw, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build_model(config_from_dict(raw))
    save_pretrained(model, tmp_path, **kwargs)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_comes_from_exactly_one_place_in_the_file(family):
    model = build_model(config_from_dict(FAMILIES[family]))
    parts = [p.ours for _, ps in file_layout(model).values() for p in ps]
    assert sorted(parts) == sorted(model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shard_bytes", [None, 20_000], ids=["one-file", "sharded"])
def test_save_then_load_gives_the_same_weights_and_logits(tmp_path, family, shard_bytes):
    model = saved(tmp_path, FAMILIES[family], max_shard_bytes=shard_bytes)
    assert (tmp_path / INDEX_NAME).is_file() == (shard_bytes is not None)
    loaded = load_pretrained(tmp_path)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded(tokens())[0], model(tokens())[0])


def test_gpt2_files_hold_fused_transposed_weights(tmp_path):
    """What makes GPT-2's layout GPT-2's: c_attn = [W_q^T | W_k^T | W_v^T], (in, out)."""
    model = saved(tmp_path, gpt2_raw())
    tensors, _ = load_file(tmp_path / "model.safetensors")
    attn = model.transformer.h[1].attn
    expected = torch.cat([attn.q_proj.weight.T, attn.k_proj.weight.T, attn.v_proj.weight.T], 1)
    assert torch.equal(tensors["transformer.h.1.attn.c_attn.weight"], expected)
    assert torch.equal(tensors["transformer.h.1.mlp.c_fc.weight"],
                       model.transformer.h[1].mlp.c_fc.weight.T)


def test_gpt2_names_without_the_transformer_prefix_load(tmp_path):
    model = saved(tmp_path, gpt2_raw())
    tensors, _ = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              tmp_path / "model.safetensors")
    assert torch.equal(load_pretrained(tmp_path)(tokens())[0], model(tokens())[0])


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_files_load_exactly_as_their_values(tmp_path, stored):
    model = saved(tmp_path, llama_raw(), dtype=stored)
    loaded = load_pretrained(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    rounded = model.model.embed_tokens.weight.to(stored).float()
    assert torch.equal(loaded.model.embed_tokens.weight, rounded)
    assert load_pretrained(tmp_path, dtype=stored).model.norm.weight.dtype == stored


def test_keys_that_carry_no_weights_are_ignored(tmp_path):
    saved(tmp_path, llama_raw())
    tensors, _ = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, tmp_path / "model.safetensors")
    load_pretrained(tmp_path)


# --- refusals, each before any weight is read -------------------------------------------------
def edit_file(tmp_path, change):
    tensors, _ = load_file(tmp_path / "model.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(2)}),
     r"unexpected tensors \['model.layers.2.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"model.norm.weight": torch.ones(31)}),
     r"model.norm.weight has shape \(31,\), the config needs \(32,\)"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int64)}),
     r"stored as .*\['model.norm.weight'\] are \['I64'\]"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_by_name_before_reading(tmp_path, monkeypatch,
                                                                        change, message):
    saved(tmp_path, llama_raw())
    edit_file(tmp_path, change)
    reads = []
    monkeypatch.setattr(MappedFile, "tensor", lambda self, *a: reads.append(a))
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)
    assert reads == []


def test_a_bad_config_is_refused_before_the_weights_are_opened(tmp_path, monkeypatch):
    saved(tmp_path, llama_raw())
    (tmp_path / "config.json").write_text(json.dumps(llama_raw(model_type="falcon")))
    opened = []
    monkeypatch.setattr(safetensors_mapped, "read_header", lambda *a: opened.append(a))
    with pytest.raises(ValueError, match="unknown model_type 'falcon'"):
        load_pretrained(tmp_path)
    assert opened == []


def test_a_truncated_header_is_refused(tmp_path):
    saved(tmp_path, llama_raw())
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    (tmp_path / "model.safetensors").write_bytes(raw[:8 + n // 2])
    with pytest.raises(SafetensorsError, match="header length .* runs past the end"):
        load_pretrained(tmp_path)


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    saved(tmp_path, llama_raw(), max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match=f"disagree about \\['{name}'\\]"):
        load_pretrained(tmp_path)


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_raw()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path)


# --- the memory-mapped reader -----------------------------------------------------------------
def test_the_mapped_reader_reads_what_load_file_reads_at_odd_offsets(tmp_path):
    """A 3-element F16 tensor first puts the F32 one after it at an offset that is not a
    multiple of 4; each tensor must still read as written."""
    tensors = {"a": torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16),
               "b": torch.randn(5, 7), "c": torch.randn(4).bfloat16(),
               "d": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "x.safetensors")
    with MappedFile(tmp_path / "x.safetensors") as f:
        assert f.entries["b"]["data_offsets"][0] % 4 != 0
        for name, t in tensors.items():
            assert torch.equal(f.tensor(name), t) and f.tensor(name).dtype == t.dtype
        assert torch.equal(f.tensor("c", torch.float32), tensors["c"].float())


# --- straight into 4-bit ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_4bit_loading_gives_the_codes_of_quantizing_the_float_model(tmp_path, family):
    saved(tmp_path, FAMILIES[family], dtype=torch.bfloat16)
    direct = load_pretrained_4bit(tmp_path)
    after = quantize_model(load_pretrained(tmp_path))
    a, b = direct.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("codes") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(isinstance(m, torch.nn.Linear) for m in direct.modules())


def test_qlora_on_the_4bit_loaded_model_equals_qlora_on_the_float_one(tmp_path):
    saved(tmp_path, llama_raw())
    torch.manual_seed(5)
    direct = prepare_qlora(load_pretrained_4bit(tmp_path), r=4)
    torch.manual_seed(5)
    after = prepare_qlora(load_pretrained(tmp_path), r=4)
    assert torch.equal(direct(tokens())[0], after(tokens())[0])
    trainable = [n for n, p in direct.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_4bit_loading_leaves_excluded_layers_in_float_and_refuses_unknown_names(tmp_path):
    saved(tmp_path, llama_raw())
    model = load_pretrained_4bit(tmp_path, exclude=("lm_head",))
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    with pytest.raises(ValueError, match="exclude 'lm_haed' matches no nn.Linear"):
        load_pretrained_4bit(tmp_path, exclude=("lm_haed",))


# --- memory: the model and one tensor, never the file beside the model ------------------------
MEASURE = """
import sys, torch
from tiny_gpt.pretrained import load_pretrained
from quant import Linear4bit, load_pretrained_4bit, quantize_nf4
Linear4bit(quantize_nf4(torch.randn(64, 64)))(torch.randn(2, 64))  # one-time setup, not loading
torch.set_num_threads(1)  # each thread's scratch buffers add to the peak: 8 threads, +10 MB here
def vm(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to what is resident now
base = vm("VmRSS:")
if sys.argv[2] == "4bit":  # a QLoRA base: the projections in NF4, the embedding in bfloat16
    model = load_pretrained_4bit(sys.argv[1], embedding_dtype=torch.bfloat16)
else:
    model = load_pretrained(sys.argv[1])
tensors = [*model.parameters(), *model.buffers()]
print(vm("VmHWM:") - base, sum(t.numel() * t.element_size() for t in tensors))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="measures peak memory through Linux's /proc/self")
@pytest.mark.parametrize("kind", ["float", "4bit"])
def test_loading_peaks_near_the_loaded_model_not_the_model_plus_the_file(tmp_path, kind):
    """Float: the bfloat16 file is half the float32 model; reading it whole beside the model,
    or keeping its mapped pages, would peak at 1.5x the model. The bound is 1.3x (allocator
    slack, one chunk of the file). 4-bit: the float model never exists, so the peak stays well
    under it (0.75x; 0.4x measured on one thread); quantizing after a float load would pass
    1x. (At this small size the embedding and fixed costs are most of the 4-bit peak; lesson
    16 measures the SmolLM2-135M shape against the 4-bit model plus one float layer.)"""
    raw = llama_raw(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                    num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4,
                    tie_word_embeddings=True)  # as SmolLM2 and Llama 3.2: no big lm_head
    float_bytes = 4 * saved(tmp_path, raw, dtype=torch.bfloat16).num_params()
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), kind],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    peak, model_bytes = map(int, out.stdout.split())
    print(f"{kind}: peak above baseline {peak / 2**20:.0f} MB, loaded model "
          f"{model_bytes / 2**20:.0f} MB, float32 model {float_bytes / 2**20:.0f} MB")
    assert peak <= (1.3 * model_bytes if kind == "float" else 0.75 * float_bytes)
