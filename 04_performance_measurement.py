#!/usr/bin/env python3
"""04 · Performance measurement: the PerformanceMeter as an instrument you can trust and cite.

Checks the meter against torch.utils.benchmark, then benchmarks model loads, four pipeline tasks, batch sizes and
devices, re-measures the seed's DistilBERT/BERT table, and writes report.json, results.csv and report.md that a
later run can `--compare` against, flagging only changes outside the 95% confidence intervals.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.benchmark import Timer
from tqdm import tqdm
from transformers import pipeline
from transformers.utils import logging as hf_logging

from common import cli, models, pipelines, plots, texts
from common.device import mps_available
from common.errors import UserError
from common.memory import MIB, cleanup, rss_bytes
from common.meter import LoadMeasurement, Measurement, PerformanceMeter, Stats, measure_generation
from common.report import REPORT_VERSION, print_table

# Settings, nanoGPT bench.py style: plain constants, the --quick variant next to each.
WARMUP, QUICK_WARMUP = 2, 1  # untimed calls first: lazy init, allocator growth and cold caches
MIN_RUNS, QUICK_MIN_RUNS = 10, 5  # at least this many timed calls ...
BUDGET_S, QUICK_BUDGET_S = 1.5, 0.3  # ... and keep repeating until this much time has passed
OVERHEAD_RUNS = 2000  # empty calls timed to measure the meter's own cost
OVERHEAD_TARGET_S = 50e-6
INSTRUMENT_ROUNDS, QUICK_INSTRUMENT_ROUNDS = 6, 4  # meter and Timer alternate, so drift hits both alike ...
INSTRUMENT_ROUND_S, QUICK_INSTRUMENT_ROUND_S = 0.5, 0.2  # ... in short rounds of about this long each
INSTRUMENT_TOLERANCE = 0.05
LOAD_ROLES = ["encoder", "decoder", "seq2seq", "distilbert-base-uncased", "bert-base-uncased"]
QUICK_LOAD_ROLES = ["encoder", "seq2seq"]
TASK_TEXTS = 8  # texts per call for the encoder-style tasks
NEW_TOKENS, QUICK_NEW_TOKENS = 16, 8  # tokens generated per call for the generation tasks
PROMPT = "The best way to measure the speed of a language model is"
SWEEP_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
QUICK_SWEEP_BATCH_SIZES = [1, 2, 4, 8]
MEMORY_FRACTION = 0.5  # stop the sweep before a batch is predicted to need more than this share of free memory
MIN_KNEE_BEND = 0.1  # a curve must bulge this far (in normalised units) above its chord to have a knee
SEED_INPUT_TOKENS = 128
# The seed write-up's "typical performance (example system)" table: another machine, input shape not given.
SEED_TABLE = [
    {"model": "DistilBERT", "role": "distilbert-base-uncased", "device": "CPU", "time_s": 0.045, "memory_gb": 1.2},
    {"model": "DistilBERT", "role": "distilbert-base-uncased", "device": "GPU", "time_s": 0.012, "memory_gb": 2.1},
    {"model": "BERT-base", "role": "bert-base-uncased", "device": "CPU", "time_s": 0.089, "memory_gb": 2.1},
    {"model": "BERT-base", "role": "bert-base-uncased", "device": "GPU", "time_s": 0.021, "memory_gb": 3.2},
]


SCRIPT = Path(__file__).stem
# The first load of each model in this process: the only load that is truly cold (imports, first file reads).
FIRST_LOADS: dict[str, LoadMeasurement] = {}


# ------------------------------------------------------------------------------------------------ helpers


def make_meter(ctx: cli.Context, device: torch.device | str | None = None) -> PerformanceMeter:
    """A meter with this run's warm-up, repeat count and time budget."""
    return PerformanceMeter(
        device if device is not None else ctx.device,
        warmup=QUICK_WARMUP if ctx.quick else WARMUP,
        min_runs=QUICK_MIN_RUNS if ctx.quick else MIN_RUNS,
        budget_s=QUICK_BUDGET_S if ctx.quick else BUDGET_S,
    )


def load(ctx: cli.Context, role: str, device: torch.device | str | None = None) -> models.LoadedModel:
    """Load a role through the catalog, timing the load; the first load per model and device is kept as cold."""
    device = torch.device(device if device is not None else ctx.device)
    loaded, timing = PerformanceMeter(device).time_load(
        role, lambda: models.load_model(role, source=ctx.source, device=device))
    FIRST_LOADS.setdefault(f"{role}@{device}", timing)
    ctx.report.add_model(loaded.info.to_dict())
    return loaded


def load_classifier(ctx: cli.Context, device: torch.device | str | None = None):
    """The classifier role as a pipeline; offline it is the registered embedding-classification stand-in."""
    classifier, info = models.load_classifier(source=ctx.source, device=device if device is not None else ctx.device)
    ctx.report.add_model(info.to_dict())
    if info.source != "hub":
        print("(offline: the classifier role is the registered 'embedding-classification' stand-in, MiniLM plus "
              "similarity to example sentences, not a fine-tuned DistilBERT; its speed is a MiniLM encoder's)")
    return classifier, info


