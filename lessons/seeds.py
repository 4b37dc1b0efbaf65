"""Seeds behind every comparison: repeat a measurement over seeds, summarize it, and let the
numbers decide what may be concluded.

One fine-tuning run is one draw. Its seed picks lora_A's initialization, the order of the
training batches and the test prompts (the test *words* are fixed; tiny_gpt/tasks.py), and two
runs of one recipe that differ only there can land several points apart. So a lesson runs each
recipe once per seed (``--seeds N``, the seeds ``--seed``, ``--seed`` + 1, ...) and reports

    Spread       one quantity over the seeds: its mean, with the min and max, and n;
    compare      two recipes measured on the same seeds, paired: d_s = a_s - b_s per seed, and
                 the 95% Student-t interval of their mean,

                     mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n)

                 which is what the verdict reads: "a is higher" only when the whole interval
                 is above zero, "lower" when below, and otherwise that no difference is
                 measurable at this budget;
    within       "a is within X of b" only when the whole interval lies inside [-X, X] (and
                 "more than X apart" only when it lies entirely outside);
    Trials       the recipe x seeds loop of every comparing lesson: each (recipe, seed) is
                 trained once and kept, and a recipe's numbers come back as Spreads.

Pairing by seed removes what the two recipes share (the same test prompts, the same batch
order), so a small but steady difference can show where the two spreads overlap. With three
seeds t is 4.30: an interval is wide unless the seeds agree closely, and the verdict says
"cannot tell" rather than guess.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1 .. 30, from the published
# tables (tests/test_seeds.py integrates torch's Student-t density to check every entry).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
QUICK_SEEDS = 2  # --quick: two seeds, enough to run every line of the harness


def add_seeds_flag(parser, default: int = 3) -> None:
    """--seeds N for a lesson that compares recipes (N >= 1; --quick uses 2 unless given)."""
    from .common import whole_number
    parser.add_argument("--seeds", type=whole_number(1), default=None,
                        help=f"seeds per recipe for every comparison (default {default}; "
                             f"--quick: {QUICK_SEEDS})")
    parser.set_defaults(default_seeds=default)


def seeds_of(args) -> List[int]:
    """The seeds a lesson runs: --seed, --seed + 1, ..., --seeds of them."""
    from .common import choose_budget
    n = args.seeds or choose_budget(args, args.default_seeds, QUICK_SEEDS)
    return [args.seed + k for k in range(n)]


def t_quantile(df: int) -> float:
    """t(0.975, df); beyond the table, its last entry (a little wider than the true value)."""
    if df < 1:
        raise ValueError(f"an interval needs at least 2 values (df >= 1), got df = {df}")
    return T_975[min(df, len(T_975)) - 1]


@dataclass(frozen=True)
class Spread:
    """One quantity measured once per seed, in the order of the seeds."""
    values: tuple

    def __post_init__(self):
        if not self.values:
            raise ValueError("a Spread needs at least one value")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def show(self, scale: float = 1.0, fmt: str = "{:.1f}", unit: str = "") -> str:
        """'95.3% [94.0, 97.0] n=3': the mean, then min and max, then how many seeds."""
        m, lo, hi = (fmt.format(scale * v) for v in (self.mean, self.lo, self.hi))
        if self.n == 1:
            return f"{m}{unit} (n=1)"
        return f"{m}{unit} [{lo}, {hi}] n={self.n}"

    def percent(self) -> str:
        """A fraction shown in percent: '95.3% [94.0, 97.0] n=3'."""
        return self.show(100.0, "{:.1f}", "%")


def over_seeds(seeds: Sequence[int], measure: Callable[[int], Dict[str, float]]
               ) -> Dict[str, Spread]:
    """measure(seed) -> {name: number}, called once per seed -> {name: Spread}."""
    runs = [measure(seed) for seed in seeds]
    return {name: Spread(tuple(run[name] for run in runs)) for name in runs[0]}


class Trials:
    """The recipe x seeds loop: train(recipe, seed) -> {name: value} runs once per distinct
    (key(recipe), seed) and its row is kept, so the tables that show one recipe share its runs.

        trials = Trials(seeds, train)
        trials.spreads(recipe)        {name: Spread} of the row's numbers over the seeds
        trials.one(recipe, seed)      one seed's row (a model, a curve: whatever train kept)
        len(trials)                   how many runs were trained
    """

    def __init__(self, seeds: Sequence[int], train: Callable, key: Callable = lambda r: r):
        self.seeds, self.train, self.key, self.done = list(seeds), train, key, {}

    def one(self, recipe, seed: int) -> dict:
        found = (self.key(recipe), seed)
        if found not in self.done:
            self.done[found] = self.train(recipe, seed)
        return self.done[found]

    def spreads(self, recipe, names: Optional[Sequence[str]] = None) -> Dict[str, Spread]:
        """{name: Spread} over the seeds, of the numbers named (default: every int or float
        the runs returned)."""
        def measure(seed):
            row = self.one(recipe, seed)
            keep = names or [k for k, v in row.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)]
            return {k: row[k] for k in keep}
        return over_seeds(self.seeds, measure)

    def __len__(self) -> int:
        return len(self.done)


@dataclass(frozen=True)
class Interval:
    """The 95% t-interval of the mean paired difference a - b (None when n = 1)."""
    mean: float
    lo: Optional[float]
    hi: Optional[float]
    n: int

    def show(self, scale: float = 1.0, unit: str = "", fmt: str = "{:+.1f}") -> str:
        m = fmt.format(scale * self.mean)
        if self.lo is None:
            return f"{m}{unit} (n=1, no interval)"
        lo, hi = fmt.format(scale * self.lo), fmt.format(scale * self.hi)
        return f"{m}{unit}, 95% CI [{lo}, {hi}] n={self.n}"


def paired_interval(a: Spread, b: Spread) -> Interval:
    """mean(d) +- t * sd(d) / sqrt(n) over d_s = a_s - b_s, the seeds paired in order."""
    if a.n != b.n:
        raise ValueError(f"paired spreads need the same seeds, got n = {a.n} and n = {b.n}")
    d = [x - y for x, y in zip(a.values, b.values)]
    mean = sum(d) / len(d)
    if len(d) == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
    half = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
    return Interval(mean, mean - half, mean + half, len(d))


@dataclass(frozen=True)
class Verdict:
    """What the numbers allow: holds True (shown), False (contradicted) or None (cannot tell)."""
    holds: Optional[bool]
    text: str


def compare(a: Spread, b: Spread, name_a: str, name_b: str, scale: float = 100.0,
            unit: str = " points", fmt: str = "{:+.1f}") -> Verdict:
    """Is a higher than b? True: the interval of a - b lies above 0; False: below 0 (b is
    higher); None: it contains 0, so no difference is measurable at this budget."""
    ci = paired_interval(a, b)
    shown = ci.show(scale, unit, fmt)
    if ci.lo is not None and ci.lo > 0:
        return Verdict(True, f"{name_a} higher than {name_b}: {shown}")
    if ci.hi is not None and ci.hi < 0:
        return Verdict(False, f"{name_a} lower than {name_b}: {shown}")
    return Verdict(None, f"no difference measurable between {name_a} and {name_b} at this "
                         f"budget: {shown}")


def within(a: Spread, b: Spread, margin: float, name_a: str, name_b: str,
           scale: float = 100.0, unit: str = " points") -> Verdict:
    """Is a within `margin` of b? True: the interval of a - b lies inside [-margin, margin];
    False: it lies entirely outside; None: it straddles a bound (cannot tell)."""
    ci = paired_interval(a, b)
    bound = f"{scale * margin:g}{unit}"
    if ci.lo is None:
        return Verdict(None, f"one seed cannot tell whether {name_a} is within {bound} of "
                             f"{name_b}: {ci.show(scale, unit)}")
    if -margin <= ci.lo and ci.hi <= margin:
        return Verdict(True, f"{name_a} within {bound} of {name_b}: {ci.show(scale, unit)}")
    if ci.hi < -margin or ci.lo > margin:
        return Verdict(False, f"{name_a} more than {bound} from {name_b}: "
                              f"{ci.show(scale, unit)}")
    return Verdict(None, f"cannot tell whether {name_a} is within {bound} of {name_b} at "
                         f"this budget: {ci.show(scale, unit)}")


def in_words(verdict: Verdict, shown: str, contradicted: str, cannot_tell: str) -> str:
    """The sentence a Verdict allows: `shown` where it holds, `contradicted` where the interval
    says the opposite, `cannot_tell` where it cannot decide -- followed by the interval. The
    interval is of a - b, the order `shown` names; under the contradicting sentence, which
    names b first, it comes with the verdict's own words, so that its sign is not misread."""
    said = {True: shown, False: contradicted, None: cannot_tell}[verdict.holds]
    if verdict.holds is False:
        return f"{said} ({verdict.text})"
    return f"{said} ({verdict.text.rsplit(': ', 1)[-1]})"


