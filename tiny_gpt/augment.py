"""Data augmentation for the tasks: new training inputs composed from the training words.

The usual fix for overfitting on a small set is "add dropout and data augmentation". An
augmentation must keep every answer correct; here it does so by construction. The inputs of
the training examples are taken apart into their words, those words are joined into inputs that
the set does not hold yet (one or two words for `upper`, as the task draws them), and each new
input gets its answer from the task's own transform. Nothing comes from the validation or test
words, so a held-out score still measures prompts never trained on.
"""
import random
from typing import List

from .tasks import Example, Task
from .util.checks import is_whole_number


def input_text(task: Task, example: Example) -> str:
    """The input of an example of `task`: the text between the quotes of its prompt."""
    prompt = example[0]
    head, tail = f'{task.name} "', '" -> "'
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        raise ValueError(f"{prompt!r} is not a prompt of task {task.name!r}")
    return prompt[len(head):-len(tail)]


def recombined(task: Task, examples: List[Example], n_new: int, seed: int = 0) -> List[Example]:
    """n_new examples whose inputs join words of `examples`' inputs in combinations that the
    examples do not hold. Raises ValueError when the words cannot make that many."""
    words = sorted({w for e in examples for w in input_text(task, e).split()})
    possible = task.distinct_inputs(len(words)) - len(examples)
    if not (is_whole_number(n_new) and n_new <= possible):
        raise ValueError(f"recombined: {len(words)} training words make {possible} new inputs "
                         f"for task {task.name!r}; n_new must be a whole number up to that, "
                         f"got {n_new!r}")
    seen = {input_text(task, e) for e in examples}
    rng, inputs = random.Random(seed), []
    while len(inputs) < n_new:
        text = " ".join(rng.choice(words) for _ in range(rng.choice(task.words_per_input)))
        if text not in seen:
            seen.add(text)
            inputs.append(text)
    return [task.example(text) for text in inputs]