def weights_mib(model: torch.nn.Module) -> float:
    """Bytes held by parameters and buffers, counted exactly."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def real_tokens(tokenizer, batch: list[str]) -> int:
    """Tokens the model really processes for these texts, specials included and padding excluded."""
    return sum(len(ids) for ids in tokenizer(batch, truncation=True)["input_ids"])


def measurement_row(m: Measurement, measurement: str, model: str, device: torch.device | str,
                    batch: int | None) -> dict:
    """One tidy results.csv row: the labels that identify the measurement, then every number from its samples."""
    on_cuda = torch.device(device).type == "cuda"
    return {
        **stats_row(m.stats, measurement, model, device, batch),
        "texts_per_s": m.items_per_s, "tokens_per_s": m.tokens_per_s,
        "peak_rss_mib": m.peak_rss_bytes / MIB, "peak_rss_delta_mib": m.peak_rss_delta_bytes / MIB,
        "cuda_alloc_mib": m.peak_cuda_allocated_bytes / MIB if on_cuda else None,
        "cuda_reserved_mib": m.peak_cuda_reserved_bytes / MIB if on_cuda else None,
        "cpu_util_pct": m.cpu_util_pct, "gpu_util_pct": m.gpu_util_pct, "noisy": m.noisy,
    }


def stats_row(stats: Stats, measurement: str, model: str, device: torch.device | str, batch: int | None) -> dict:
    """A results.csv row for samples timed outside the meter (no throughput or memory)."""
    return {"measurement": measurement, "model": model, "device": str(device), "batch": batch, "runs": stats.count,
            "p50_ms": stats.median * 1e3, "p90_ms": stats.p90 * 1e3, "p99_ms": stats.p99 * 1e3,
            "ci95_low_ms": stats.ci95_low * 1e3, "ci95_high_ms": stats.ci95_high * 1e3, "iqr_ms": stats.iqr * 1e3}


def load_row(timing: LoadMeasurement, measurement: str, model: str, device: str) -> dict:
    """A model load as a results.csv row: one sample, so no percentiles or confidence interval."""
    return {"measurement": measurement, "model": model, "device": device, "batch": None, "runs": 1,
            "p50_ms": timing.seconds * 1e3, "peak_rss_mib": timing.peak_rss_bytes / MIB,
            "peak_rss_delta_mib": timing.peak_rss_delta_bytes / MIB}


def warn_if_noisy(*measurements: Measurement) -> None:
    """Print the meter's noise warnings, so a reader knows which ratios to distrust."""
    for m in measurements:
        for warning in m.warnings:
            print(f"[noise] {warning}")


def available_devices() -> tuple[list[torch.device], dict[str, str]]:
    """Every device this torch can run on (CPU always), and why each missing one is missing."""
    devices, missing = [torch.device("cpu")], {}
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    else:
        missing["cuda"] = f"this torch ({torch.__version__}) sees no CUDA GPU"
    if mps_available():
        devices.append(torch.device("mps"))
    else:
        missing["mps"] = "Apple's MPS backend is not available (it exists only on Apple-silicon Macs)"
    return devices, missing


def find_knee(xs: list[float], ys: list[float]) -> float | None:
    """The x where y stops growing in proportion, or None for a curve without a clear bend.

    Kneedle on a log2 x axis (batch sizes double): normalise both axes to [0, 1], draw the chord from the first
    to the last point, and return the point that bulges furthest above it, if it bulges at least MIN_KNEE_BEND.
    """
    if len(xs) != len(ys) or len(xs) < 3 or min(xs) <= 0:
        return None
    x = np.log2(np.asarray(xs, dtype=float))
    y = np.asarray(ys, dtype=float)
    if x[-1] == x[0] or y.max() == y.min():
        return None
    x_norm = (x - x[0]) / (x[-1] - x[0])
    y_norm = (y - y.min()) / (y.max() - y.min())
    bulge = y_norm - (y_norm[0] + (y_norm[-1] - y_norm[0]) * x_norm)
    best = int(np.argmax(bulge))
    return xs[best] if bulge[best] >= MIN_KNEE_BEND else None


def compare_measurements(previous_rows: list[dict], current_rows: list[dict]) -> list[dict]:
    """For every measurement present in both runs: the p50 ratio now/before, flagged when the 95% CIs separate."""
    def key(row: dict) -> tuple:
        return row.get("section"), row.get("measurement"), row.get("model"), row.get("device"), row.get("batch")

    before = {key(row): row for row in previous_rows}
    compared = []
    for row in current_rows:
        old = before.get(key(row))
        if old is None or not old.get("p50_ms") or row.get("p50_ms") is None:
            continue
        bounds = [old.get("ci95_low_ms"), old.get("ci95_high_ms"), row.get("ci95_low_ms"), row.get("ci95_high_ms")]
        if any(bound is None for bound in bounds):
            verdict = "no CI (one sample)"
        elif row["ci95_low_ms"] > old["ci95_high_ms"]:
            verdict = "SLOWER"
        elif row["ci95_high_ms"] < old["ci95_low_ms"]:
            verdict = "FASTER"
        else:
            verdict = "within CI"
        compared.append({
            "section": row.get("section"), "measurement": row.get("measurement"), "model": row.get("model"),
            "device": row.get("device"), "batch": row.get("batch"), "before_p50_ms": old["p50_ms"],
            "now_p50_ms": row["p50_ms"], "ratio": row["p50_ms"] / old["p50_ms"], "verdict": verdict,
            "flagged": verdict in ("SLOWER", "FASTER"),
        })
    return compared


def load_previous_report(path: Path) -> dict:
    """Read a previous run's report.json for --compare, refusing anything that is not a compatible report."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--compare {path}: no such file (give a report.json written by {SCRIPT}.py)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--compare {path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"--compare {path}: not JSON ({error.msg} at line {error.lineno})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or data.get("script") != SCRIPT or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"--compare {path}: not a report.json written by {SCRIPT}.py")
    if data.get("report_version") != REPORT_VERSION:
        raise UserError(f"--compare {path}: report version {data.get('report_version')!r} is incompatible with "
                        f"this script's version {REPORT_VERSION}; re-run the previous version to compare")
    return data


# ------------------------------------------------------------------------------------------------- charts


def draw_latency(ax, tasks: list[dict], samples: dict[str, list[float]]) -> None:
    """Box plot of every call's latency per task (log scale: generation is slower by orders of magnitude)."""
    ax.boxplot([samples[task["task"]] for task in tasks], showfliers=True)
    ax.set_xticks(range(1, len(tasks) + 1), [f"{task['task']}\n({task['per_call']})" for task in tasks], fontsize=8)
    ax.set_yscale("log")
    ax.set_title("Latency of one call per task (box: IQR, line: median)")
    ax.set_ylabel("latency per call (ms, log scale)")
    ax.set_xlabel("task (work done per call)")


