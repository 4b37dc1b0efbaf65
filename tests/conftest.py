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


def lora_inputs(N=5, n_in=4, n_out=3, r=2, dtype=torch.float64, bias=True, seed=0, gen=None):
    """x (N, n_in) and the LoRA factors A (r, n_in), B (n_out, r) needing gradients; the frozen
    W (n_out, n_in) and b (n_out,) not. Drawn from `gen` (a variant that needs more tensors
    passes its own and goes on drawing), else from a generator seeded with `seed`."""
    gen = gen or torch.Generator().manual_seed(seed)
    x = torch.randn(N, n_in, generator=gen, dtype=dtype, requires_grad=True)
    W = torch.randn(n_out, n_in, generator=gen, dtype=dtype)
    b = torch.randn(n_out, generator=gen, dtype=dtype) if bias else None
    A = torch.randn(r, n_in, generator=gen, dtype=dtype, requires_grad=True)
    B = torch.randn(n_out, r, generator=gen, dtype=dtype, requires_grad=True)
    return x, W, b, A, B
