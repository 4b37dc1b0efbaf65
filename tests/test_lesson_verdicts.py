"""The sentences lessons print as conclusions are computed from their measurements: each helper
that turns numbers into words, on cases that decide each way and on the case that cannot tell.
"""
import importlib.util
from pathlib import Path

import pytest

from lessons.seeds import Spread, Verdict, in_words

LESSONS = Path(__file__).resolve().parent.parent / "lessons"


def lesson(prefix: str):
    path = next(LESSONS.glob(f"{prefix}_*.py"))
    spec = importlib.util.spec_from_file_location(f"lesson_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- lessons/seeds.py: in_words --------------------------------------------------------------

@pytest.mark.parametrize("holds, said", [(True, "shown"), (None, "cannot tell")])
def test_in_words_picks_the_sentence_the_verdict_allows_and_keeps_its_interval(holds, said):
    v = Verdict(holds, "a higher than b: +1.0 points, 95% CI [+0.5, +1.5] n=3")
    text = in_words(v, "shown", "contradicted", "cannot tell")
    assert text == f"{said} (+1.0 points, 95% CI [+0.5, +1.5] n=3)"


def test_in_words_names_the_order_of_the_interval_under_the_contradicting_sentence():
    # "b beats a" followed by a bare "-3.2 points" reads as if b were the lower one
    v = Verdict(False, "a lower than b: -3.2 points, 95% CI [-6.3, -0.1] n=3")
    text = in_words(v, "a beats b", "b beats a", "no difference")
    assert text == "b beats a (a lower than b: -3.2 points, 95% CI [-6.3, -0.1] n=3)"


# --- lesson 04: "a small rank does as well" ----------------------------------------------------

@pytest.mark.parametrize("small, mid, outcome", [
    # the case: small is lower by 2.5-3.5 points, the interval [-4.2, -1.8] straddles
    # the 2-point margin: the seeds cannot tell whether it is within 2 points
    ((.875, .87, .865), (.9, .9, .9), "cannot tell"),
    ((.899, .902, .90), (.9, .9, .9), "reproduced"),            # within 0.2 points
    ((.80, .81, .79), (.9, .9, .9), "not reproduced"),          # 10 points below, steadily
    ((.95, .96, .97), (.9, .9, .9), "reproduced (and more)"),   # 5-7 points above
    ((.97, .80, .99), (.9, .9, .9), "cannot tell"),             # the seeds disagree
])
def test_as_well_says_cannot_tell_where_the_interval_straddles_the_margin(small, mid, outcome):
    l04 = lesson("04")
    assert l04.as_well(Spread(small), Spread(mid), "r=1", "r=8")[0] == outcome


def test_beats_reads_the_paired_interval():
    l04 = lesson("04")
    hi, lo = Spread((.9, .95, .92)), Spread((.85, .91, .86))
    assert l04.beats(hi, lo, "a", "b")[0] == "reproduced"
    assert l04.beats(lo, hi, "a", "b")[0] == "contradicted"
    assert l04.beats(Spread((.97, .99, .80)), lo, "a", "b")[0].startswith("not reproduced")


# --- lesson 13: why the weights drift further than the gradients -------------------------------

def test_lesson13_explains_the_weight_gap_only_where_it_is_larger():
    l13 = lesson("13")
    larger = l13.weights_vs_gradients({"right": 1e-7, "own_size": 1e-4}, {"gap": 4e-6}, 20)
    assert "40x further apart" in larger and "AdamW divides" in larger
    # the issue's run: gradient gap 1.1, weights' 4.6e-5 -- no "why" for a drift that is absent
    smaller = l13.weights_vs_gradients({"right": 1.1, "own_size": 1.0}, {"gap": 4.6e-5}, 20)
    assert "no further apart" in smaller and "AdamW" not in smaller


# --- lesson 12: which DoRA form saves fewer bytes ----------------------------------------------

@pytest.mark.parametrize("ours, theirs, N, smaller, agrees", [
    (100, 200, 64, "ours is smaller", "as N"),            # N < in: ours predicted, ours measured
    (300, 200, 64, "autograd's is smaller", "not as N"),  # measured against the prediction
    (300, 200, 512, "autograd's is smaller", "as N"),     # N > in: autograd's predicted
])
def test_lesson12_says_which_form_saved_less_from_the_measured_bytes(ours, theirs, N, smaller,
                                                                      agrees):
    l12 = lesson("12")
    saved = {"ours, exact": ours, "autograd on the formula, exact": theirs}
    text = l12.saved_bytes_sentence(saved, N, 128, 128)
    assert smaller in text and f"{agrees} = {N}" in text.replace("as N = ", "as N = ")


# --- lesson 05: double quantization's remedy, and kurtosis -------------------------------------

def rows(small, large, bits):
    return {"small": (0.0, small), "large": (0.0, large), "bits": bits}


def test_lesson05_remedy_sentence_follows_the_measured_row_errors():
    l05 = lesson("05")
    even = l05.double_quant_sentence(rows(10.0, 0.0085, 4.13), rows(0.0086, 0.0085, 4.5))
    assert "multiplies the small rows' error by 1,163" in even and "keeps the small rows within" \
        in even
    uneven = l05.double_quant_sentence(rows(10.0, 0.0085, 4.13), rows(0.02, 0.0085, 4.5))
    assert "NOT within 1.25x" in uneven
    harmless = l05.double_quant_sentence(rows(0.008, 0.0085, 4.13), rows(0.0086, 0.0085, 4.5))
    assert "does not hurt" in harmless


def test_lesson05_kurtosis_sentence_says_whether_flatness_separates_the_winners():
    l05 = lesson("05")
    table = {"a": {"int4": 1, "FP4": 2}, "b": {"int4": 3, "FP4": 2}, "c": {"int4": 3, "FP4": 2}}
    assert "exactly on the flatter" in l05.kurtosis_sentence(table, {"a": 2.0, "b": 2.9, "c": 3})
    assert "overlap" in l05.kurtosis_sentence(table, {"a": 2.95, "b": 2.9, "c": 3.0})
    assert "every weight" in l05.kurtosis_sentence({"a": table["b"]}, {"a": 3.0})


# --- lesson 11: does the merge / unmerge rounding grow with the cycles -------------------------

@pytest.mark.parametrize("drift, said", [
    ({1: 1e-8, 10: 3e-8, 100: 1e-7}, "grows"),
    ({1: 0.0, 10: 0.0, 100: 0.0}, "does not grow steadily"),
    ({1: 2e-8, 10: 1e-8, 100: 3e-8}, "does not grow steadily"),
])
def test_lesson11_says_whether_the_swap_drift_grows(drift, said):
    assert f"rounding {said} with" in lesson("11").drift_sentence(drift)


# --- lesson 04's checks table: exact properties judged under --quick too ----------------------

def judge_04(counts_off=0, growth_off=1.0, quick=True):
    """Lesson 04's judge on made-up measurements: equal budgets (unless counts_off) and the
    first-step growth each rule predicts (times growth_off for alpha = 2r)."""
    from lessons.common import parse_args
    from tiny_gpt import GPT, GPTConfig
    l04 = lesson("04")
    base = GPT(GPTConfig())
    budget = l04.lora_param_count(base, l04.TARGET_SETS[l04.BUDGET[0]], l04.BUDGET[1])
    target_res = {name: {"trainable": budget + (counts_off if name == "Q" else 0)}
                  for name in l04.TARGET_SETS}  # part 2's trainable count of each target set
    ratio = (l04.LARGE / l04.R_MID) ** 0.5
    norms = {("alpha fixed", l04.R_MID): 1.0, ("alpha fixed", l04.LARGE): 1 / ratio,
             ("alpha = 2r", l04.R_MID): 1.0, ("alpha = 2r", l04.LARGE): ratio * growth_off,
             ("rsLoRA", l04.R_MID): 1.0, ("rsLoRA", l04.LARGE): 1.0}
    found = [("a claim", "cannot tell", "the interval"), ("b claim", "reproduced", "x"),
             ("c claim", "contradicted", "y")]
    args = parse_args("lesson 04", ["--quick"] if quick else [])
    return l04.judge(args, target_res, budget, norms, found)


@pytest.mark.parametrize("quick", [True, False])
def test_lesson04_checks_pass_on_equal_budgets_and_the_predicted_growth(quick, capsys):
    # the papers' findings are what a run measured, shown but never judged: a finding that
    # does not reproduce on this tiny model is a result, not a failure of the lesson's code
    assert judge_04(quick=quick) == 0
    out = capsys.readouterr().out
    assert "cannot tell (not judged: a paper's finding" in out
    assert "not met (not judged: a paper's finding" in out  # the contradicted one


@pytest.mark.parametrize("counts_off, growth_off", [(1, 1.0), (0, 2.0)])
def test_lesson04_checks_fail_on_unequal_budgets_or_another_growth(counts_off, growth_off):
    assert judge_04(counts_off, growth_off) == 1
