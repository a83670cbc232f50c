"""Statistics over repeated runs: mean, spread and a t-interval, and the paired difference that
decides whether one setting beats another (paired by seed: same split, data order and init).

A comparison is a claim only when the paired difference's interval excludes zero; otherwise the
wording is "no measurable difference at n = ..." with the interval, so conclusions never outrun
the noise. Two fitted models scored on the same images pair by image instead (``paired_images``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
NO_DIFFERENCE = "No measurable difference"  # how a verdict within the noise starts
IDENTICAL = "give identical"  # a verdict on settings whose every paired difference is zero


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and the two-sided t confidence interval of the mean."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        """``0.812 ± 0.021 [0.786, 0.838]``; one value alone has no spread."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n = 1)"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of ``values`` (independent repeats). NaN values are dropped;
    fewer than two values give no interval (NaN bounds)."""
    data = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(data)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(data) / n
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1))
    half = scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def paired_difference(a: dict[object, float], b: dict[object, float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean of a[k] - b[k] over the keys (seeds) both have."""
    keys = sorted(set(a) & set(b), key=str)
    if not keys:
        raise ValueError("the two settings share no seed to pair on")
    return t_interval([a[k] - b[k] for k in keys], confidence)


def _signed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, or two significant digits when those would print 0.000
    (a difference of float rounding must not read as zero, nor as a difference that matters)."""
    return f"{value:+.{digits}f}" if value == 0 or abs(value) >= 10 ** -digits else f"{value:+.2g}"


def verdict(name_a: str, name_b: str, difference: Interval, what: str, digits: int = 3,
            higher_is_better: bool = True) -> str:
    """One sentence: "A beats B" / "A trails B" only when the interval excludes zero. The
    difference is A - B; for a measure where lower is better (a loss) a negative one beats."""
    d = difference
    numbers = (_signed(d.mean, digits) if d.n < 2 else
               f"{_signed(d.mean, digits)} (95% CI {_signed(d.low, digits)} to {_signed(d.high, digits)}, n = {d.n} pairs)")
    if d.n > 1 and d.sd == 0:
        numbers = f"{_signed(d.mean, digits)} in every one of n = {d.n} pairs"
        if d.mean == 0:
            return f"{name_a} and {name_b} {IDENTICAL} {what} ({numbers})."
    if d.excludes_zero():
        better = d.mean > 0 if higher_is_better else d.mean < 0
        return f"{name_a} {'beats' if better else 'trails'} {name_b} on {what}: {numbers}."
    return f"{NO_DIFFERENCE} between {name_a} and {name_b} on {what} at n = {d.n}: {numbers}."


def is_claim(line: str) -> bool:
    """Whether a verdict line states a difference beyond the noise."""
    return " beats " in line or " trails " in line


@dataclass(frozen=True)
class PairedImages:
    """Two models scored on the same images: the images only one of them gets right, and the exact
    McNemar test on those (the images both get right, or both wrong, say nothing of which is better)."""

    n: int
    accuracy_a: float
    accuracy_b: float
    only_a: int
    only_b: int
    p: float

    def text(self) -> str:
        return (f"{self.accuracy_a:.3f} vs {self.accuracy_b:.3f} on {self.n} images; {self.only_a} right only by the "
                f"first, {self.only_b} only by the second; exact McNemar p = {self.p:.3g}")


def paired_images(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> PairedImages:
    """``PairedImages`` of two models' per-image correctness, in the same image order."""
    if len(a_correct) != len(b_correct) or not len(a_correct):
        raise ValueError(f"need the same images, at least one, for both models: got {len(a_correct)} and {len(b_correct)}")
    only_a = sum(bool(a) and not b for a, b in zip(a_correct, b_correct))
    only_b = sum(bool(b) and not a for a, b in zip(a_correct, b_correct))
    discordant = only_a + only_b
    p = scipy_stats.binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    n = len(a_correct)
    return PairedImages(n, sum(map(bool, a_correct)) / n, sum(map(bool, b_correct)) / n, only_a, only_b, min(1.0, float(p)))


def images_verdict(name_a: str, name_b: str, paired: PairedImages, what: str, alpha: float = 1 - CONFIDENCE) -> str:
    """One sentence on a per-image comparison, a claim only when McNemar's p is below ``alpha``."""
    numbers = f"{_signed(paired.accuracy_a - paired.accuracy_b, 3)} ({paired.text()})"
    if paired.only_a == paired.only_b == 0:
        return f"{name_a} and {name_b} are right on the same images of {what} (all {paired.n}: no difference to test)."
    if paired.p < alpha:
        return f"{name_a} {'beats' if paired.only_a > paired.only_b else 'trails'} {name_b} on {what}: {numbers}."
    return f"{NO_DIFFERENCE} between {name_a} and {name_b} on {what} at n = {paired.n} images: {numbers}."