def draw_memory(ax, tasks: list[dict]) -> None:
    """Weights beside the process memory the task really added; CUDA peak beside them when present."""
    positions = np.arange(len(tasks))
    series = [("model weights (exact)", [task["weights_mib"] for task in tasks]),
              ("RSS added: peak during calls - before load", [task["rss_added_mib"] for task in tasks])]
    if any(task["cuda_alloc_mib"] is not None for task in tasks):
        series.append(("CUDA peak allocated", [task["cuda_alloc_mib"] or 0 for task in tasks]))
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series):
        ax.bar(positions + (index - (len(series) - 1) / 2) * width, values, width=width, label=label)
    ax.set_xticks(positions, [task["task"] for task in tasks], fontsize=8)
    ax.set_title("Memory per task")
    ax.set_ylabel("memory (MiB)")
    ax.set_xlabel("task")
    ax.legend(fontsize=8)


def set_batch_axis(ax, sweeps) -> None:
    """A log2 x axis ticked at the batch sizes measured, written as plain numbers."""
    batches = sorted({row["batch"] for sweep in sweeps for row in sweep["table"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(batch) for batch in batches])
    ax.minorticks_off()


def draw_sweep(ax, sweeps) -> None:
    """Throughput against batch size per model, the knee starred."""
    for sweep in sweeps:
        batches = [row["batch"] for row in sweep["table"]]
        line, = ax.plot(batches, [row["texts_per_s"] for row in sweep["table"]], marker="o", label=sweep["role"])
        if sweep["knee_batch"] is not None:
            knee = next(row for row in sweep["table"] if row["batch"] == sweep["knee_batch"])
            ax.plot([knee["batch"]], [knee["texts_per_s"]], marker="*", markersize=16, color=line.get_color(),
                    linestyle="none", label=f"{sweep['role']} knee (batch {knee['batch']})")
    set_batch_axis(ax, sweeps)
    ax.set_title("Throughput vs batch size")
    ax.set_xlabel("batch size (texts per call, log2 scale)")
    ax.set_ylabel("throughput (texts/s)")
    ax.legend(fontsize=8)


def draw_devices(ax, rows: list[dict]) -> None:
    """Median latency per device with the IQR as the error bar."""
    labels = [row["device"] for row in rows]
    bars = ax.bar(labels, [row["p50_ms"] for row in rows], yerr=[row["iqr_ms"] / 2 for row in rows], capsize=6,
                  width=0.5)
    ax.bar_label(bars, [f"{row['texts_per_s']:.1f} texts/s" for row in rows], label_type="center", color="white")
    ax.set_xlim(-0.75, max(len(rows), 2) - 0.25)  # keep one lone bar from filling the whole chart
    ax.set_title(f"Same workload on every device ({rows[0]['per_call']})" if rows else "Devices")
    ax.set_xlabel("device")
    ax.set_ylabel("median latency per call (ms; bar: IQR)")


def draw_seed_table(ax, rows: list[dict]) -> None:
    """Our measured time next to the seed's published one, per model and device."""
    positions = np.arange(len(rows))
    measured = [i for i, row in enumerate(rows) if row["ours_time_s"] is not None]
    ax.bar(positions[measured] - 0.2, [rows[i]["ours_time_s"] * 1e3 for i in measured], width=0.4,
           label="this run, this machine")
    ax.bar(positions + 0.2, [row["seed_time_s"] * 1e3 for row in rows], width=0.4, label="seed (another machine)")
    for i in sorted(set(range(len(rows))) - set(measured)):
        ax.annotate("not\nmeasured\nhere", (positions[i] - 0.2, rows[i]["seed_time_s"] * 1e3), ha="center",
                    va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(positions, [f"{row['model']}\n{row['device']}" for row in rows], fontsize=8)
    ax.set_title(f"The seed's table: forward pass {rows[0]['input_shape'] if rows else ''}")
    ax.set_xlabel("model and device")
    ax.set_ylabel("inference time (ms, log scale)")
    ax.legend(fontsize=8)


def save_chart(ctx: cli.Context, name: str, draw, *data) -> Path:
    """Draw one chart on its own figure, save it and list it in the report."""
    fig, ax = plots.plt.subplots()
    draw(ax, *data)
    path = plots.save(fig, ctx.out_dir, name)
    ctx.report.add_chart(path)
    return path


# ----------------------------------------------------------------------------------------------- sections


def meet_the_meter_section(ctx: cli.Context) -> dict:
    """One pipeline call measured and explained, the meter's own overhead, and a cross-check with torch's Timer."""
    loaded = load(ctx, "encoder")
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer)
    # A call of tens of milliseconds: long enough that Timer times single calls too (its blocks would average them).
    batch = texts.repeated_sentences(TASK_TEXTS)
    workload = f"feature-extraction pipeline, {len(batch)} sentences in one call, {ctx.device}"

    def call():
        return extractor(batch, batch_size=len(batch), return_tensors=True)

    meter = make_meter(ctx)
    m = meter.measure(workload, call, items=len(batch), tokens=real_tokens(loaded.tokenizer, batch))
    s = m.stats
    sync = ("torch.cuda/mps.synchronize() after every call, so the clock stops when the GPU is done"
            if ctx.device.type in ("cuda", "mps") else "not needed on CPU: the call returns when the work is done")
    print(f"workload: {workload}")
    print(f"  warm-up       {meter.warmup} untimed call(s) first (lazy init, allocator growth, cold caches)")
    print(f"  sync          {sync}")
    print(f"  repeats       {s.count} timed calls: at least {meter.min_runs} and until {meter.budget_s:g} s passed "
          f"(took {m.wall_s:.2f} s)")
    print(f"  percentiles   p50 {s.median * 1e3:.2f} ms  p90 {s.p90 * 1e3:.2f} ms  p99 {s.p99 * 1e3:.2f} ms "
          "(numpy percentiles of the samples themselves)")
    print(f"  95% CI        of the median: [{s.ci95_low * 1e3:.2f}, {s.ci95_high * 1e3:.2f}] ms (order statistics, "
          "no normality assumed)")
    print(f"  noise         IQR {s.iqr * 1e3:.2f} ms = {s.iqr / s.median:.1%} of the median; above 10% the meter "
          f"warns: {'WARNED' if m.noisy else 'quiet enough'}")
    warn_if_noisy(m)

    overhead_s = meter.overhead_per_call_s(OVERHEAD_RUNS)
    print(f"\nmeter overhead: {overhead_s * 1e6:.2f} µs per timed call (an empty function, {OVERHEAD_RUNS} calls; "
          f"target < {OVERHEAD_TARGET_S * 1e6:.0f} µs: {'OK' if overhead_s < OVERHEAD_TARGET_S else 'OVER'}) "
          f"= 1/{s.median / overhead_s:,.0f} of this call's median")

    # Timer runs single-threaded unless told otherwise; give it our thread count so both time the same work.
    timer = Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads(), label=workload)
    meter_samples, timer_times, calls_per_block = [], [], set()
    rounds = QUICK_INSTRUMENT_ROUNDS if ctx.quick else INSTRUMENT_ROUNDS
    round_s = QUICK_INSTRUMENT_ROUND_S if ctx.quick else INSTRUMENT_ROUND_S
    for _ in range(rounds):
        round_measurement = meter.measure("instrument check", call, warmup=0, min_runs=2,
                                          budget_s=round_s)  # warm already
        meter_samples += round_measurement.samples_s
        # the same wall time as the meter just had, so slow calls give Timer as many samples as the meter
        timer_result = timer.blocked_autorange(min_run_time=max(round_s, round_measurement.wall_s))
        timer_times += timer_result.times
        calls_per_block.add(timer_result.number_per_run)
    meter_stats, timer_stats = Stats.from_samples(meter_samples), Stats.from_samples(timer_times)
    ratio = meter_stats.median / timer_stats.median
    agree = abs(ratio - 1) <= INSTRUMENT_TOLERANCE
    print_table([
        {"instrument": "PerformanceMeter.measure", "samples": meter_stats.count, "calls_per_sample": "1",
         "median_ms": meter_stats.median * 1e3,
         "ci95_ms": f"[{meter_stats.ci95_low * 1e3:.3g}, {meter_stats.ci95_high * 1e3:.3g}]"},
        {"instrument": "torch Timer.blocked_autorange", "samples": timer_stats.count,
         "calls_per_sample": "/".join(map(str, sorted(calls_per_block))), "median_ms": timer_stats.median * 1e3,
         "ci95_ms": f"[{timer_stats.ci95_low * 1e3:.3g}, {timer_stats.ci95_high * 1e3:.3g}]"},
    ], title=f"Instrument check: same call, {rounds} alternating rounds each (a Timer sample is a block's mean)")
    print(f"meter / Timer median ratio: {ratio:.3f} -> {'agree' if agree else 'DISAGREE'} "
          f"(tolerance {INSTRUMENT_TOLERANCE:.0%})" + ("" if agree else "; on a busy machine rerun, check the CIs above"))

    label = loaded.info.label
    call_row = measurement_row(m, "one pipeline call", label, ctx.device, len(batch))
    ctx.report.add_rows("1. Meet the meter", [
        call_row, stats_row(meter_stats, "instrument check: PerformanceMeter", label, ctx.device, len(batch)),
        stats_row(timer_stats, "instrument check: torch Timer", label, ctx.device, len(batch))])
    del extractor, loaded
    cleanup()
    return {
        "workload": workload, "measurement": call_row,
        "meter_overhead_us": overhead_s * 1e6, "overhead_target_us": OVERHEAD_TARGET_S * 1e6,
        "overhead_ok": overhead_s < OVERHEAD_TARGET_S,
        "meter_median_ms": meter_stats.median * 1e3, "timer_median_ms": timer_stats.median * 1e3,
        "meter_over_timer": ratio, "agree_within_5pct": agree,
    }


