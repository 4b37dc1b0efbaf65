"""Greedy answers for prompts of many lengths in one right-padded batch equal each prompt
decoded alone, and exact match scores them."""
import torch

from tiny_gpt import GPT, GPTConfig, decode, encode
from tiny_gpt.evaluate import exact_match, greedy_answers

PROMPTS = ['upper "cat" -> "', 'swap "red fox" -> "', 'reverse "brailom" -> "', "x", 'a "b']


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def alone(model, prompt, n_new):
    idx = torch.tensor([encode(prompt)])
    return decode(model.generate(idx, n_new)[0, len(prompt):].tolist()).split("\n")[0]


def test_one_padded_batch_equals_every_prompt_alone():
    model = tiny_model()
    got = greedy_answers(model, PROMPTS, 12)
    assert got == [alone(model, p, 12) for p in PROMPTS]
    assert len(set(got)) > 1  # a random model answers differently per prompt, or the test is moot


def test_exact_match_is_the_share_of_answers_equal_up_to_the_newline(monkeypatch):
    import tiny_gpt.evaluate as evaluate
    asked = {}

    def fake_answers(model, prompts, max_new_tokens, device="cpu"):
        asked["max_new"] = max_new_tokens
        return ["CAT", "fox re", "moliarb"]

    monkeypatch.setattr(evaluate, "greedy_answers", fake_answers)
    examples = [("p1", "CAT\n"), ("p2", "fox red\n"), ("p3", "moliarb\n")]
    assert exact_match(tiny_model(), examples) == 2 / 3
    assert asked["max_new"] == len("fox red\n") + 1  # room for the longest answer and one more


def test_a_prompt_longer_than_the_block_is_refused():
    model = tiny_model()
    try:
        greedy_answers(model, ["x" * 60], 10)
    except ValueError as e:
        assert "block size 64" in str(e)
    else:
        raise AssertionError("a prompt of 60 + 10 tokens passed a block of 64")
