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


def test_kv_cache_gives_the_full_forwards_logits_at_every_new_position():
    """One row decoded with the cache: each step's logits = the full (uncached) forward's at
    that position, padding in the other rows unseen."""
    from tiny_gpt.kv_cache import KVCache
    model = tiny_model(1)
    prompts = [encode('upper "cat" -> "'), encode("ab")]
    lengths = torch.tensor([len(p) for p in prompts])
    buffer = torch.zeros(2, int(lengths.max()), dtype=torch.long)
    for row, p in enumerate(prompts):
        buffer[row, :len(p)] = torch.tensor(p)
    cache = KVCache(lengths, buffer.shape[1])
    with torch.no_grad():
        model(buffer, cache=cache)
        extra = torch.tensor([[5], [7]])
        cached, _ = model(extra, cache=cache, positions=lengths[:, None])  # (2, 1, V)
        for row, p in enumerate(prompts):
            full, _ = model(torch.tensor([p + [int(extra[row])]]))
            torch.testing.assert_close(cached[row, 0], full[0, -1], rtol=1e-5, atol=1e-5)


def test_cached_and_recomputed_decoding_agree_with_lora_and_a_4bit_base():
    from lora import apply_lora, prepare_qlora
    from tiny_gpt.evaluate import NEWLINE, cached_steps, recomputed_steps
    for prepare in (apply_lora, prepare_qlora):
        model = prepare(tiny_model(2))
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                torch.nn.init.normal_(layer.lora_B, std=0.2)  # adapters that change answers
        idx = [encode(p) for p in PROMPTS]
        lengths = torch.tensor([len(p) for p in idx])
        buffer = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
        for row, p in enumerate(idx):
            buffer[row, :len(p)] = torch.tensor(p)
        with torch.no_grad():
            fast = cached_steps(model.eval(), buffer, lengths, 10)
            slow = recomputed_steps(model, buffer, lengths, 10)
        assert torch.equal(fast, slow[:, :fast.shape[1]])
        stopped_early = fast.shape[1] < 10
        assert not stopped_early or all(NEWLINE in row.tolist() for row in fast)


def test_a_kv_cache_with_prefix_kv_is_refused():
    from tiny_gpt.kv_cache import KVCache
    model = tiny_model()
    x = torch.zeros(1, 3, dtype=torch.long)
    try:
        model(x, prefix_kv=[None] * 2, cache=KVCache(torch.tensor([3]), 3))
    except ValueError as e:
        assert "cannot be combined" in str(e)
    else:
        raise AssertionError("cache and prefix_kv together were accepted")


def test_bad_decoding_arguments_are_refused():
    from tiny_gpt.kv_cache import KVCache
    model = tiny_model()
    for bad in (0, 2.5):
        try:
            greedy_answers(model, PROMPTS, bad)
        except ValueError as e:
            assert "max_new_tokens must be a whole number >= 1" in str(e)
        else:
            raise AssertionError(f"max_new_tokens={bad} was accepted")
    try:
        model(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(torch.tensor([3]), 3))
    except ValueError as e:
        assert "width 3" in str(e)
    else:
        raise AssertionError("a cache for width 3 took a first pass of 4")
