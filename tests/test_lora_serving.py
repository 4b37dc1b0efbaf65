"""The ways to serve many adapters agree row for row; merging back and forth drifts W0 only by
rounding; the adapter library lists from configs alone, loads lazily, refuses another base
with the model unchanged, and unloads."""
import copy

import pytest
import torch

from lora import (AdapterLibrary, add_adapter, apply_lora, lora_layers, save_adapter,
                  serve_answers, serve_logits, set_active_adapters)
from lora.io import WEIGHTS_NAME
from lora.many.serving import merge_drift, row_groups
from tiny_gpt import GPT, GPTConfig

ROW_TOL = 1e-5  # float32, relative to the largest |logit|


def served_model(k=3):
    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig(block_size=48, n_layer=2, n_head=2, n_embd=32)), r=2,
                       alpha=4)
    for j in range(k):
        add_adapter(model, f"t{j}", r=2 + j, alpha=4.0 + j)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


NAMES = ["t0", None, "t2", "t1", "t0", "t2", None, "default"]


def test_row_groups_keep_first_appearance_order():
    assert row_groups(["b", None, "a", "b"]) == {"b": [0, 3], None: [1], "a": [2]}


def test_every_way_gives_the_same_logits_and_leaves_the_active_adapters():
    model = served_model()
    set_active_adapters(model, "t1")
    idx = torch.randint(0, 96, (len(NAMES), 10), generator=torch.Generator().manual_seed(0))
    reference = serve_logits(model, idx, NAMES, "sub_batches")
    for way in ("merged", "mixed", "grouped"):
        got = serve_logits(model, idx, NAMES, way)
        assert (got - reference).abs().max() / reference.abs().max() <= ROW_TOL, way
    assert all(layer.active == ["t1"] and not layer.merged for _, layer in lora_layers(model))
    assert (reference[0] - reference[1]).abs().max() > 1e-2


def test_every_way_gives_the_same_answers():
    model = served_model()
    prompts = ["abc", "hello there", "x", "lora", "qq", "tiny gpt", "a b", "zz"]
    answers = {way: serve_answers(model, prompts, NAMES, way, 6)
               for way in ("merged", "sub_batches", "mixed", "grouped")}
    assert len({tuple(a) for a in answers.values()}) == 1
    with pytest.raises(ValueError, match="one per prompt"):
        serve_answers(model, prompts[:3], NAMES, "mixed", 6)
    with pytest.raises(ValueError, match="way must be"):
        serve_logits(model, torch.zeros(1, 2, dtype=torch.long), ["t0"], "fastest")


def test_merge_drift_is_rounding_and_weights_are_put_back():
    model = served_model()
    before = [layer.base.weight.clone() for _, layer in lora_layers(model)]
    drift = merge_drift(model, "t2", swaps=20)
    largest = max(w.abs().max().item() for w in before)
    assert 0 < drift < 1e-5 * largest * 20  # each swap rounds by ~eps * |W0|
    assert all(torch.equal(layer.base.weight, w) for (_, layer), w in zip(lora_layers(model),
                                                                          before))


def library_on_disk(tmp_path, k=3):
    model = served_model(k)
    for j in range(k):
        save_adapter(model, tmp_path / f"t{j}", f"t{j}")
    base = copy.deepcopy(model)
    for j in range(k):
        from lora import delete_adapter
        delete_adapter(base, f"t{j}")
    return model, base


def test_library_lists_configs_only_and_loads_on_demand(tmp_path):
    model, base = library_on_disk(tmp_path)
    (tmp_path / "t2" / WEIGHTS_NAME).write_bytes(b"not safetensors")  # unread until loaded
    library = AdapterLibrary(base, tmp_path)
    entries = {e.name: e for e in library.entries()}
    assert list(entries) == ["t0", "t1", "t2"]
    assert (entries["t1"].r, entries["t1"].alpha) == (3, 5.0)
    assert entries["t0"].targets == ("q_proj", "v_proj") and entries["t0"].fits
    assert not any(e.loaded for e in entries.values())
    library.ensure(["t1", None, "t0", "t1"])
    assert library.loaded == {"t0", "t1"}
    assert all(layer.active == ["default"] for _, layer in lora_layers(base))  # added inactive
    idx = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(serve_logits(base, idx, ["t0", "t1"], "mixed"),
                       serve_logits(model, idx, ["t0", "t1"], "mixed"))
    with pytest.raises(ValueError):
        library.load("t2")   # the broken weights file is found only now
    assert "t2" not in library.loaded
    library.unload("t0")
    assert [e.name for e in library.entries() if e.loaded] == ["t1"]
    with pytest.raises(ValueError, match="not loaded"):
        library.unload("t0")
    with pytest.raises(ValueError, match="no adapter 'zz'"):
        library.ensure(["t0", "zz"])
    assert library.loaded == {"t1"}  # ensure checked every name before loading any


def test_library_refuses_another_base_before_touching_the_model(tmp_path):
    _, _ = library_on_disk(tmp_path)
    other = apply_lora(GPT(GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=32)))
    library = AdapterLibrary(other, tmp_path)
    assert not any(e.fits for e in library.entries())
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="fingerprint"):
        library.load("t0")
    assert other.state_dict().keys() == state.keys()
    assert library.loaded == set()
    with pytest.raises(ValueError, match="not a folder"):
        AdapterLibrary(other, tmp_path / "missing")
