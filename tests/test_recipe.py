"""The recipe's selection on a simulated clock: the fastest candidate keeping the fidelity bar wins, by direct ratio."""
from __future__ import annotations

import itertools

import pytest

from common import meter as meter_module, recipe
from common.meter import PerformanceMeter

BAR = recipe.FidelityBar(0.99, 0.98)


def simulated_comparison(monkeypatch, seconds: dict[str, list[float]]):
    """A round-robin where each call of a workload advances a fake clock by its next scripted duration."""
    now = [0.0]
    scripts = {name: itertools.cycle(durations) for name, durations in seconds.items()}

    def workload(name: str):
        def run() -> None:
            now[0] += next(scripts[name])
        return run

    monkeypatch.setattr(meter_module.time, "perf_counter", lambda: now[0])
    return PerformanceMeter(warmup=0).compare({name: workload(name) for name in seconds}, min_rounds=7, budget_s=0)


def row(name: str, mean: float = 0.999, worst: float = 0.995, varied_mean: float = 0.999,
        varied_worst: float = 0.995) -> dict:
    return {"workload": name, "cosine_mean": mean, "cosine_min": worst, "varied_mean": varied_mean,
            "varied_min": varied_worst}


def test_the_fastest_candidate_keeping_the_bar_wins_and_a_failing_one_never_does(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {
        "fp32": [1.0], "int8": [0.30], "int8 mixed": [0.40], "ORT int8": [0.45], "encode": [1.1]})
    rows = [row("fp32"), row("int8", worst=0.93), row("int8 mixed"), row("ORT int8", varied_worst=0.97), row("encode")]
    choice = recipe.choose(rows, comparison.ratio, peers=("ORT int8", "encode"), bar=BAR)
    assert choice.winner == "int8 mixed"  # int8 is faster, but misses the bar on the corpus
    assert choice.best_peer == "encode"  # ORT int8 misses it on the varied set
    assert set(choice.excluded) == {"int8", "ORT int8"}
    assert "corpus 0.9990/0.9300" in choice.excluded["int8"] and "varied set" in choice.excluded["ORT int8"]


def test_a_peer_wins_when_it_is_the_fastest_that_keeps_the_bar(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"fp32": [1.0], "ORT int8": [0.4], "ORT fused": [0.35],
                                                    "encode": [1.0]})
    rows = [row("fp32"), row("ORT int8"), row("ORT fused"), row("encode")]
    choice = recipe.choose(rows, comparison.ratio, peers=("ORT int8", "ORT fused", "encode"), bar=BAR,
                           unavailable={"ORT fused": "onnxruntime.transformers does not import"})
    assert (choice.winner, choice.best_peer) == ("ORT int8", "encode")  # the unavailable one is excluded


def test_ranking_uses_direct_ratios_not_ratios_to_a_third(monkeypatch):
    # Per round: A and B swap which is fast, but A beats B in 4 of 7 rounds. Against C (the baseline) B's median
    # ratio is the larger, so ranking by "x baseline" would put B first; their direct ratio says A.
    comparison = simulated_comparison(monkeypatch, {
        "A": [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0], "B": [1.1, 1.1, 1.1, 1.1, 0.5, 0.5, 0.5],
        "C": [2.0, 2.0, 2.0, 1.1, 1.2, 1.2, 1.2]})
    assert comparison.ratio("B", "C")[0] > comparison.ratio("A", "C")[0]
    assert comparison.ratio("A", "B")[0] > 1
    assert recipe.fastest(["A", "B", "C"], comparison.ratio) == "A"
    pairs = recipe.pairwise(["A", "B"], comparison.ratio)
    assert pairs["A"]["B"][0] == pytest.approx(comparison.ratio("A", "B")[0]) and "A" not in pairs["A"]


def test_no_candidate_keeping_the_bar_means_no_winner():
    rows = [row("int8", worst=0.9), row("fp32", varied_mean=0.98)]
    choice = recipe.choose(rows, lambda a, b: (1.0, 1.0, 1.0), peers=(), bar=BAR)
    assert choice.winner is None and choice.best_peer is None and len(choice.excluded) == 2
    assert recipe.fastest([], lambda a, b: (1.0, 1.0, 1.0)) is None


def test_fidelity_bar_edges():
    assert BAR.keeps(0.99, 0.98) and not BAR.keeps(0.9899, 0.99) and not BAR.keeps(0.999, 0.9799)
    assert BAR.text() == "cosine mean >= 0.99 and min >= 0.98"


def test_screening_sends_our_fastest_every_qualified_peer_and_the_references_to_the_final(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {
        "int8 b32": [0.30], "int8 b64": [0.32], "int8 compiled": [0.5], "int8 failing": [0.2], "fp32": [1.0],
        "encode": [1.1], "ORT int8": [0.28], "ORT fp32": [0.7], "ORT fused": [0.25], "ORT slow": [1.5]})
    rows = [row("int8 b32"), row("int8 b64"), row("int8 compiled"), row("int8 failing", worst=0.97), row("fp32"),
            row("encode"), row("ORT int8", varied_worst=0.96), row("ORT fp32"), row("ORT fused", worst=0.95),
            row("ORT slow")]
    going, stopped = recipe.finalists(rows, comparison.ratio, peers=("encode", "ORT int8", "ORT fp32", "ORT fused",
                                                                     "ORT slow"),
                                      bar=BAR, keep=("encode", "ORT int8"))
    # the two fastest of ours and every qualified peer; the references ride along even when failing the bar
    assert going == ["int8 b32", "int8 b64", "encode", "ORT int8", "ORT fp32", "ORT slow"]  # a slow peer too
    assert set(stopped) == {"int8 compiled", "int8 failing", "fp32", "ORT fused"}
    assert stopped["int8 failing"].startswith("misses the fidelity bar")  # never a finalist, however fast
    assert stopped["ORT fused"].startswith("misses the fidelity bar")
    estimate, low, high = comparison.ratio("int8 compiled", "int8 b32")
    assert stopped["int8 compiled"] == f"{estimate:.2f}x [{low:.2f}-{high:.2f}] the speed of int8 b32"
    assert estimate == pytest.approx(0.6)
    assert recipe.ranked(["fp32", "int8 b64", "int8 b32"], comparison.ratio) == ["int8 b32", "int8 b64", "fp32"]


def test_every_batch_size_of_an_own_finalist_goes_on_since_the_sample_pads_differently(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"int8 b32": [0.3], "int8 b64": [0.9], "fp32 b32": [0.5],
                                                    "fp32 b64": [0.6], "encode": [1.0]})
    rows = [row(name) for name in ("int8 b32", "int8 b64", "fp32 b32", "fp32 b64", "encode")]
    going, stopped = recipe.finalists(rows, comparison.ratio, peers=("encode",), bar=BAR, own=1,
                                      family=lambda name: name.split(" b")[0])
    assert going == ["int8 b32", "int8 b64", "encode"]  # b64 screened slowest of ours, yet it is int8's family
    assert set(stopped) == {"fp32 b32", "fp32 b64"}


def test_screening_when_nothing_of_ours_keeps_the_bar_stops_them_all_with_the_reason(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"int8": [0.3], "int8 b64": [0.35], "encode": [1.0]})
    rows = [row("int8", worst=0.9), row("int8 b64", worst=0.9), row("encode")]
    going, stopped = recipe.finalists(rows, comparison.ratio, peers=("encode",), bar=BAR)
    assert going == ["encode"] and all(why.startswith("misses the fidelity bar") for why in stopped.values())
