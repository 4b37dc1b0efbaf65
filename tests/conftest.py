"""Shared fixtures: a small GPT config that makes every test fast, and a seeded model of it."""
import pytest
import torch

from tiny_gpt import GPT, GPTConfig

torch.set_num_threads(2)

SMALL = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)


def small_gpt(seed=0):
    """A fresh small GPT, its weights drawn from `seed`, in eval mode. For a test that needs
    several models (two seeds, a copy to compare with); `small_model` is one of them."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL)).eval()


@pytest.fixture
def small_cfg():
    return GPTConfig(**SMALL)


@pytest.fixture
def small_model():
    return small_gpt(0)
