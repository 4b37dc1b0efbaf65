"""Augmentation keeps answers correct and stays inside the training words; epoch batches deal
every example once per epoch."""
import pytest
import torch

from tiny_gpt import get_task
from tiny_gpt.augment import input_text, recombined
from tiny_gpt.tasks import epoch_batches, make_batch


@pytest.mark.parametrize("name", ["upper", "swap"])  # reverse: one word an input, see below
def test_recombined_examples_are_new_correct_and_from_training_words(name):
    task = get_task(name)
    splits = task.splits(n_train=40, seed=3)
    new = recombined(task, splits["train"], 60, seed=1)
    train_inputs = {input_text(task, e) for e in splits["train"]}
    train_words = {w for t in train_inputs for w in t.split()}
    held_out = {w for e in splits["val"] + splits["test"] for w in input_text(task, e).split()}
    assert len(new) == 60 and len({input_text(task, e) for e in new}) == 60
    for example in new:
        text = input_text(task, example)
        assert text not in train_inputs                    # a new input ...
        assert set(text.split()) <= train_words            # ... of training words only
        assert not set(text.split()) & held_out
        assert example == task.example(text)               # with the task's own answer
        assert len(text.split()) in task.words_per_input


def test_recombined_refuses_more_than_the_words_make_and_foreign_prompts():
    task = get_task("reverse")  # one word per input: nothing new can be made
    examples = task.splits(n_train=5)["train"]
    with pytest.raises(ValueError, match="make 0 new inputs"):
        recombined(task, examples, 1)
    with pytest.raises(ValueError, match="is not a prompt of task 'upper'"):
        input_text(get_task("upper"), examples[0])


def rows_of(x):
    """The rows of a padded batch as token tuples, the padding (id 0) cut off."""
    return [tuple(t for t in row.tolist() if t) for row in x]


def test_epoch_batches_deal_every_example_once_per_epoch():
    examples = get_task("upper").splits(n_train=10)["train"]
    get_batch = epoch_batches(examples, 3)  # 3 steps an epoch, one example left out
    gen = torch.Generator().manual_seed(0)
    batches = [rows_of(get_batch(gen)[0]) for _ in range(6)]
    everyone = set(rows_of(make_batch(examples)[0]))
    first = [r for b in batches[:3] for r in b]
    assert len(set(first)) == 9 and set(first) <= everyone  # one epoch: 9 different examples
    assert [set(b) for b in batches[:3]] != [set(b) for b in batches[3:]]  # a new order
    with pytest.raises(ValueError, match="batch_size must be a whole number from 1 to the 10"):
        epoch_batches(examples, 11)


def test_atbash_mirrors_every_letter():
    task = get_task("atbash")
    assert task.transform("abcxyz") == "zyxcba"
    assert task.transform(task.transform("moves")) == "moves"  # its own inverse
    assert task.example("az") == ('atbash "az" -> "', 'za"\n')


def test_recombined_wants_a_whole_number():
    task = get_task("upper")
    examples = task.splits(n_train=20)["train"]
    for bad in (2.5, True, -1):
        with pytest.raises(ValueError, match="n_new must be a whole number"):
            recombined(task, examples, bad)