def load_time_section(ctx: cli.Context) -> list[dict]:
    """Cold (first in this process) and warm (again, same files) load per model, with peak RSS during the load."""
    device = str(ctx.device)
    table = []
    for role in QUICK_LOAD_ROLES if ctx.quick else LOAD_ROLES:
        key = f"{role}@{ctx.device}"
        if key not in FIRST_LOADS:
            loaded = load(ctx, role)
            del loaded
            cleanup()
        cold = FIRST_LOADS[key]
        meter = PerformanceMeter(ctx.device)
        loaded, warm = meter.time_load(role, lambda: models.load_model(role, source=ctx.source, device=ctx.device))
        label, params = loaded.info.label, loaded.info.params
        del loaded
        cleanup()
        table.append({"model": label, "params": params, "cold_s": cold.seconds, "warm_s": warm.seconds,
                      "cold_over_warm": cold.seconds / warm.seconds,
                      "cold_peak_rss_delta_mib": cold.peak_rss_delta_bytes / MIB,
                      "warm_peak_rss_delta_mib": warm.peak_rss_delta_bytes / MIB,
                      "peak_rss_mib": max(cold.peak_rss_bytes, warm.peak_rss_bytes) / MIB})
        ctx.report.add_rows("2. Model load time", [load_row(cold, "cold load", label, device),
                                                   load_row(warm, "warm load", label, device)])
    print_table(table, title=f"Model load time on {ctx.device} (one load each: loads are not repeatable)")
    print("cold = first load of that model in this process (the very first also imports transformers' loading code);"
          "\nwarm = the same load again. Both may read files from the OS page cache, which a script cannot empty.")
    print("peak RSS delta = highest RSS during the load minus RSS before it, sampled every 5 ms; a warm load can "
          "reuse memory the allocator kept from the cold one.")
    return table


