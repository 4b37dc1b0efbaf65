"""tiny_gpt.memory.step_configs: checkpointing switched on as asked, idle optimizers, one pass."""
import copy

import pytest
import torch

from tiny_gpt.memory.checkpointing import Checkpointed
from tiny_gpt.memory.probes import backward_outcome
from tiny_gpt.memory.step_configs import idle_config, measure_configs, with_checkpointing


def frozen_embeddings(model):
    model.requires_grad_(False)
    model.blocks[0].attn.q_proj.weight.requires_grad_(True)  # one trainable weight, after them
    return model


def batch(n=2, t=8):
    tokens = torch.randint(0, 96, (n, t + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:], None


def test_checkpointing_flags_parts_and_bad_impl(small_model):
    model = with_checkpointing(copy.deepcopy(small_model), "manual")
    assert model.config.gradient_checkpointing and model.config.checkpoint_impl == "manual"
    off = with_checkpointing(copy.deepcopy(small_model))
    assert not off.config.gradient_checkpointing
    parts = with_checkpointing(copy.deepcopy(small_model), parts="mlp")
    assert sum(isinstance(m, Checkpointed) for m in parts.modules()) == len(parts.blocks)
    with pytest.raises(ValueError, match="impl must be one of"):
        with_checkpointing(small_model, "reentrant")


@pytest.mark.parametrize("fix", [True, False])
def test_reentrant_comes_with_its_fix_unless_asked_not_to(small_model, fix):
    model = with_checkpointing(frozen_embeddings(copy.deepcopy(small_model)), "torch_reentrant",
                               fix_reentrant=fix)
    model.ln_f.requires_grad_(True)  # trained after the blocks: the loss has a graph either way
    caught, error = backward_outcome(model, *batch()[:2])
    assert error is None and model.ln_f.weight.grad is not None
    got = model.blocks[0].attn.q_proj.weight.grad
    assert (got is not None) == fix  # the pitfall: no gradient behind reentrant checkpoints
    assert bool(caught) != fix       # ... and only a warning says so


def test_idle_config_steps_without_moving_and_measure_configs_reports_each(small_model):
    sgd = idle_config(copy.deepcopy(small_model), [batch()], sgd=True)
    adamw = idle_config(copy.deepcopy(small_model), [batch()], "bf16")
    assert isinstance(sgd[1], torch.optim.SGD) and isinstance(adamw[1], torch.optim.AdamW)
    assert adamw[2] == "bf16" and sgd[2] == "fp32" and len(sgd[3]) == 1
    before = copy.deepcopy(sgd[0].state_dict())
    ledgers, phases = measure_configs({"sgd": sgd, "adamw": adamw}, repeats=1, warmup=0)
    assert set(ledgers) == set(phases) == {"sgd", "adamw"}
    assert all(p["total"] > 0 for p in phases.values())
    # AdamW: exp_avg and exp_avg_sq (8 bytes a weight) + a float32 step per tensor; SGD: momentum
    n_tensors = len(list(small_model.parameters()))
    assert ledgers["adamw"].optimizer == 2 * ledgers["sgd"].optimizer + 4 * n_tensors
    assert all(torch.equal(v, before[k]) for k, v in sgd[0].state_dict().items())
