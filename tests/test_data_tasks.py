import pytest
import torch

from tiny_gpt import ALPHABET, TASKS, VOCAB_SIZE, decode, encode, make_batch, make_corpus
from tiny_gpt.data import get_batch, load_text


def test_alphabet_is_printable_ascii_and_newline():
    assert VOCAB_SIZE == 96 and ALPHABET[0] == "\n" and ALPHABET[1] == " " and ALPHABET[-1] == "~"


def test_tokenizer_round_trip():
    text = make_corpus(5000, seed=3) + "{~}|\n\t".replace("\t", "")
    assert decode(encode(text)) == text


def test_unknown_character_names_it_and_its_position():
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 3"):
        encode("café")


def test_corpus_is_deterministic_per_seed():
    assert make_corpus(3000, seed=1) == make_corpus(3000, seed=1)
    assert make_corpus(3000, seed=1) != make_corpus(3000, seed=2)


def test_load_text_checks_the_alphabet(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello\nworld\n", encoding="utf-8")
    bad.write_text("hello\u2014world", encoding="utf-8")
    assert load_text(good) == "hello\nworld\n"
    with pytest.raises(ValueError, match="position 5"):
        load_text(bad)


def test_random_windows_are_shifted_by_one():
    ids = torch.arange(100)
    x, y = get_batch(ids, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == (4, 10) and torch.equal(y, x + 1)


@pytest.mark.parametrize("name", list(TASKS))
def test_task_splits_never_share_a_prompt(name):
    splits = TASKS[name].splits(n_train=500, n_val=100, n_test=100)
    prompts = {k: {p for p, _ in v} for k, v in splits.items()}
    assert all(len(v) > 0 for v in prompts.values())
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    # and not a single word of a held-out prompt was seen in training
    train_words = {w for p in prompts["train"] for w in p.split('"')[1].split()}
    test_words = {w for p in prompts["test"] for w in p.split('"')[1].split()}
    assert not train_words & test_words


def test_task_examples_are_prompt_arrow_answer_lines():
    prompt, answer = TASKS["upper"].example("red cat")
    assert (prompt, answer) == ('upper "red cat" -> "', 'RED CAT"\n')
    assert TASKS["swap"].example("red cat") == ('swap "red cat" -> "', 'cat red"\n')


def test_loss_mask_covers_answer_tokens_only():
    examples = [TASKS["upper"].example("cat"), TASKS["upper"].example("red cat")]
    x, y, mask = make_batch(examples)
    for row, (prompt, answer) in enumerate(examples):
        targets = decode(y[row][mask[row].bool()].tolist())
        assert targets == answer  # exactly the answer, newline included, no prompt, no padding
        assert decode(x[row, :len(prompt)].tolist()) == prompt


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_holds_out_at_least_150_words_and_tests_every_one(name):
    from tiny_gpt.tasks import lexicon
    splits = TASKS[name].splits()
    test_words = {w for p, _ in splits["test"] for w in p.split('"')[1].split()}
    assert len(test_words) >= 150
    assert len(test_words) == round(0.15 * len(lexicon()))  # all of the held-out words appear
    assert len(splits["test"]) >= 150 and len(set(splits["test"])) == len(splits["test"])


def test_pseudo_words_are_new_lower_case_words_and_fixed():
    from tiny_gpt.tasks import corpus_words, lexicon
    words = lexicon()
    assert len(words) == len(set(words)) == 1100
    assert words[:len(corpus_words())] == corpus_words()
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in words)
    assert lexicon() == words  # the same list every call: the word split never moves


def test_a_split_size_the_words_cannot_make_is_refused():
    most = TASKS["reverse"].distinct_inputs(165)  # one word per input: 165 test inputs at most
    assert len(TASKS["reverse"].splits(n_test=most)["test"]) == most
    with pytest.raises(ValueError, match=r"n_test must be a whole number from 1 to 165"):
        TASKS["reverse"].splits(n_test=most + 1)
    with pytest.raises(ValueError, match="n_train"):
        TASKS["upper"].splits(n_train=0)
    with pytest.raises(ValueError, match="n_val"):
        TASKS["upper"].splits(n_val=2.5)
