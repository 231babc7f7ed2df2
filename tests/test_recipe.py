"""The recipe's selection on a simulated clock: the fastest candidate keeping the fidelity bar wins, by direct ratio;
int8 must beat the fastest exact candidate beyond +-3%; a held-out half confirms or refuses the choice."""
from __future__ import annotations

import itertools

import pytest
from transformers import BertConfig

from common import meter as meter_module, recipe
from common.batching import encoder_forward_flops
from common.meter import PerformanceMeter

BAR = recipe.FidelityBar(0.99, 0.98)
EXACT, INT8 = (1.0, 1.0), (0.995, 0.985)  # (cosine mean, min): fp32 is exact; this int8 keeps the bar


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


def test_the_fastest_candidate_keeping_the_bar_wins_and_a_failing_one_never_does(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"fp32": [1.0], "int8": [0.30], "ORT int8": [0.45],
                                                    "ORT fp32": [0.8]})
    fidelity = {"fp32": EXACT, "int8": (0.999, 0.93), "ORT int8": INT8, "ORT fp32": EXACT}
    choice = recipe.choose(list(comparison.measurements), comparison.ratio, fidelity, BAR, ("int8", "ORT int8"))
    assert (choice.winner, choice.fastest_exact, choice.fastest_approximate) == ("ORT int8", "ORT fp32", "ORT int8")
    assert choice.excluded == {"int8": "misses the fidelity bar (cosine mean 0.9990, min 0.9300)"}


def test_int8_within_the_band_of_the_fastest_exact_loses_to_it(monkeypatch):
    # 2% faster is too small to act on: the exact candidate wins though int8's estimate is higher
    comparison = simulated_comparison(monkeypatch, {"fp32": [1.0], "int8": [0.98]})
    choice = recipe.choose(["fp32", "int8"], comparison.ratio, {"fp32": EXACT, "int8": INT8}, BAR, ("int8",))
    assert comparison.ratio("int8", "fp32")[0] > 1 and choice.winner == "fp32"
    faster = simulated_comparison(monkeypatch, {"fp32": [1.0], "int8": [0.9]})
    assert recipe.choose(["fp32", "int8"], faster.ratio, {"fp32": EXACT, "int8": INT8}, BAR, ("int8",)).winner == "int8"


def test_only_int8_keeping_the_bar_wins_when_nothing_exact_can_run(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"fp32": [1.0], "int8": [1.5]})
    choice = recipe.choose(["fp32", "int8"], comparison.ratio, {"fp32": EXACT, "int8": INT8}, BAR, ("int8",),
                           unavailable={"fp32": "no backend"})
    assert choice.winner == "int8" and choice.fastest_exact is None and choice.excluded == {"fp32": "no backend"}


def test_no_candidate_keeping_the_bar_means_no_winner():
    choice = recipe.choose(["a", "b"], lambda a, b: (1.0, 1.0, 1.0), {"a": (0.9, 0.9), "b": (0.995, 0.97)}, BAR, ())
    assert choice.winner is None and len(choice.excluded) == 2
    assert recipe.fastest([], lambda a, b: (1.0, 1.0, 1.0)) is None


def test_held_out_half_confirms_a_winner_that_stays_fastest_and_in_the_bar(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"fp32": [1.0], "ORT fp32": [0.7], "OV fp32": [0.69]})
    fidelity = dict.fromkeys(comparison.measurements, EXACT)
    # OV is 1.4% faster than ORT here: within the band, so a choice of ORT made on the other half still stands
    assert recipe.confirm("ORT fp32", list(fidelity), comparison.ratio, fidelity, BAR, ()) is None
    refused = recipe.confirm("fp32", list(fidelity), comparison.ratio, fidelity, BAR, ())
    assert refused.startswith("there it runs 0.7") and refused.endswith("the speed of ORT fp32")


def test_held_out_half_refuses_int8_that_misses_the_bar_or_no_longer_beats_exact(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"fp32": [1.0], "int8": [0.99]})
    names = ["fp32", "int8"]
    assert "misses the fidelity bar there" in recipe.confirm("int8", names, comparison.ratio,
                                                             {"fp32": EXACT, "int8": (0.995, 0.979)}, BAR, ("int8",))
    slow = recipe.confirm("int8", names, comparison.ratio, {"fp32": EXACT, "int8": INT8}, BAR, ("int8",))
    assert slow is not None and slow.endswith("the speed of fp32")  # 1% faster is no longer beyond the band


def test_best_peer_is_the_fastest_other_peer_keeping_the_bar(monkeypatch):
    comparison = simulated_comparison(monkeypatch, {"ours": [0.5], "ORT": [0.6], "OV int8": [0.4], "encode": [1.0]})
    fidelity = {"ours": EXACT, "ORT": EXACT, "OV int8": (0.99, 0.97), "encode": EXACT}
    peers = ("ORT", "OV int8", "encode")
    assert recipe.best_peer(list(fidelity), comparison.ratio, fidelity, BAR, peers, "ours") == "ORT"
    assert recipe.best_peer(list(fidelity), comparison.ratio, fidelity, BAR, peers, "ORT") == "encode"


def test_ranking_uses_direct_ratios_not_ratios_to_a_third(monkeypatch):
    # Per round: A and B swap which is fast, but A beats B in 4 of 7 rounds. Against C (the baseline) B's median
    # ratio is the larger, so ranking by "x baseline" would put B first; their direct ratio says A.
    comparison = simulated_comparison(monkeypatch, {
        "A": [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0], "B": [1.1, 1.1, 1.1, 1.1, 0.5, 0.5, 0.5],
        "C": [2.0, 2.0, 2.0, 1.1, 1.2, 1.2, 1.2]})
    assert comparison.ratio("B", "C")[0] > comparison.ratio("A", "C")[0]
    assert comparison.ratio("A", "B")[0] > 1
    assert recipe.fastest(["A", "B", "C"], comparison.ratio) == "A"


def test_fidelity_bar_edges():
    assert BAR.keeps(0.99, 0.98) and not BAR.keeps(0.9899, 0.99) and not BAR.keeps(0.999, 0.9799)
    assert BAR.text() == "cosine mean >= 0.99 and min >= 0.98"


def test_pass_work_counts_real_tokens_only_and_weights_once_per_batch():
    config = BertConfig(hidden_size=8, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    useful, moved = recipe.pass_work(config, [3, 5, 4], batch_size=2, weight_bytes=1000)
    assert useful == pytest.approx(sum(encoder_forward_flops(config, 1, n) for n in (3, 5, 4)))
    assert 2000 < moved < 2000 + 4 * 2 * 3 * 5 * (10 * 8 + 2 * 32 + 4 * 5)  # two batches: the weights twice
