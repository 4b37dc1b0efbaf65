"""Shared fixtures: a small GPT config that makes every test fast."""
import pytest
import torch

from tiny_gpt import GPT, GPTConfig

torch.set_num_threads(2)


@pytest.fixture
def small_cfg():
    return GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def small_model(small_cfg):
    torch.manual_seed(0)
    return GPT(small_cfg)