def bench_feature_extraction(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The encoder role embedding a batch of everyday sentences."""
    loaded = load(ctx, "encoder")
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer)
    batch = texts.repeated_sentences(TASK_TEXTS)
    m = meter.measure("feature-extraction", lambda: extractor(batch, batch_size=len(batch), return_tensors=True),
                      items=len(batch), tokens=real_tokens(loaded.tokenizer, batch))
    return {"task": "feature-extraction", "role": "encoder", "model": loaded.info.label,
            "per_call": f"{len(batch)} texts", "tokens_counted": "input", "weights_mib": weights_mib(loaded.model),
            "measurement": m}


def bench_text_classification(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The classifier role labelling the same batch."""
    classifier, info = load_classifier(ctx)
    batch = texts.repeated_sentences(TASK_TEXTS)
    m = meter.measure("text-classification", lambda: classifier(batch, batch_size=len(batch)),
                      items=len(batch), tokens=real_tokens(classifier.tokenizer, batch))
    return {"task": "text-classification", "role": "classifier", "model": info.label,
            "per_call": f"{len(batch)} texts", "tokens_counted": "input", "weights_mib": weights_mib(classifier.model),
            "measurement": m}


def bench_text_generation(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The decoder role continuing a prompt by exactly N greedy tokens: time to first token and per-token cost."""
    loaded = load(ctx, "decoder")
    generator = pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer)
    new_tokens = QUICK_NEW_TOKENS if ctx.quick else NEW_TOKENS

    def generate(n: int, **kwargs):
        return generator(PROMPT, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)

    # tokens/s must count tokens that were really generated, so check the count once rather than trust the request
    produced = (len(generate(new_tokens, return_tensors=True)[0]["generated_token_ids"])
                - len(loaded.tokenizer(PROMPT)["input_ids"]))
    if produced != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} new tokens, the model produced {produced}")
    sample = generate(new_tokens, return_full_text=False)[0]["generated_text"]
    print(f"{PROMPT!r} -> {sample!r}" + ("" if loaded.info.meaningful else
                                       "  (twin: random weights, text is noise; shown only to prove the plumbing)"))
    g = measure_generation(meter, "text-generation", lambda n: generate(n, return_full_text=False), new_tokens)
    first = g.first_token.stats
    return {"task": "text-generation", "role": "decoder", "model": loaded.info.label,
            "per_call": f"1 prompt, {new_tokens} new tokens", "tokens_counted": "generated",
            "weights_mib": weights_mib(loaded.model), "measurement": g.full, "first_token": g.first_token,
            "generation": {"model": loaded.info.label, "new_tokens": new_tokens,
                           "ttft_ms": g.time_to_first_token_s * 1e3,
                           "ttft_ci95_ms": f"[{first.ci95_low * 1e3:.3g}, {first.ci95_high * 1e3:.3g}]",
                           "per_token_ms": g.per_token_s * 1e3, "generated_tokens_per_s": g.tokens_per_s}}


def bench_text_to_text(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The seq2seq role through the registered text-to-text pipeline, exactly N new tokens per call."""
    loaded = load(ctx, "seq2seq")
    rewriter = pipeline(pipelines.TEXT_TO_TEXT, model=loaded.model, tokenizer=loaded.tokenizer)
    new_tokens = QUICK_NEW_TOKENS if ctx.quick else NEW_TOKENS
    text = "summarize: " + " ".join(texts.SENTENCES[:3])
    output = rewriter(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if output["output_tokens"] - 1 != new_tokens:  # the output also holds the decoder's start token
        raise RuntimeError(f"asked for {new_tokens} new tokens, the model produced {output['output_tokens'] - 1}")
    print(f"text-to-text output: {output['generated_text']!r}" + ("" if loaded.info.meaningful else
          "  (twin: random weights, text is noise; shown only to prove the plumbing)"))
    m = meter.measure("text-to-text", lambda: rewriter(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                      items=1, tokens=new_tokens)
    return {"task": "text-to-text", "role": "seq2seq", "model": loaded.info.label,
            "per_call": f"1 text, {new_tokens} new tokens", "tokens_counted": "generated",
            "weights_mib": weights_mib(loaded.model), "measurement": m}


def task_section(ctx: cli.Context) -> dict:
    """Four tasks, each with its own model and the same meter; a failing task is recorded and the others go on."""
    section = "3. Task benchmarks"
    meter = make_meter(ctx)
    tasks, samples, generation = [], {}, None
    for bench in (bench_feature_extraction, bench_text_classification, bench_text_generation, bench_text_to_text):
        name = bench.__name__.removeprefix("bench_").replace("_", "-")
        print(f"\n--- {name}")
        rss_before = rss_bytes()
        try:
            result = bench(ctx, meter)
        except Exception as error:  # recorded like a failed section, so the exit code still says something broke
            ctx.report.failures[f"{section}: {name}"] = f"{type(error).__name__}: {error}"
            print(f"[task failed] {name}: {type(error).__name__}: {error}")
            continue
        finally:
            cleanup()
        m = result.pop("measurement")
        result["rss_added_mib"] = max(m.peak_rss_bytes - rss_before, 0) / MIB
        row = measurement_row(m, f"{result['task']} ({result['per_call']})", result["model"], ctx.device, None)
        rows = [row]
        if "first_token" in result:
            first = result.pop("first_token")
            rows.insert(0, measurement_row(first, f"{result['task']} (1 prompt, 1 new token)", result["model"],
                                           ctx.device, None))
            generation = result.pop("generation")
            warn_if_noisy(first)
        warn_if_noisy(m)
        ctx.report.add_rows(section, rows)
        tasks.append({**result, **row})
        samples[result["task"]] = [value * 1e3 for value in m.samples_s]
    if not tasks:
        raise RuntimeError("every task failed")
    print_table(tasks, ["task", "model", "per_call", "runs", "p50_ms", "p90_ms", "p99_ms", "texts_per_s",
                        "tokens_per_s", "tokens_counted", "noisy"],
                title=f"Task latency and throughput on {ctx.device}")
    print("tokens/s counts real tokens only: input tokens without padding (specials included) for the encoder "
          "tasks, generated tokens for the generation tasks.")
    print_table(tasks, ["task", "weights_mib", "rss_added_mib", "peak_rss_mib", "cuda_alloc_mib", "cuda_reserved_mib",
                        "cpu_util_pct", "gpu_util_pct"], title="Resources while measuring")
    print("rss_added_mib: peak RSS during the timed calls minus RSS before the model was loaded (weights, runtime,\n"
          "  activations; below the weights when the allocator reuses memory freed earlier); peak_rss_mib: the whole\n"
          "  process; cpu_util_pct: process CPU time / wall time (100 = one core busy); GPU columns need CUDA\n"
          "  (utilisation also needs NVML).")
    if generation:
        print_table([generation], title="Generation speed (greedy; from the medians of 1-token and N-token calls)")
    save_chart(ctx, "latency_per_task", draw_latency, tasks, samples)
    save_chart(ctx, "memory_per_task", draw_memory, tasks)
    return {"tasks": tasks, "generation": generation, "latency_samples_ms": samples}


def memory_cap_reason(device: torch.device, last: Measurement, baseline_rss: int, last_batch: int,
                      next_batch: int) -> str | None:
    """Why the next batch size would not fit, predicted linearly from the last one's measured peak, or None."""
    scale = next_batch / last_batch
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        need = max(last.peak_cuda_allocated_bytes - torch.cuda.memory_allocated(device), 0) * scale
    else:  # RSS only grows while the allocator keeps freed blocks, so this overestimates: the safe side
        free = psutil.virtual_memory().available
        need = max(last.peak_rss_bytes - baseline_rss, 0) * scale
    if need > MEMORY_FRACTION * free:
        return (f"batch {next_batch} would need about {need / MIB:,.0f} MiB, more than {MEMORY_FRACTION:.0%} "
                f"of the {free / MIB:,.0f} MiB free")
    return None


def sweep_one(ctx: cli.Context, meter: PerformanceMeter, role: str, label: str, call, tokenizer) -> dict:
    """Measure one model at every batch size until the sizes, the memory or the device run out."""
    section = "4. Batch-size sweep"
    rows, stop_reason, last, baseline_rss = [], None, None, rss_bytes()
    sizes = QUICK_SWEEP_BATCH_SIZES if ctx.quick else SWEEP_BATCH_SIZES
    for batch_size in tqdm(sizes, desc=f"batch sweep: {role}", disable=None, leave=False):
        if last is not None:
            stop_reason = memory_cap_reason(ctx.device, last, baseline_rss, rows[-1]["batch"], batch_size)
            if stop_reason:
                break
        batch = texts.repeated_sentences(batch_size)
        try:
            last = meter.measure(f"{role} batch {batch_size}", lambda: call(batch), items=batch_size,
                                 tokens=real_tokens(tokenizer, batch))
        except torch.OutOfMemoryError:
            cleanup()
            stop_reason = f"batch {batch_size} ran out of device memory"
            break
        warn_if_noisy(last)
        rows.append(measurement_row(last, f"batch sweep: {role}", label, ctx.device, batch_size))
    ctx.report.add_rows(section, rows)
    if stop_reason:
        ctx.report.skip(f"{role} batch sizes from {batch_size}", stop_reason)
    if not rows:
        raise RuntimeError(f"{role}: not even batch 1 could be measured ({stop_reason})")
    base = rows[0]
    table = [{"batch": r["batch"], "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "texts_per_s": r["texts_per_s"],
              "tokens_per_s": r["tokens_per_s"], "throughput_vs_batch1": r["texts_per_s"] / base["texts_per_s"],
              "p50_vs_batch1": r["p50_ms"] / base["p50_ms"], "noisy": r["noisy"]} for r in rows]
    knee = find_knee([r["batch"] for r in rows], [r["texts_per_s"] for r in rows])
    print_table(table, title=f"{role} ({label}) on {ctx.device}: one call = one batch of everyday sentences")
    best = max(rows, key=lambda r: r["texts_per_s"])
    if knee is None:
        print(f"{role}: no knee in batch sizes {rows[0]['batch']}..{rows[-1]['batch']}: throughput has not levelled "
              "off (or the curve is too noisy to say)")
    else:
        at_knee = next(r for r in rows if r["batch"] == knee)
        share = at_knee["texts_per_s"] / best["texts_per_s"]
        print(f"{role}: knee at batch {knee}: {at_knee['texts_per_s']:.1f} texts/s = {share:.0%} of the best measured "
              f"({best['texts_per_s']:.1f} at batch {best['batch']})", end="")
        if share >= 0.8:
            print(f"; beyond it each call waits longer (p50 {at_knee['p50_ms']:.1f} -> {rows[-1]['p50_ms']:.1f} ms at "
                  f"batch {rows[-1]['batch']}) for at most {1 / share - 1:.0%} more throughput")
        else:
            print("; throughput rose again after it, so this curve has no single bend (noise, or a second regime)")
    return {"role": role, "model": label, "knee_batch": knee, "best_batch": best["batch"],
            "stopped_because": stop_reason, "table": table}


def batch_sweep_section(ctx: cli.Context) -> dict:
    """Throughput and latency against batch size for the encoder and the classifier, and where the curve bends."""
    meter = make_meter(ctx)
    sweeps = {}
    loaded = load(ctx, "encoder")
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer)
    sweeps["encoder"] = sweep_one(ctx, meter, "encoder", loaded.info.label,
                                  lambda batch: extractor(batch, batch_size=len(batch), return_tensors=True),
                                  loaded.tokenizer)
    del extractor, loaded
    cleanup()
    classifier, info = load_classifier(ctx)
    sweeps["classifier"] = sweep_one(ctx, meter, "classifier", info.label,
                                     lambda batch: classifier(batch, batch_size=len(batch)), classifier.tokenizer)
    del classifier
    cleanup()

    fig, (left, right) = plots.plt.subplots(1, 2, figsize=(12, 4.8))
    draw_sweep(left, sweeps.values())
    for sweep in sweeps.values():
        right.plot([r["batch"] for r in sweep["table"]], [r["p50_ms"] for r in sweep["table"]], marker="o",
                   label=sweep["role"])
    set_batch_axis(right, sweeps.values())
    right.set_title("Median latency of one call vs batch size")
    right.set_xlabel("batch size (texts per call, log2 scale)")
    right.set_ylabel("p50 latency per call (ms)")
    right.legend(fontsize=8)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "throughput_vs_batch"))
    return sweeps


def devices_section(ctx: cli.Context) -> list[dict]:
    """The same feature-extraction workload on every device this machine has, side by side."""
    devices, missing = available_devices()
    for kind, reason in missing.items():
        ctx.report.skip(f"device {kind}", reason)
    batch = texts.repeated_sentences(TASK_TEXTS)
    rows = []
    for device in devices:
        loaded = load(ctx, "encoder", device)
        extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer)
        m = make_meter(ctx, device).measure(
            f"feature-extraction on {device}", lambda: extractor(batch, batch_size=len(batch), return_tensors=True),
            items=len(batch), tokens=real_tokens(loaded.tokenizer, batch))
        warn_if_noisy(m)
        rows.append(measurement_row(m, "devices: feature-extraction", loaded.info.label, device, len(batch)))
        del extractor, loaded
        cleanup()
    ctx.report.add_rows("5. Devices", rows)
    table = [{"device": r["device"], "per_call": f"{len(batch)} texts", "p50_ms": r["p50_ms"], "iqr_ms": r["iqr_ms"],
              "p99_ms": r["p99_ms"], "texts_per_s": r["texts_per_s"], "tokens_per_s": r["tokens_per_s"],
              "speedup_vs_cpu": rows[0]["p50_ms"] / r["p50_ms"], "peak_rss_mib": r["peak_rss_mib"],
              "cuda_alloc_mib": r["cuda_alloc_mib"], "gpu_util_pct": r["gpu_util_pct"]} for r in rows]
    print_table(table, title=f"Same workload on every device (encoder, {len(batch)} texts per call)")
    if len(rows) == 1:
        print("only the CPU is available here, so there is nothing to put beside it (see the skipped lines above)")
    save_chart(ctx, "devices_side_by_side", draw_devices, table)
    return table


