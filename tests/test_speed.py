"""The speed report's PEFT comparison is skipped, not faked, where peft is absent: the benchmark
then reports no "peft" entry rather than a made-up one. (Timings are printed by the lessons,
never asserted here; that the LoRA and QLoRA forward compile without a graph break is held by
tests/test_compile.py.)"""
import copy
import sys

import pytest
import torch

from lora import apply_lora
from lora.bench import benchmark_lora_linear, copy_factors_to_peft, peft_lora


def test_without_peft_the_comparison_is_skipped_and_the_model_untouched(small_model,
                                                                        monkeypatch):
    """Whether or not peft is installed here, its absence is simulated: a None entry in
    sys.modules makes `import peft` raise ImportError, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "peft", None)
    before = {n: p.clone() for n, p in small_model.named_parameters()}
    grads = {n: p.requires_grad for n, p in small_model.named_parameters()}
    assert peft_lora(small_model, ("q_proj",), r=4, alpha=8) is None
    assert all(torch.equal(p, before[n]) and p.requires_grad == grads[n]
               for n, p in small_model.named_parameters())
    result = benchmark_lora_linear(tokens=32, features=16, r=2, repeats=1, threads=1)
    assert set(result["ratio"]) == {"frozen", "lora", "naive", "autograd"}


def test_with_peft_its_layers_compute_our_layers_function(small_model):
    """Where peft is installed, the comparison runs PEFT's own layers, given our factors."""
    pytest.importorskip("peft", reason="peft is not installed (a benchmark-only extra)")
    ours = apply_lora(copy.deepcopy(small_model), targets=("q_proj",), r=4, alpha=8)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    theirs = peft_lora(copy.deepcopy(small_model), ("q_proj",), r=4, alpha=8)
    assert copy_factors_to_peft(theirs, ours) == small_model.config.n_layer
    idx = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        # float32, the same products in another order: 1e-5 of the logits' scale
        torch.testing.assert_close(theirs(idx)[0], ours(idx)[0], rtol=1e-5, atol=1e-5)
