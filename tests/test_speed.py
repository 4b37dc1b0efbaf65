"""lessons/speed.py's measured claims that are properties of the code, not timings: the LoRA and
QLoRA forward compile without a graph break, and the PEFT comparison is skipped, not faked,
where peft is absent. (Its timings are printed by the lessons, never asserted here.)"""
import importlib.util

import pytest
import torch

from lessons.common import lora_copy
from lessons.speed import graph_breaks
from lora.bench import peft_lora
from tiny_gpt.util.torch_compat import dynamo_traces_function_backward


@pytest.mark.parametrize("options", [{}, {"quantized": True}], ids=["LoRA", "QLoRA"])
def test_forward_compiles_without_a_graph_break(small_model, options):
    if not dynamo_traces_function_backward():
        pytest.skip(f"torch {torch.__version__}'s dynamo breaks the graph at every custom "
                    "autograd.Function (it cannot trace ctx.needs_input_grad before torch 2.4)")
    # a .item(), a host sync or an unsupported call in the 4-bit or LoRA path would break the
    # graph here (the QLoRA forward once broke it 19 times)
    model = lora_copy(small_model, 0, r=4, alpha=8, **options)
    graphs, breaks, reasons = graph_breaks(model, torch.randint(0, 96, (2, 8)))
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.skipif(importlib.util.find_spec("peft") is not None, reason="peft is installed")
def test_without_peft_the_comparison_is_skipped(small_model):
    assert peft_lora(small_model, ("q_proj",), r=4, alpha=8) is None