def seed_table_section(ctx: cli.Context) -> dict:
    """The seed's DistilBERT/BERT-base table re-measured here: one forward pass of a stated shape, time and memory."""
    devices = {"CPU": torch.device("cpu")}
    gpus, _ = available_devices()
    if len(gpus) > 1:
        devices["GPU"] = gpus[1]
    else:
        ctx.report.skip("seed table, GPU rows", "no CUDA or MPS GPU here; the seed's GPU numbers stand alone")
    text = " ".join(texts.SENTENCES * 2)  # long enough that truncation leaves exactly SEED_INPUT_TOKENS real tokens
    measured, shape = {}, None
    for role in dict.fromkeys(entry["role"] for entry in SEED_TABLE):
        for kind, device in devices.items():
            cleanup()
            loaded = load(ctx, role, device)
            inputs = loaded.tokenizer(text, truncation=True, max_length=SEED_INPUT_TOKENS, return_tensors="pt")
            inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
            shape = list(inputs["input_ids"].shape)

            def forward():
                with torch.inference_mode():
                    return loaded.model(**inputs)

            m = make_meter(ctx, device).measure(f"{role} forward on {device}", forward, items=shape[0],
                                                tokens=shape[0] * shape[1])
            warn_if_noisy(m)
            row = measurement_row(m, f"seed table: forward {shape}", loaded.info.label, device, shape[0])
            ctx.report.add_rows("6. The seed's table, reproduced", [row])
            on_cuda = device.type == "cuda"
            measured[(role, kind)] = {
                "time_s": m.stats.median, "ci": f"[{m.stats.ci95_low:.4f}, {m.stats.ci95_high:.4f}]",
                "memory_gib": (m.peak_cuda_reserved_bytes if on_cuda else m.peak_rss_bytes) / 2**30,
                "memory_as": "CUDA peak reserved" if on_cuda else "process peak RSS",
                "weights_mib": weights_mib(loaded.model), "label": loaded.info.label,
            }
            del loaded, inputs, forward
            cleanup()
    rows = []
    for entry in SEED_TABLE:
        ours = measured.get((entry["role"], entry["device"]))
        rows.append({"model": entry["model"], "device": entry["device"], "ours_model": ours["label"] if ours else None,
                     "input_shape": f"{shape} tokens", "ours_time_s": ours["time_s"] if ours else None,
                     "ours_ci95_s": ours["ci"] if ours else None,
                     "ours_memory_gib": ours["memory_gib"] if ours else None,
                     "memory_measured_as": ours["memory_as"] if ours else "not measured here",
                     "weights_mib": ours["weights_mib"] if ours else None,
                     "seed_time_s": entry["time_s"], "seed_memory_gb": entry["memory_gb"],
                     "ours_over_seed_time": ours["time_s"] / entry["time_s"] if ours else None})
    print_table(rows, ["model", "device", "input_shape", "ours_time_s", "ours_ci95_s", "seed_time_s",
                       "ours_over_seed_time", "ours_memory_gib", "memory_measured_as", "seed_memory_gb"],
                title="The seed's table: THIS machine (ours_*) next to the seed's published numbers (ANOTHER machine)")
    print(f"ours: median of one forward pass, batch {shape[0]} x {shape[1]} real tokens, float32, under "
          "torch.inference_mode(); the seed did not state its input shape, so ours/seed compares machines, not code.")
    if any(value["label"].endswith("(twin)") for value in measured.values()):
        print("(twins: random weights with the exact architecture, so time and memory match the real models)")
    architecture = {}
    for kind in devices:
        small, big = measured.get(("distilbert-base-uncased", kind)), measured.get(("bert-base-uncased", kind))
        seed_small, seed_big = (next(e["time_s"] for e in SEED_TABLE if e["role"] == r and e["device"] == kind)
                                for r in ("distilbert-base-uncased", "bert-base-uncased"))
        if small and big:
            architecture[kind] = {"ours": big["time_s"] / small["time_s"], "seed": seed_big / seed_small}
            print(f"BERT-base / DistilBERT time on {kind}: {architecture[kind]['ours']:.2f}x in this run vs "
                  f"{architecture[kind]['seed']:.2f}x in the seed (a ratio from one machine compares fairly)")
    return {"input_shape": str(shape), "rows": rows, "bert_over_distilbert": architecture}