def print_verdicts(title: Optional[str], verdicts) -> None:
    """Print what the intervals allow, one verdict (or sentence) a line, under a title (None:
    right under the table above)."""
    if title:
        print(f"{title}:")
    for v in verdicts:
        print(f"  {v if isinstance(v, str) else v.text}")
    print()


def rank(spreads: Dict[str, Spread], scale: float = 100.0, unit: str = " points") -> List[str]:
    """Lines that say, for the best recipe by mean against each other one, what the intervals
    allow: a ranking is only as fine as the differences that are measurable."""
    order = sorted(spreads, key=lambda k: spreads[k].mean, reverse=True)
    best = order[0]
    return [compare(spreads[best], spreads[other], best, other, scale, unit).text
            for other in order[1:]]


def errorbars(ax, labels: Sequence[str], spreads: Sequence[Spread], scale: float = 100.0,
              **style) -> None:
    """Bars at the means with whiskers from min to max, one per label, and every seed's value
    as a dot."""
    xs = range(len(labels))
    means = [scale * s.mean for s in spreads]
    lower = [scale * (s.mean - s.lo) for s in spreads]
    upper = [scale * (s.hi - s.mean) for s in spreads]
    ax.bar(xs, means, yerr=[lower, upper], capsize=4, alpha=0.7, **style)
    for x, s in zip(xs, spreads):
        ax.plot([x] * s.n, [scale * v for v in s.values], "k.", ms=4)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=20, fontsize=7)
