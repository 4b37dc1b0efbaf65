"""Lesson 16's measuring tools: predict.py against the ledger and the published parameter counts,
peak_memory.py against a known allocation, the 4-bit model drawn one layer at a time, and the
lesson's --model path on a tiny checkpoint folder written here (no download)."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lora.checkpoint_bench import build, random_4bit_model, random_batch
from tiny_gpt.memory.step_time import idle_adamw
from quant import Linear4bit, quantize_nf4
from tiny_gpt.memory.ledger import measure_step, weight_ledger
from tiny_gpt.memory.peak_memory import measure_peak
from tiny_gpt.memory.predict import (PAPER_RECIPES, PUBLISHED, RECIPES, Recipe, Shape,
                                     nf4_bytes, predict, saved_per_token)
from tiny_gpt.pretrained import build_model, save_pretrained, shipped_config

from test_tokenizer import tiny_spec, write

MiB = 2 ** 20
LESSON = Path(__file__).resolve().parent.parent / "lessons" / "16_real_checkpoint.py"


def test_published_shapes_give_the_published_parameter_counts():
    # the counts the model cards state (safetensors metadata on the hub)
    counts = {"SmolLM2-135M": 134_515_008, "Llama-3.2-1B": 1_235_814_400,
              "Llama-2-7B": 6_738_415_616, "Llama-2-70B": 68_976_648_192}
    for name, count in counts.items():
        assert sum(PUBLISHED[name].parameter_counts().values()) == count, name


def test_shape_reads_a_model_config_and_its_defaults():
    cfg = shipped_config("smollm2-135m")
    assert Shape.of(cfg) == PUBLISHED["SmolLM2-135M"]
    raw = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    shape = Shape.of(raw)  # no head_dim, no key/value heads: hidden / heads, and all heads
    assert (shape.head_dim, shape.num_key_value_heads, shape.tie_word_embeddings) == (4, 2, False)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_prediction_equals_the_ledger_of_one_step(recipe):
    """Weights, gradients and optimizer state exactly; activations within 2%: the count of
    what each operation saves leaves out only tensors of a few values (a repeat_interleave's
    index, LoRA's s * B) -- dropping any real item (the log-softmax, the MLP's three, the
    norms' float32 copies under bf16) moves it by far more."""
    cfg = shipped_config("tiny")
    B, T = 2, 24
    model = build(cfg, recipe)
    measured = measure_step(model, random_batch(cfg, B, T), idle_adamw(model))
    predicted = predict(cfg, RECIPES[recipe], B, T)
    for field in ("frozen", "trainable", "grads", "optimizer"):
        assert getattr(measured, field) == getattr(predicted, field), field
    assert measured.activations == pytest.approx(predicted.activations, rel=0.02)


def test_checkpointing_predicts_far_fewer_activations_at_a_real_shape():
    shape = PUBLISHED["Llama-3.2-1B"]
    plain, ckpt = (predict(shape, RECIPES[r], 1, 256).activations
                   for r in ("LoRA", "LoRA + ckpt"))
    per_layer = 256 * sum(saved_per_token(shape, RECIPES["LoRA"]).values())
    assert plain - ckpt > 10 * per_layer  # 16 blocks' tensors become 16 block inputs


def test_the_qlora_papers_65b_claims_hold_in_the_prediction():
    """Full 16-bit fine-tuning of LLaMA-65B needs more than 780 GB (12 bytes a weight: bf16
    weight and gradient, two float32 AdamW moments, about 783 GB before activations); QLoRA
    with r = 64 on every linear layer fits under 48 GB at batch 1 x 512."""
    shape = PUBLISHED["LLaMA-65B"]
    full = predict(shape, PAPER_RECIPES["full FT 16-bit"], 1, 512)
    qlora = predict(shape, PAPER_RECIPES["QLoRA, all linear r=64"], 1, 512)
    assert 780e9 < full.total < 800e9
    assert qlora.total < 48e9 and qlora.frozen < 40e9


@pytest.mark.parametrize("shape", [(64, 64), (100, 30), (7, 3)])
def test_nf4_bytes_counts_a_linear4bits_buffers(shape):
    """(100, 30): 3000 values, the last block padded; (7, 3): one block, one group."""
    layer = Linear4bit(quantize_nf4(torch.randn(shape)))
    assert nf4_bytes(*shape) == sum(b.numel() * b.element_size() for b in layer.buffers())


def test_full_fine_tuning_trains_every_tensor():
    shape = Shape.of(shipped_config("tiny"))
    ledger = predict(shape, Recipe("full", lora_targets=None), 1, 8)
    model = build_model(shipped_config("tiny"))
    n_tensors = len(list(model.parameters()))  # the tied head is the embedding: one tensor
    assert ledger.optimizer == 2 * ledger.trainable + 4 * n_tensors


def test_peak_memory_reads_a_known_allocation():
    """64 MiB touched page by page: the high-water mark rises by that much (allocator and
    interpreter noise is well under 8 MiB)."""
    n = 64 * MiB
    report = measure_peak("tiny_gpt.memory.peak_memory:touch_bytes", n=n)
    assert report["result"] == n
    assert abs(report["added"] - n) < 8 * MiB
    assert report["peak"] == report["baseline"] + report["added"]


def test_peak_memory_refuses_a_bad_target_and_reports_a_failing_one():
    with pytest.raises(ValueError, match="package.module:function"):
        measure_peak("tiny_gpt.memory.peak_memory")  # no function named: no process started
    with pytest.raises(RuntimeError, match="negative"):
        measure_peak("tiny_gpt.memory.peak_memory:touch_bytes", n=-1)


def test_a_random_4bit_model_has_no_float_linear_layer_and_draws_hf_like_weights():
    cfg = shipped_config("tiny")
    model = random_4bit_model(cfg)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * cfg.num_hidden_layers
    w = torch.cat([m.dequantized_weight().flatten() for m in layers])
    assert 0.018 < w.std().item() < 0.022  # N(0, 0.02), after 4-bit rounding
    assert torch.equal(model.model.norm.weight, torch.ones(cfg.hidden_size))
    again = random_4bit_model(cfg)  # the same seed draws the same model
    assert torch.equal(again.model.layers[0].mlp.up_proj.codes,
                       model.model.layers[0].mlp.up_proj.codes)
    assert weight_ledger(model).weights == predict(cfg, RECIPES["QLoRA"], 1, 1).frozen


# --- the lesson on a checkpoint folder ---------------------------------------------------

def load_lesson():
    spec = importlib.util.spec_from_file_location("lesson_16", LESSON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with random weights and a byte-level tokenizer (vocabulary 512)."""
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    torch.manual_seed(0)
    save_pretrained(build_model(shipped_config("tiny")), path)
    return write(path, tiny_spec())


def test_an_unknown_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown recipe 'LoRA\\+'"):
        build(shipped_config("tiny"), "LoRA+")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_model_path_tunes_and_saves_a_peft_adapter(folder, tmp_path, method):
    lesson = load_lesson()
    code = lesson.main(["--model", str(folder), "--method", method, "--steps", "3",
                        "--runs", str(tmp_path)])
    assert code == 0 or method == "qlora"  # 3 steps need not lower a 4-bit model's loss
    saved = tmp_path / "16_real_checkpoint" / f"adapter_{method}"
    assert {p.name for p in saved.iterdir()} >= {"adapter_config.json",
                                                 "adapter_model.safetensors"}


def test_the_fresh_process_sections_run_on_the_tiny_shape(tmp_path):
    """What --quick skips: the load peaks and the step peaks, each a fresh interpreter."""
    lesson = load_lesson()
    args = lesson.parse_args(lesson.__doc__, ["--quick", "--runs", str(tmp_path)],
                             lesson.add_args)
    checks = lesson.Checks(args)
    loads = lesson.load_section(shipped_config("tiny"), checks)
    ratio_big, ratio_small, costs = lesson.rss_section(lesson.QUICK, checks)
    assert set(loads) == {"float", "4-bit"} and all(v > 0 for v in loads.values())
    assert ratio_big > 0 and ratio_small > 0
    assert len(costs) == 4
    assert all(c["peak MiB"] > 0 and c["step s"] > 0 for c in costs.values())
    assert not checks.failed()  # targets are not judged under --quick; nothing else failed


def test_bad_data_is_refused_before_the_model_is_read(tmp_path):
    data = tmp_path / "data.tsv"
    data.write_text("a prompt without its answer\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="line 1: expected one tab"):
        load_lesson().main(["--model", str(tmp_path / "no_such_folder"), "--data", str(data),
                            "--runs", str(tmp_path)])


def test_a_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        load_lesson().main(["--method", "full"])
    assert stop.value.code == 2 and "--method" in capsys.readouterr().err


def test_speed_section_compares_equal_losses_with_transformers_and_peft():
    pytest.importorskip("transformers", reason="transformers is a test-only extra")
    pytest.importorskip("peft", reason="peft is a test-only extra")
    from lessons.speed_checkpoint import SAME_LOSS_TOL, checkpoint_section
    found = checkpoint_section(quick=True)
    assert found["LoRA loss gap"] <= SAME_LOSS_TOL  # the same A, B and weights on both sides
    assert found["LoRA step / transformers + PEFT"].median > 0