def report_section(ctx: cli.Context, results: dict, previous: dict | None) -> dict:
    """The one-page summary figure, and with --compare the ratio to a previous run for every shared measurement."""
    panels = [
        ("tasks", lambda ax, r: draw_latency(ax, r["tasks"], r["latency_samples_ms"])),
        ("sweep", lambda ax, r: draw_sweep(ax, r.values())),
        ("tasks", lambda ax, r: draw_memory(ax, r["tasks"])),
        ("seed", lambda ax, r: draw_seed_table(ax, r["rows"])),
    ]
    fig, axes = plots.plt.subplots(2, 2, figsize=(14, 9.5))
    for ax, (key, draw) in zip(axes.flat, panels):
        if results.get(key):
            draw(ax, results[key])
        else:
            ax.text(0.5, 0.5, f"no {key} results (section failed or was interrupted)", ha="center", va="center")
            ax.set_axis_off()
    env = ctx.report.environment
    fig.suptitle(f"{SCRIPT}: {env['cpu']}, device {env['device']}, {env['torch_threads']} threads, "
                 f"torch {env['torch']}, transformers {env['transformers']}", fontsize=11)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "summary"))

    if previous is None:
        print(f"run again later with --compare {ctx.out_dir / 'report.json'} (copy it first) to see what changed")
        return {"compared_with": None}
    before_env = previous.get("environment", {})
    if (before_env.get("cpu"), before_env.get("device"), before_env.get("torch_threads")) != \
            (env["cpu"], env["device"], env["torch_threads"]):
        print(f"note: the previous run was on {before_env.get('cpu')}, device {before_env.get('device')}, "
              f"{before_env.get('torch_threads')} threads: the ratios compare machines as well as code")
    if previous.get("partial"):
        print("note: the previous report is partial (that run was interrupted)")
    compared = compare_measurements(previous["rows"], ctx.report.rows)
    flagged = [row for row in compared if row["flagged"]]
    print_table(compared, ["section", "measurement", "model", "device", "batch", "before_p50_ms", "now_p50_ms", "ratio",
                           "verdict"], title=f"Now vs {ctx.args.compare} (ratio = now / before, p50)")
    print(f"{len(flagged)} of {len(compared)} shared measurements changed beyond their 95% CIs "
          f"({sum(r['verdict'] == 'SLOWER' for r in flagged)} slower, {sum(r['verdict'] == 'FASTER' for r in flagged)} "
          "faster); 'within CI' means the difference is indistinguishable from noise")
    return {"compared_with": str(ctx.args.compare), "previous_created": previous.get("created"),
            "shared": len(compared), "flagged": len(flagged), "comparison": compared}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--compare", type=Path, metavar="PREVIOUS.json",
                        help="a previous run's report.json: print the ratio for every shared measurement and flag "
                             "changes outside the 95%% confidence intervals")
    args = parser.parse_args(argv)
    previous = load_previous_report(args.compare) if args.compare else None  # fail before minutes of measuring
    hf_logging.disable_progress_bar()
    ctx = cli.start(__file__, args)
    run = ctx.report.run_section
    results = {
        "meter": run("1. Meet the meter", "Before trusting any number, check the instrument: what it does to one call, "
                     "what it costs itself, and whether torch's own benchmark Timer agrees.", meet_the_meter_section,
                     ctx),
        "loads": run("2. Model load time", "Start-up cost is paid once per process; the first load of a model is "
                     "slower than the next, and briefly needs more memory than the model itself.", load_time_section,
                     ctx),
        "tasks": run("3. Task benchmarks", "Four pipeline tasks, four models, one meter: tail latency, throughput in "
                     "texts and real tokens, and the resources each one holds.", task_section, ctx),
        "sweep": run("4. Batch-size sweep", "Bigger batches buy throughput with latency until the hardware is busy; "
                     "the knee is where that trade stops paying.", batch_sweep_section, ctx),
        "devices": run("5. Devices", "The same workload on every device here, so the comparison is the device and "
                       "nothing else.", devices_section, ctx),
        "seed": run("6. The seed's table, reproduced", "The seed published times and memory for DistilBERT and "
                    "BERT-base; here they are re-measured with the input shape stated.", seed_table_section, ctx),
    }
    run("7. Report and comparison", "Everything above in report.json, results.csv (one row per measurement) and "
        "report.md, a one-page summary, and with --compare what changed since a previous run.", report_section,
        ctx, results, previous)
    return ctx.report.finish()


if __name__ == "__main__":
    cli.run(main)
