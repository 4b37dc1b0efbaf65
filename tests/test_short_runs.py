"""lessons/recipe.py's short runs: one knob changed per recipe, each (recipe, seed) trained once,
test prompts decoded only where asked and only once."""
from types import SimpleNamespace

import pytest

import lessons.recipe as recipe
from lessons.common import parse_args
from lessons.recipe import ShortRun, scored_runs, short_runs
from lessons.seeds import add_seeds_flag


class Model(SimpleNamespace):
    lr = None

    def eval(self):  # as nn.Module.eval: returns the model
        return self


@pytest.fixture
def patched(monkeypatch):
    """lora_copy, fit, task_loss and exact_match stand-ins that record what they were given."""
    seen = {"copies": [], "cfgs": [], "decoded": []}
    monkeypatch.setattr(recipe, "lora_copy", lambda base, seed, **kw: seen["copies"].append(
        (seed, kw)) or Model())
    def fit(model, examples, cfg, args):
        seen["cfgs"].append(cfg)
        model.lr = cfg.lr
        return SimpleNamespace(losses=[4.0] * 9 + [cfg.lr])

    monkeypatch.setattr(recipe, "fit", fit)
    monkeypatch.setattr(recipe, "task_loss", lambda model, val: 10 * model.lr)
    monkeypatch.setattr(recipe, "exact_match", lambda model, test, device: seen["decoded"].append(
        len(test)) or model.lr)
    return seen


def test_short_runs_train_each_recipe_once_per_seed_with_its_knobs(patched):
    args = parse_args("a lesson", ["--quick", "--device", "cpu", "--seeds", "2"], add_seeds_flag)
    runs = short_runs(args, base=None, steps=3)
    const = ShortRun(0.1, constant=True, alpha=1.6, dropout=0.1)
    found = runs.spreads(const, ("val_loss", "last_loss"))
    runs.spreads(ShortRun(0.1, constant=True, alpha=1.6, dropout=0.1))  # an equal recipe
    assert len(runs) == 2 and [seed for seed, _ in patched["copies"]] == [0, 1]
    assert patched["copies"][0][1] == {"alpha": 1.6, "dropout": 0.1}
    cfg = patched["cfgs"][0]
    assert (cfg.max_steps, cfg.schedule, cfg.warmup_steps, cfg.lr) == (3, "constant", 0, 0.1)
    assert found["val_loss"].values == (1.0, 1.0)  # task_loss of the trained model
    assert found["last_loss"].mean == pytest.approx(0.1)  # tail_mean: the last 10% of 10 steps
    runs.one(ShortRun(0.01), 0)
    assert patched["cfgs"][-1].schedule != "constant" and patched["cfgs"][-1].warmup_steps == 1


def test_scored_runs_decode_each_run_once_on_the_first_n_test_prompts(patched):
    args = parse_args("a lesson", ["--quick", "--device", "cpu", "--seeds", "2"], add_seeds_flag)
    runs = short_runs(args, base=None, steps=3)
    first = scored_runs(args, runs, ShortRun(0.2), n_test=3)
    again = scored_runs(args, runs, ShortRun(0.2), n_test=3)
    assert patched["decoded"] == [3, 3]  # one decode per seed, not per call
    assert first == again and first["acc"].values == (0.2, 0.2)
    assert set(first) == {"val_loss", "last_loss", "acc"}
