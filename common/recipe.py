"""Choosing what to ship from round-robins: which candidates keep the fidelity bar, which is fastest, and whether a
held-out half of the texts confirms the choice.

Every ranking uses the paired per-round ratio between the two candidates themselves (Comparison.ratio), never each
one's ratio to a third: medians of ratios do not compose, so "A is 2.3x the baseline and B 2.2x" can sit beside
"A is 0.89x B" in the same run. Rows that were not timed in the same round-robin are never ranked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

from common.batching import encoder_forward_bytes, encoder_forward_flops, make_batches
from common.meter import SAME_BAND

Ratio = Callable[[str, str], tuple[float, float, float]]  # (a, b) -> how many times faster a is than b, low, high
Fidelity = dict[str, tuple[float, float]]  # candidate -> (cosine mean, cosine min) against the reference


@dataclass(frozen=True)
class FidelityBar:
    """The fidelity every recommendation must keep: embedding cosine mean and worst text against the reference."""

    mean: float = 0.99
    worst: float = 0.98

    def keeps(self, cosine_mean: float, cosine_min: float) -> bool:
        """True when both the mean and the worst text reach the bar."""
        return cosine_mean >= self.mean and cosine_min >= self.worst

    def text(self) -> str:
        """The bar in words, as tables and bars quote it."""
        return f"cosine mean >= {self.mean} and min >= {self.worst}"


def ranked(names: Sequence[str], ratio: Ratio) -> list[str]:
    """The candidates fastest first: by how many others each is faster than by their direct paired ratio (Copeland
    count), ties by the larger geometric mean of those ratios."""
    def score(name: str) -> tuple[int, float]:
        others = [ratio(name, other)[0] for other in names if other != name]
        return sum(r > 1 for r in others), sum(math.log(r) for r in others)

    return sorted(names, key=score, reverse=True)


def fastest(names: Sequence[str], ratio: Ratio) -> str | None:
    """The first of `ranked`: the candidate faster than the most others by direct ratio (None when there are none)."""
    return next(iter(ranked(names, ratio)), None)


def beyond_band(ratio: tuple[float, float, float]) -> bool:
    """True when the whole interval says faster by more than the +-3% too small to act on."""
    return ratio[1] > 1 + SAME_BAND


@dataclass
class Choice:
    """What one round-robin picks: the winner, the fastest exact and the fastest approximate candidate that keep
    the bar, and why each excluded candidate cannot win."""

    winner: str | None
    fastest_exact: str | None
    fastest_approximate: str | None
    excluded: dict[str, str] = field(default_factory=dict)


def choose(names: Sequence[str], ratio: Ratio, fidelity: Fidelity, bar: FidelityBar,
           approximate: Collection[str], unavailable: dict[str, str] | None = None) -> Choice:
    """Winner = the fastest candidate keeping the bar, except that an approximate one (int8) beats the fastest exact
    one only when faster beyond the +-3% band: a speed-up too small to act on does not pay for lost fidelity."""
    excluded = dict(unavailable or {})
    for name in names:
        mean, worst = fidelity[name]
        if name not in excluded and not bar.keeps(mean, worst):
            excluded[name] = f"misses the fidelity bar (cosine mean {mean:.4f}, min {worst:.4f})"
    qualified = [name for name in names if name not in excluded]
    exact = fastest([name for name in qualified if name not in approximate], ratio)
    approx = fastest([name for name in qualified if name in approximate], ratio)
    winner = exact if exact and (not approx or not beyond_band(ratio(approx, exact))) else approx
    return Choice(winner, exact, approx, excluded)


def confirm(winner: str, names: Sequence[str], ratio: Ratio, fidelity: Fidelity, bar: FidelityBar,
            approximate: Collection[str]) -> str | None:
    """Why the held-out half does NOT confirm the winner chosen on the other half (None when it does): it must keep
    the bar there, and no other candidate keeping the bar may be faster than it beyond the band (an approximate
    winner must also stay faster beyond the band than every exact one)."""
    if not bar.keeps(*fidelity[winner]):
        return f"it misses the fidelity bar there (cosine mean {fidelity[winner][0]:.4f}, min {fidelity[winner][1]:.4f})"
    for other in names:
        if other == winner or not bar.keeps(*fidelity[other]):
            continue
        if beyond_band(ratio(other, winner)) or (winner in approximate and other not in approximate
                                                 and not beyond_band(ratio(winner, other))):
            estimate, low, high = ratio(winner, other)
            return f"there it runs {estimate:.2f}x [{low:.2f}-{high:.2f}] the speed of {other}"
    return None


def best_peer(names: Sequence[str], ratio: Ratio, fidelity: Fidelity, bar: FidelityBar, peers: Collection[str],
              winner: str) -> str | None:
    """The fastest peer runtime other than the winner that keeps the bar: what the recipe bar compares with."""
    return fastest([name for name in names if name in peers and name != winner and bar.keeps(*fidelity[name])],
                   ratio)


def pass_work(config: Any, lengths: Sequence[int], batch_size: int, weight_bytes: int) -> tuple[float, float]:
    """One length-sorted pass over texts of these token lengths: the useful matmul FLOPs (real tokens only, each text
    as if alone, never padding) and a floor on the bytes it moves (weights once per batch, activations once)."""
    groups = make_batches(lengths, batch_size, sort_by_length=True)
    useful = sum(encoder_forward_flops(config, 1, length) for length in lengths)
    moved = sum(encoder_forward_bytes(config, len(group), max(lengths[i] for i in group), weight_bytes, 4)
                for group in groups)
    return useful, moved
