"""The lessons' harness (lessons/common.py, lessons/seeds.py): flags are never abbreviated, one
place chooses the --quick budget, runs/ is the repository's wherever a lesson starts, the
recipe x seeds loop trains each run once, and a lesson's flags drive what it trains."""
import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lessons.common import RUNS, choose_budget, parse_args, target_list
from lessons.seeds import Trials
from lora import lora_layers
from tiny_gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def lesson(prefix: str):
    path = next((ROOT / "lessons").glob(f"{prefix}_*.py"))
    spec = importlib.util.spec_from_file_location(f"lesson_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_flag_is_never_abbreviated(capsys):
    """argparse would take --ru (or --r on a lesson without --r) for --runs."""
    with pytest.raises(SystemExit) as stop:
        parse_args("a lesson", ["--ru", "elsewhere"])
    assert stop.value.code == 2 and "unrecognized arguments: --ru" in capsys.readouterr().err


def test_lesson02_takes_r_as_the_rank_and_leaves_runs_where_it_was():
    args = parse_args("lesson 02", ["--r", "4", "--alpha", "8", "--targets", "q,k,up"],
                      lesson("02").add_args)
    assert (args.r, args.alpha, args.targets) == (4, 8.0, ("q_proj", "k_proj", "up_proj"))
    assert args.runs == str(RUNS)


def test_runs_is_the_repository_folder_wherever_a_lesson_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(parse_args("a lesson", []).runs) == ROOT / "runs"


@dataclass(frozen=True)
class Budget:
    steps: int = 100


def test_the_quick_budget_is_chosen_in_one_place():
    quick = Budget(steps=2)
    assert parse_args("a lesson", ["--quick"], budget=(Budget(), quick)).budget is quick
    assert parse_args("a lesson", [], budget=(Budget(), quick)).budget == Budget()
    # a default run's budget read from flags: full is a function of the parsed args
    args = SimpleNamespace(quick=False, steps=7)
    assert choose_budget(args, lambda a: Budget(steps=a.steps), quick) == Budget(steps=7)


@pytest.mark.parametrize("text, names", [("q,v", ("q_proj", "v_proj")),
                                         ("q_proj, up", ("q_proj", "up_proj")),
                                         ("v,v", ("v_proj",))])
def test_target_list_reads_short_and_full_names(text, names):
    assert target_list(text) == names


@pytest.mark.parametrize("text", ["", "x", "q,mlp"])
def test_target_list_refuses_what_is_not_a_projection(text):
    with pytest.raises(argparse.ArgumentTypeError, match="give projections from"):
        target_list(text)


def test_trials_train_each_run_once_and_share_equal_recipes():
    calls = []

    def train(recipe, seed):
        calls.append((recipe, seed))
        return {"acc": 10 * seed + recipe[1]}
    trials = Trials([0, 1], train, key=lambda r: r[0])  # recipes with one key share runs
    first = trials.spreads(("a", 1))
    assert calls == [(("a", 1), 0), (("a", 1), 1)] and first["acc"].values == (1, 11)
    assert trials.spreads(("a", 2))["acc"].values == (1, 11)  # the same key: the same runs
    assert len(trials) == 2 and len(calls) == 2
    trials.spreads(("b", 1))
    assert len(trials) == 4


def test_trials_spreads_hold_the_numbers_of_every_seed_in_order():
    trials = Trials([3, 4, 5], lambda recipe, seed: {"acc": recipe * seed, "curve": [seed],
                                                     "flag": True})
    found = trials.spreads(2)
    assert list(found) == ["acc"] and found["acc"].values == (6, 8, 10)
    assert trials.one(2, 4)["curve"] == [4]


def test_lesson02_trains_the_rank_and_targets_its_flags_name(monkeypatch):
    """The constant at the top of lesson 02 (and the flags that default to it) drives what is
    trained, not only what is printed: lora_copy gets them."""
    l02 = lesson("02")
    fake = SimpleNamespace(evals=[(1, {"val_loss": 1.0})], losses=[1.0], wall_time=0.0)
    monkeypatch.setattr(l02, "finetune", lambda model, *a, **k: fake)
    monkeypatch.setattr(l02, "exact_match", lambda *a, **k: 0.0)
    args = parse_args("lesson 02", ["--quick", "--device", "cpu", "--r", "2", "--targets",
                                    "q,k", "--seeds", "1"], l02.add_args,
                      budget=(l02.Budget(), l02.QUICK))
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=64))
    model = l02.train_seeds(base, args, l02.method_configs(args)).one("LoRA", 0)["model"]
    layers = dict(lora_layers(model))
    assert sorted(p.rsplit(".", 1)[-1] for p in layers) == ["k_proj", "q_proj"]
    assert all(layer.lora_A.shape[0] == 2 for layer in layers.values())


def test_probe_lr_picks_the_candidate_of_the_lowest_validation_loss(monkeypatch):
    """Each candidate trains a fresh build() at its own peak lr; the one whose validation loss
    is lowest wins (here the loss is (lr - 0.03)^2, so 0.03)."""
    import lessons.recipe as recipe
    built = []
    monkeypatch.setattr(recipe, "fit", lambda model, ex, cfg, args: setattr(model, "lr", cfg.lr))
    monkeypatch.setattr(recipe, "task_loss", lambda model, val: (model.lr - 0.03) ** 2)
    args = parse_args("a lesson", ["--device", "cpu"])
    chosen, losses = recipe.probe_lr(args, lambda: built.append(SimpleNamespace()) or built[-1],
                                     (0.01, 0.03, 0.1), {"train": [], "val": []}, steps=3)
    assert chosen == 0.03 and list(losses) == [0.01, 0.03, 0.1]
    assert len({id(m) for m in built}) == 3  # a fresh model per candidate
