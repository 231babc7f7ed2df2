#!/usr/bin/env python3
"""04 · Performance measurement: the PerformanceMeter as an instrument you can trust and cite.

Checks the meter against torch.utils.benchmark, then benchmarks model loads, four pipeline tasks, batch sizes and
devices, re-measures the course notes' DistilBERT/BERT table, runs the runtime contest, and writes report.json and
results.csv with the article built from them (report.md, report.tex). A later run with `--compare report.json` checks
the machine and the environment first, then gives every shared measurement a verdict from both runs' raw samples.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import common  # noqa: F401  (first: it quiets torchao's import-time warnings; see common/__init__.py)
import numpy as np
import torch
from torch.utils.benchmark import Timer
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from common import cli, models, paper, pipelines, plots, recipe, runs, runtimes, texts
from common.batching import streamed_weight_bytes
from common.calibration import calibrate, matmul_peak
from common.device import mps_available, timed_once
from common.errors import UserError
from common.fidelity import cosine_fidelity
from common.memory import MIB, CudaPeak, PeakRSSSampler, cleanup, rss_bytes, weights_bytes
from common.meter import VERDICT_WORDS, Comparison, PerformanceMeter, measure_generation, verdict_of
from common.quantize import choose_activation_range, linear_names, variant_unavailable
from common.report import REPORT_VERSION, explained, format_value, limit_bar, print_table, ratio_bar, say
from common.runtimes import (ONNX_FP32, ONNX_INT8, OPENVINO_FP32, OPENVINO_INT8, PEERS, PYTORCH_FP32, PYTORCH_INT8,
                             SENTENCE_TRANSFORMERS)
from common.sweep import find_knee, fitting_batches


@dataclass(frozen=True)
class Settings:
    """What --quick shrinks; everything else is the same in both kinds of run."""

    load_roles: tuple[str, ...]  # section 2: checkpoints loaded twice each (section 1 already loaded the encoder)
    new_tokens: int  # tokens generated per call by the generation tasks
    sweep_batches: tuple[int, ...]
    instrument_rounds: int  # section 1: meter and Timer alternate this many rounds ...
    instrument_round_s: float  # ... of about this long each, so drift hits both alike


FULL = Settings(("decoder", "seq2seq", "distilbert-base-uncased", "bert-base-uncased"), 16, (1, 2, 4, 8, 16, 32, 64),
                6, 0.5)
QUICK = Settings(("seq2seq", "distilbert-base-uncased"), 8, (1, 2, 4, 8), 6, 0.15)

OVERHEAD_RUNS = 2000  # empty calls timed to measure the meter's own cost
OVERHEAD_TARGET_S = 50e-6
INSTRUMENT_TOLERANCE = 0.05  # meter and Timer agree when their ratio's interval lies within 5% of 1
TASK_TEXTS = 8  # texts per call for the encoder-style tasks
PROMPT = "The best way to measure the speed of a language model is"
MEMORY_FRACTION = 0.5  # stop the sweep before a batch is predicted to need more than this share of free memory
SEED_INPUT_TOKENS = 128
SEED_MODELS = {"distilbert-base-uncased": "DistilBERT", "bert-base-uncased": "BERT-base"}
# The course notes' "typical performance (example system)" table: another machine, input shape not given.
SEED_TABLE = {("DistilBERT", "CPU"): (0.045, 1.2), ("DistilBERT", "GPU"): (0.012, 2.1),  # (time_s, memory_gb)
              ("BERT-base", "CPU"): (0.089, 2.1), ("BERT-base", "GPU"): (0.021, 3.2)}
AUTO_CLASSES = {"encoder": AutoModel, "decoder": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}
TWIN_NOTE = ("random weights with the real model's parameter count and layer shapes, so its speed and memory are "
             "the real model's and its outputs are noise (never shown); its borrowed tokenizer splits text into a "
             "different number of tokens")
SCRIPT = Path(__file__).stem


# ------------------------------------------------------------------------------------------------ helpers


_explained: set[str] = set()  # terms already defined in this run: each explanation is printed once per lesson


def explain_once(term: str, text: str) -> None:
    """Print a term's definition the first time the run needs it."""
    if term not in _explained:
        _explained.add(term)
        say(text)


def define(term: str, definition: str) -> str:
    """The term with its definition in brackets the first time the run uses it, the bare term afterwards."""
    if term in _explained:
        return term
    _explained.add(term)
    return f"{term} ({definition})"


def explain_twin(label: str, meaningful: bool) -> None:
    """What a twin is, the first time one appears."""
    if not meaningful:
        explain_once("twin", f"{label} is a twin: {TWIN_NOTE}")


def available_devices(run_device: torch.device) -> tuple[list[torch.device], dict[str, str]]:
    """The CPU and the GPU --device chose (the one the environment describes); why any other is not timed."""
    present = {"cuda": torch.cuda.is_available(), "mps": mps_available()}
    why = {"cuda": f"this torch ({torch.__version__}) sees no CUDA GPU",
           "mps": "Apple's MPS backend is not available (it exists only on Apple-silicon Macs)"}
    return ([torch.device("cpu")] + ([run_device] if run_device.type != "cpu" else []),
            {kind: f"present, but this run is on --device {run_device}; --device {kind} (or auto) times it"
             if here else why[kind] for kind, here in present.items() if kind != run_device.type})


def classifier_pipeline(ctx: cli.Context):
    """The classifier role as a pipeline; offline it is the registered embedding-classification stand-in."""
    classifier, info = ctx.classifier()
    if info.source != "hub":
        explain_once("stand-in", "(offline, the classifier role is the registered 'embedding-classification' "
                     "stand-in: MiniLM plus similarity to example sentences, not a fine-tuned DistilBERT; its speed "
                     "is a MiniLM encoder's)")
    return classifier, info


def ms(seconds: float) -> str:
    """Seconds as milliseconds to 3 significant figures, in plain digits (1,020 rather than 1.02e+03)."""
    return format_value(seconds * 1e3)


def slim(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Rows cut to the keys a section's result keeps (the raw samples stay in the report's rows)."""
    return [{key: row.get(key) for key in keys} for row in rows]


# ----------------------------------------------------------------------------------------------- sections


def meet_the_meter_section(ctx: cli.Context) -> dict:
    """Before trusting any number, check the instrument: what it does to one call, what it costs itself,
    and whether torch's own benchmark Timer, timing the same call in alternating rounds, agrees."""
    loaded = ctx.load("encoder")
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer,
                         device=loaded.model.device)
    # A call of tens of milliseconds: long enough that Timer times single calls too (its blocks would average them).
    batch = texts.repeated_sentences(TASK_TEXTS)
    workload = f"feature-extraction pipeline, {len(batch)} sentences in one call, {ctx.device}"

    def call():
        return extractor(batch, batch_size=len(batch), return_tensors=True)

    meter = PerformanceMeter(ctx.device, warmup=2, min_runs=ctx.pick(5, 3), budget_s=ctx.pick(1.0, 0.2))
    m = meter.measure(workload, call, items=len(batch),
                      tokens=texts.count_tokens(loaded.tokenizer, batch, truncation=True))
    s = m.stats
    sync = ("torch.cuda/mps.synchronize() after every call, so the clock stops when the GPU is done"
            if ctx.device.type in ("cuda", "mps") else "not needed on CPU: the call returns when the work is done")
    tail = f"p99 {ms(s.p99)} ms" if s.p99 is not None else f"max {ms(s.max)} ms (p99 needs 100 calls)"
    coverage = "" if s.ci_coverage >= 0.95 else f", only {s.ci_coverage:.0%} coverage with {s.count} calls"
    print(f"workload: {workload}")
    for line in (f"warm-up   {meter.warmup} untimed calls first (lazy initialisation, allocator growth, cold caches)",
                 f"sync      {sync}",
                 f"repeats   {s.count} timed calls: at least {meter.min_runs}, and until {meter.budget_s:g} s had "
                 f"passed (took {m.wall_s:.2f} s)",
                 f"p50       {ms(s.median)} ms, the median call: half were faster; p90 {ms(s.p90)} ms; {tail}",
                 f"interval  [{ms(s.ci95_low)}, {ms(s.ci95_high)}] ms: the median's exact 95% interval (from the "
                 f"order statistics, no normal distribution assumed{coverage})",
                 f"IQR       {ms(s.iqr)} ms = {s.iqr / s.median:.0%} of the median: the spread of the middle half "
                 f"of the calls; above 10% a result is noisy{' (this one is)' if m.noisy else ''}, marked `(! "
                 f"{s.iqr / s.median:.0%})` beside its p50 in tables"):
        say(line, indent="  ")
    explained("timing")  # p50, its interval and the noise mark are taught here, not again at the first table
    overhead_s = meter.overhead_per_call_s(OVERHEAD_RUNS)
    say(f"\nmeter overhead: {overhead_s * 1e6:.2f} µs per timed call ({OVERHEAD_RUNS} calls of an empty function; "
        f"target < {OVERHEAD_TARGET_S * 1e6:.0f} µs: {'OK' if overhead_s < OVERHEAD_TARGET_S else 'OVER'}), "
        f"1/{s.median / overhead_s:,.0f} of this call's median")
    row = runs.result_row(m, measurement="one pipeline call", model=loaded.info.label, device=str(ctx.device),
                          batch=len(batch))
    ctx.report.add_rows("1. Meet the meter", [row])
    return {"workload": workload, "warmup": meter.warmup, "min_runs": meter.min_runs, "budget_s": meter.budget_s,
            "meter_overhead_us": overhead_s * 1e6, "overhead_target_us": OVERHEAD_TARGET_S * 1e6,
            "overhead_ok": overhead_s < OVERHEAD_TARGET_S, **instrument_check(ctx, meter, call, workload)}


def instrument_check(ctx: cli.Context, meter: PerformanceMeter, call, workload: str) -> dict:
    """Meter and torch's Timer time the same call in alternating rounds; their ratio gets an interval."""
    s = ctx.pick(FULL, QUICK)
    # Timer runs single-threaded unless told otherwise; give it our thread count so both time the same work.
    timer = Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads(), label=workload)
    meter_samples, timer_samples, per_block = [], [], set()
    for _ in range(s.instrument_rounds):
        taken = meter.measure("instrument check", call, warmup=0, min_runs=2, budget_s=s.instrument_round_s)
        meter_samples += taken.samples_s
        # the same wall time as the meter just had, so slow calls give Timer as many samples as the meter
        block = timer.blocked_autorange(min_run_time=max(s.instrument_round_s, taken.wall_s))
        timer_samples += block.times
        per_block.add(block.number_per_run)
    # two instruments, not two workloads: unpaired samples, so the ratio's interval is the two-sample one
    ratio, low, high, coverage = runs.ratio_interval(timer_samples, meter_samples)  # meter / Timer
    verdict = runs.agreement(ratio, low, high, INSTRUMENT_TOLERANCE)
    meter_ms, timer_ms = float(np.median(meter_samples)) * 1e3, float(np.median(timer_samples)) * 1e3
    blocks = "/".join(map(str, sorted(per_block)))
    say(f"instrument check, {s.instrument_rounds} alternating "
        f"{define('rounds', 'each round: the meter times the call, then Timer for as long')}: the meter's median "
        f"{format_value(meter_ms)} ms ({len(meter_samples)} calls), torch Timer.blocked_autorange's "
        f"{format_value(timer_ms)} ms ({len(timer_samples)} blocks of {blocks} call(s)); meter/Timer "
        f"{ratio:.3f}x [{low:.3f}-{high:.3f}, {coverage:.0%} coverage] -> " + {
            "agree": "they agree within 5%",
            "disagree": "they DISAGREE by more than 5%: do not trust small differences from this run",
            "inconclusive": "inconclusive: wider than 5% either side, the machine is too busy to check the "
                            "instrument"}[verdict])
    return {"meter_median_ms": meter_ms, "timer_median_ms": timer_ms, "meter_over_timer": ratio,
            "meter_over_timer_interval": [low, high], "instrument_check": verdict}


def load_time_section(ctx: cli.Context) -> list[dict]:
    """Start-up cost: a checkpoint's first load in this process, the same load again, and each one's first
    inference. safetensors weights are memory-mapped: their pages come in when the first inference touches them,
    so time to first inference and the memory resident after it are the real start-up cost."""
    meter, table = ctx.meter(), []
    for role in ctx.pick(FULL, QUICK).load_roles:
        where = models.checkpoint(role, ctx.source)
        auto_class = AUTO_CLASSES[where.kind]
        # ids and mask only: a twin's borrowed tokenizer may add inputs (token_type_ids) its model does not take
        inputs = AutoTokenizer.from_pretrained(where.path)(PROMPT, return_tensors="pt",
                                                           return_token_type_ids=False).to(ctx.device)
        timings = []
        for attempt in ("cold load", "warm load"):
            model, timing = meter.time_load(where.label, lambda: auto_class.from_pretrained(
                where.path, dtype=torch.float32, device_map=ctx.device))
            if not timings:
                ctx.record(where.info(model, timing.seconds))
            with torch.inference_mode():  # an encoder-decoder's first inference is its first generated token
                first_s = timed_once(lambda model=model: model.generate(**inputs, max_new_tokens=1)
                                     if where.kind == "seq2seq" else model(**inputs), ctx.device)
            resident = (rss_bytes() - (timing.peak_rss_bytes - timing.peak_rss_delta_bytes)) / MIB
            weights = weights_bytes(model)
            timings.append((timing, first_s, resident))
            ctx.report.add_rows("2. Model load time", [{  # one sample: no percentiles, no interval
                "measurement": attempt, "model": where.label, "device": str(ctx.device), "runs": 1,
                "load_ms": timing.seconds * 1e3, "ttfi_ms": (timing.seconds + first_s) * 1e3,
                "peak_rss_delta_mib": timing.peak_rss_delta_bytes / MIB, "resident_mib": resident,
                "samples_ms": [timing.seconds * 1e3]}])
            del model
            cleanup()
        (cold, cold_first, cold_resident), (warm, warm_first, _) = timings
        table.append({"model": where.label, "class": auto_class.__name__, "weights_mib": weights / MIB,
                      "cold_s": cold.seconds, "cold_ttfi_s": cold.seconds + cold_first, "warm_s": warm.seconds,
                      "warm_ttfi_s": warm.seconds + warm_first, "cold_over_warm": cold.seconds / warm.seconds,
                      "cold_load_peak_mib": cold.peak_rss_delta_bytes / MIB, "cold_resident_mib": cold_resident})
    print_table(table, [key for key in table[0] if key not in ("class", "warm_ttfi_s", "cold_over_warm")],  # CSV
                title=f"Model load time on {ctx.device}: Auto*.from_pretrained(path, dtype=torch.float32, "
                      f"device_map={str(ctx.device)!r}), then one first inference")
    say("cold: the first load of that checkpoint in this process; warm: the same load again (one load each, so "
        "cold/warm is no verdict). ttfi (time to first inference): the load plus one forward of a short prompt "
        f"(an encoder-decoder: its first token). load_peak: {define('RSS', 'resident set size, the memory in RAM')}"
        " at its highest during the load above RSS before it; resident: RSS after the first inference above RSS "
        "before the load.")
    if ctx.device.type == "cpu":  # on a GPU the weights do not live in RSS, so the comparison would mean nothing
        mapped = [row["model"] for row in table if row["cold_load_peak_mib"] < 0.5 * row["weights_mib"]
                  <= row["cold_resident_mib"]]
        say(f"{'all' if len(mapped) == len(table) else len(mapped)} of {len(table)} cold loads mapped rather than "
            f"read their weights (under half resident after the load, at least half after the first inference)"
            + ("" if len(mapped) in (0, len(table)) else f": {', '.join(mapped)}"))
    for role in ctx.pick(FULL, QUICK).load_roles:
        where = models.checkpoint(role, ctx.source)
        explain_twin(where.label, where.meaningful)
    return table


def bench_texts(ctx: cli.Context, meter: PerformanceMeter, task: str) -> dict:
    """The encoder embedding, or the classifier labelling, one batch of everyday sentences."""
    batch = texts.repeated_sentences(TASK_TEXTS)
    if task == "feature-extraction":
        loaded, options = ctx.load("encoder"), {"return_tensors": True}  # tensors out: no conversion to lists
        run, info = pipeline(task, model=loaded.model, tokenizer=loaded.tokenizer,
                             device=loaded.model.device), loaded.info
    else:
        (run, info), options = classifier_pipeline(ctx), {}

    def call():
        return run(batch, batch_size=len(batch), **options)

    m = meter.measure(task, call, items=len(batch), tokens=texts.count_tokens(run.tokenizer, batch, truncation=True))
    return {"task": task, "model": info.label, "per_call": f"{len(batch)} texts", "tokens_counted": "input",
            "weights_mib": weights_bytes(run.model) / MIB, "measurements": [m], "call": call}


def bench_text_generation(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The decoder role continuing a prompt by exactly N greedy tokens: time to first token and per-token cost."""
    loaded, new_tokens = ctx.load("decoder"), ctx.pick(FULL, QUICK).new_tokens
    generator = pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer,
                         device=loaded.model.device)

    def generate(n: int, **kwargs):
        return generator(PROMPT, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)

    # tokens/s must count tokens that were really generated, so check the count once rather than trust the request
    produced = (len(generate(new_tokens, return_tensors=True)[0]["generated_token_ids"])
                - len(loaded.tokenizer(PROMPT)["input_ids"]))
    if produced != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} new tokens, the model produced {produced}")
    if loaded.info.meaningful:
        say(f"{PROMPT!r} -> {generate(new_tokens, return_full_text=False)[0]['generated_text']!r}")
    explain_twin(loaded.info.label, loaded.info.meaningful)
    g = measure_generation(meter, "text-generation", lambda n: generate(n, return_full_text=False), new_tokens)
    return {"task": "text-generation", "model": loaded.info.label, "per_call": f"1 prompt, {new_tokens} new tokens",
            "tokens_counted": "generated", "weights_mib": weights_bytes(loaded.model) / MIB,
            "measurements": [g.first_token, g.full], "call": lambda: generate(new_tokens),
            "generation": {"model": loaded.info.label, "new_tokens": new_tokens,
                           "ttft_ms": g.time_to_first_token_s * 1e3, "ttft_low_ms": g.first_token.stats.ci95_low * 1e3,
                           "ttft_high_ms": g.first_token.stats.ci95_high * 1e3,
                           "per_token_ms": g.per_token_s * 1e3}}


def bench_text_to_text(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The seq2seq role through the registered text-to-text pipeline, exactly N new tokens per call."""
    loaded, new_tokens = ctx.load("seq2seq"), ctx.pick(FULL, QUICK).new_tokens
    rewriter = pipeline(pipelines.TEXT_TO_TEXT, model=loaded.model, tokenizer=loaded.tokenizer,
                        device=loaded.model.device)
    text = "summarize: " + " ".join(texts.SENTENCES[:3])

    def call():
        return rewriter(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    output = call()
    if output["output_tokens"] - 1 != new_tokens:  # the output also holds the decoder's start token
        raise RuntimeError(f"asked for {new_tokens} new tokens, the model produced {output['output_tokens'] - 1}")
    if loaded.info.meaningful:
        say(f"text-to-text output: {output['generated_text']!r}")
    explain_twin(loaded.info.label, loaded.info.meaningful)
    m = meter.measure("text-to-text", call, items=1, tokens=new_tokens)
    return {"task": "text-to-text", "model": loaded.info.label, "per_call": f"1 text, {new_tokens} new tokens",
            "tokens_counted": "generated", "weights_mib": weights_bytes(loaded.model) / MIB, "measurements": [m],
            "call": call}


def one_call_mib(call) -> float:
    """RSS at its highest during one call above RSS before it, after freed memory went back to the OS: what a call
    needs beyond the resident weights (the timed calls reuse memory that their warm-up calls already took)."""
    cleanup()
    with PeakRSSSampler() as rss:
        call()
    return rss.peak_delta_bytes / MIB


def task_section(ctx: cli.Context) -> dict:
    """Four pipeline tasks, four models, one meter: latency, throughput in texts and real tokens, and the
    memory each holds; a failing task is recorded and the others go on."""
    section, meter = "3. Task benchmarks", ctx.meter()
    tasks, generation = [], None
    benches = {"feature-extraction": bench_texts, "text-classification": bench_texts,
               "text-generation": bench_text_generation, "text-to-text": bench_text_to_text}
    for name, bench in benches.items():
        result = ctx.report.attempt(f"{section}: {name}", lambda: bench(ctx, meter, name) if bench is bench_texts
                                    else bench(ctx, meter), fails_run=True)  # the exit code still says it broke
        if result is None:
            cleanup()
            continue
        *first, m = result.pop("measurements")  # generation also measured its first token alone
        result["call_mib"] = one_call_mib(result.pop("call"))
        generation = result.pop("generation", generation)
        rows = [runs.result_row(x, measurement=f"{name} ({per_call})", model=result["model"], device=str(ctx.device))
                for x, per_call in zip([*first, m], ["1 prompt, 1 new token"] * len(first) + [result["per_call"]])]
        ctx.report.add_rows(section, rows)
        tasks.append({**result, **rows[-1], "cores_busy": rows[-1]["cpu_util_pct"] / 100})
        cleanup()
    if not tasks:
        raise RuntimeError("every task failed")
    print_table(tasks, ["task", "model", "per_call", "p50_ms", "items_per_s"],
                title=f"Task latency and throughput on {ctx.device} (items_per_s = work per call / p50)")
    say("tokens/s (real tokens only), p90, p99 and the maximum are in results.csv")
    on_gpu = ctx.device.type == "cuda"
    print_table(tasks, ["task", "weights_mib", "call_mib", "cores_busy"] + ["cuda_alloc_mib", "gpu_util_pct"] * on_gpu,
                title="Memory and CPU use of each task")
    say(f"weights: the parameters' bytes; call: {define('RSS', 'resident set size, the memory in RAM')} at its "
        "highest during one call above RSS before it, after gc and malloc_trim handed freed memory back (the timed "
        "calls themselves needed none beyond what their warm-up calls took); cores_busy: CPU time / wall time "
        f"while timing, out of {os.cpu_count()} logical cores.")
    if generation:
        say(f"text-generation ({generation['model']}): time to first token (ttft: the prompt's forward pass and one "
            f"new token) {format_value(generation['ttft_ms'])} ms [{format_value(generation['ttft_low_ms'])}, "
            f"{format_value(generation['ttft_high_ms'])}], then {format_value(generation['per_token_ms'])} ms per "
            "further token (the median over rounds of the N-token call minus the 1-token call, / N-1)")
    outcome = {"tasks": slim(tasks, ("task", "model", "per_call", "p50_ms", "ci95_low_ms", "ci95_high_ms",
                                     "items_per_s", "tokens_per_s", "weights_mib", "call_mib", "cores_busy",
                                     "cuda_alloc_mib", "gpu_util_pct")), "generation": generation,
               "latency_samples_ms": {task["task"]: task["samples_ms"] for task in tasks}}
    ctx.report.add_chart(plots.chart(ctx.out_dir, "latency_per_task", draw_latency, outcome))
    ctx.report.add_chart(plots.chart(ctx.out_dir, "memory_per_task", draw_memory, outcome))
    return outcome


def sweep_one(ctx: cli.Context, role: str, label: str, pipe, **options) -> dict:
    """Time every batch size that fits round-robin, and find where throughput stops paying for latency."""
    def call(batch: list[str]):
        return pipe(batch, batch_size=len(batch), **options)

    sizes, stop_reason = fitting_batches(lambda size: call(texts.repeated_sentences(size)),
                                         ctx.pick(FULL, QUICK).sweep_batches, ctx.device, MEMORY_FRACTION)
    if stop_reason:
        ctx.report.skip(f"{role} batch sizes after {sizes[-1] if sizes else 0}", stop_reason)
    if not sizes:
        raise RuntimeError(f"{role}: not even batch 1 could be measured ({stop_reason})")
    batches = {f"batch {size}": texts.repeated_sentences(size) for size in sizes}
    comparison = ctx.meter().compare({name: (lambda b=b: call(b)) for name, b in batches.items()},
                                     items={name: len(b) for name, b in batches.items()},
                                     tokens={name: texts.count_tokens(pipe.tokenizer, b, truncation=True)
                                             for name, b in batches.items()}, progress=f"batch sweep: {role}")
    workload = f"{role}: {label}, {pipe.task}"
    rows = ctx.show(comparison, f"batch {sizes[0]}", f"Batch sizes, {workload} on {ctx.device}, one batch per call",
                    extra={f"batch {size}": runs.result_row(m, measurement=f"batch sweep: {role}", model=label,
                                                            device=str(ctx.device), batch=size)
                           for size, m in zip(sizes, comparison.measurements.values())})

    def gain(larger: int, smaller: int) -> tuple[float, float, float]:
        """Throughput of one size over another: their paired per-round ratio of time per text."""
        return comparison.ratio(f"batch {larger}", f"batch {smaller}")

    knee = find_knee(sizes, gain)
    explain_once("knee", "knee: the smallest batch whose texts/s no larger batch beats by more than 3%, judged by "
                 "the interval of their paired throughput ratio.")
    beyond = None
    if knee is None:
        say(f"{role}: no knee up to batch {sizes[-1]}: every smaller batch is outrun beyond +-3% by a larger one, "
            "so throughput is still growing")
    else:
        best = max((size for size in sizes if size > knee), key=lambda size: gain(size, knee)[0], default=None)
        text = f"{role}: knee at batch {knee}"
        if best is not None:
            estimate, low, high = gain(best, knee)
            beyond = {"batch": best, "gain": estimate, "low": low, "high": high, "verdict": verdict_of(low, high)}
            text += (f"; the best larger batch, {best}, gives {estimate:.2f}x its texts/s [{low:.2f}-{high:.2f}]: "
                     f"{VERDICT_WORDS[beyond['verdict']]}")
        say(text)
    table = [{"batch": size, "items_per_s": row["items_per_s"], "p50_ms": row["p50_ms"],
              "items_per_s_low": size * 1e3 / row["ci95_high_ms"], "items_per_s_high": size * 1e3 / row["ci95_low_ms"]}
             for size, row in zip(sizes, rows)]
    return {"role": role, "model": label, "workload": workload, "knee_batch": knee, "beyond_knee": beyond,
            "stopped_because": stop_reason, "table": table}


def batch_sweep_section(ctx: cli.Context) -> dict:
    """Bigger batches buy throughput with latency until the hardware is busy; the knee is where that trade
    stops paying. The batch sizes are timed round-robin, so a busy neighbour slows them all alike."""
    loaded = ctx.load("encoder")
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer,
                         device=loaded.model.device)
    sweeps = {"encoder": sweep_one(ctx, "encoder", loaded.info.label, extractor, return_tensors=True)}
    classifier, info = classifier_pipeline(ctx)
    sweeps["classifier"] = sweep_one(ctx, "classifier", info.label, classifier)
    del classifier
    cleanup()
    ctx.report.add_chart(plots.chart(ctx.out_dir, "throughput_vs_batch", draw_sweep, sweeps))
    return sweeps


def devices_section(ctx: cli.Context) -> list[dict]:
    """The same workload on every device here, timed round-robin, so the comparison is the device and
    nothing else."""
    devices, missing = available_devices(ctx.device)
    for kind, reason in missing.items():
        ctx.report.skip(f"device {kind}", reason)
    batch, workloads = texts.repeated_sentences(TASK_TEXTS), {}
    for device in devices:
        loaded = ctx.load("encoder", device)
        extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer,
                             device=loaded.model.device)
        workloads[str(device)] = lambda e=extractor: e(batch, batch_size=len(batch), return_tensors=True)
    if len(devices) == 1:  # nothing to race: one line instead of a one-row table (the row still feeds --compare)
        name = str(devices[0])
        m = ctx.meter().measure(name, workloads[name], items=len(batch))
        row = runs.result_row(m, workload=name, measurement="devices: feature-extraction", model=loaded.info.label,
                              device=name, batch=len(batch))
        ctx.report.add_rows("5. Devices", [row])
        say(f"Only the {name} here, so nothing to race: {loaded.info.label} embeds {len(batch)} texts in "
            f"{m.median_ms:.3g} ms per call. With a GPU (--device cuda or mps) this section times both round-robin.")
        return [slim([row], ("workload", "p50_ms", "ci95_low_ms", "ci95_high_ms", "items_per_s"))[0]]
    # A meter on the last device (the accelerator, when there is one) synchronises it after every timed call.
    comparison = ctx.meter(devices[-1]).compare(workloads, items=len(batch), progress="devices",
                                                tokens=texts.count_tokens(loaded.tokenizer, batch, truncation=True))
    rows = ctx.show(comparison, "cpu", f"Devices: {loaded.info.label} embedding {len(batch)} texts per call",
                    extra={name: runs.result_row(m, measurement="devices: feature-extraction", model=loaded.info.label,
                                                 device=name, batch=len(batch))
                           for name, m in comparison.measurements.items()})
    table = slim(rows, ("workload", "p50_ms", "ci95_low_ms", "ci95_high_ms", "items_per_s", "speedup",
                        "speedup_low", "speedup_high", "verdict"))
    ctx.report.add_chart(plots.chart(ctx.out_dir, "devices_side_by_side", draw_devices, table))
    return table


def seed_models_on(ctx: cli.Context, device: torch.device, text: str) -> tuple[dict, dict, list[int]]:
    """Load DistilBERT and BERT-base on a device: a forward pass of each, and memory added by load + one pass."""
    forwards, memory, shape = {}, {}, []
    for role, name in SEED_MODELS.items():
        where = models.checkpoint(role, ctx.source)
        with CudaPeak(device) as cuda, PeakRSSSampler() as rss:
            started = time.perf_counter()
            model = AutoModel.from_pretrained(where.path, dtype=torch.float32, device_map=device)
            info = ctx.record(where.info(model, time.perf_counter() - started))
            tokenizer = AutoTokenizer.from_pretrained(where.path)
            inputs = tokenizer(text, truncation=True, max_length=SEED_INPUT_TOKENS, return_tensors="pt").to(device)
            shape = list(inputs["input_ids"].shape)

            def forward(model=model, inputs=inputs):
                with torch.inference_mode():
                    return model(**inputs)

            forward()  # inside the memory window: the activations of one pass count too
        forwards[name] = forward
        memory[name] = {"label": info.label, "meaningful": info.meaningful,
                        "bytes": cuda.delta_bytes if device.type == "cuda" else rss.peak_delta_bytes}
    return forwards, memory, shape


def seed_table_section(ctx: cli.Context) -> dict:
    """The course notes publish DistilBERT/BERT-base time and memory from another machine; here both are measured
    with the input shape stated, timed round-robin so that their ratio on this machine is a verdict."""
    devices = {"CPU": torch.device("cpu")}
    if len(gpus := available_devices(ctx.device)[0]) > 1:
        devices["GPU"] = gpus[1]
    else:
        ctx.report.skip("notes' table, GPU rows", "this run has no CUDA or MPS GPU (--device); the course notes' GPU "
                        "numbers stand alone")
    text = " ".join(texts.SENTENCES * 2)  # long enough that truncation leaves exactly SEED_INPUT_TOKENS real tokens
    measured, ratios = {}, {}
    for kind, device in devices.items():
        forwards, memory, shape = seed_models_on(ctx, device, text)
        comparison = ctx.meter(device).compare(forwards, items=shape[0], tokens=shape[0] * shape[1],
                                               progress=f"notes' table on {kind}")
        extra = {name: {**runs.result_row(m, measurement=f"notes' table: forward {shape}",
                                          model=memory[name]["label"], device=str(device), batch=shape[0]),
                        "notes_ms": SEED_TABLE[(name, kind)][0] * 1e3, "memory_gib": memory[name]["bytes"] / 2**30,
                        "notes_gb": SEED_TABLE[(name, kind)][1]} for name, m in comparison.measurements.items()}
        ctx.show(comparison, "BERT-base", f"The course notes' table on {kind}: one forward pass of {shape} tokens "
                 "here; notes_*: the notes' own numbers (another machine)", extra=extra,
                 columns=("notes_ms", "memory_gib", "notes_gb"))
        for name, m in comparison.measurements.items():
            measured[(name, kind)] = {"ours_time_s": m.stats.median, "ours_ci95_s": m.stats.ci_text(1, "s"),
                                      "ours_over_notes_time": m.stats.median / SEED_TABLE[(name, kind)][0],
                                      "ours_memory_gib": extra[name]["memory_gib"],
                                      "memory_measured_as": "CUDA allocated by load + one pass"
                                      if device.type == "cuda" else "RSS added by load + one pass"}
            explain_twin(memory[name]["label"], memory[name]["meaningful"])
        notes = SEED_TABLE[("BERT-base", kind)][0] / SEED_TABLE[("DistilBERT", kind)][0]
        estimate, low, high = comparison.ratio("DistilBERT", "BERT-base")
        ratios[kind] = {"ours": estimate, "ours_interval": [low, high], "notes": notes,
                        "verdict": comparison.verdict("DistilBERT", "BERT-base"), "notes_inside": low <= notes <= high}
        del forwards
        cleanup()
    say(f"Ours: batch {shape[0]} x {shape[1]} real tokens, float32, under torch.inference_mode(); memory_gib: "
        + "; ".join(f"{kind}, {measured[('BERT-base', kind)]['memory_measured_as']}" for kind in devices)
        + ". The notes state neither input shape nor what their memory counts, so their times compare machines, "
        "not code; a ratio compares the models: the notes' DistilBERT/BERT-base ratio ("
        + ", ".join(f"{kind} {r['notes']:.2f}x" for kind, r in ratios.items()) + ") lies "
        + ", ".join(f"{'inside' if r['notes_inside'] else 'outside'} this machine's interval on {kind}"
                    for kind, r in ratios.items()) + ".")
    rows = [{"model": model, "device": kind, "input_shape": f"{shape} tokens", "notes_time_s": time_s,
             "notes_memory_gb": memory_gb, **measured.get((model, kind), {"memory_measured_as": "not measured here"})}
            for (model, kind), (time_s, memory_gb) in SEED_TABLE.items()]
    ctx.report.add_chart(plots.chart(ctx.out_dir, "notes_table", draw_seed_table, rows, ratios))
    return {"input_shape": str(shape), "rows": rows, "distilbert_vs_bert": ratios}


def report_section(ctx: cli.Context, previous: dict | None) -> dict:
    """Every measurement in report.json and results.csv, and the article built from them in report.md and
    report.tex; with --compare, the machine and environment checked against a previous run, then a verdict for
    every shared measurement."""
    if previous is None:
        say(f"run again later with --compare {ctx.out_dir / 'report.json'} (copy it first) to see what changed")
        return {"compared_with": None}
    # the comparison needs this run's end point before finish() runs
    ctx.report.calibration["end"] = calibrate(ctx.device)
    current = ctx.report.to_dict()
    comparison = runs.compare_reports(previous, current)
    for name, report in (("the earlier run", previous), ("this run", current)):
        check = report.get("sections", {}).get("1. Meet the meter") or {}
        if check.get("instrument_check", "agree") != "agree":
            say(f"[instrument] in {name} the meter-vs-Timer check said '{check['instrument_check']}' "
                f"({check['meter_over_timer']:.3f}x): its times are less trustworthy than their intervals say")
    runs.print_comparison(comparison, f"Now vs {ctx.args.compare}")
    if comparison.changes:
        ctx.report.add_chart(runs.draw_comparison(comparison, ctx.out_dir))
    return {"compared_with": str(ctx.args.compare), "previous_created": previous.get("created"),
            **comparison.to_dict()}


# ------------------------------------------------------------------------------------------------- charts


def draw_latency(ax, outcome: dict) -> None:
    """Every call of each task over that task's own median: the spread reads alike whatever work a call does."""
    tasks = outcome["tasks"]
    relative = [np.asarray(outcome["latency_samples_ms"][task["task"]]) / task["p50_ms"] for task in tasks]
    ax.boxplot(relative, showfliers=True)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xticks(range(1, len(tasks) + 1), [f"{task['task']}\n{task['model']}" for task in tasks], fontsize=8)
    spread = [float(np.subtract(*np.percentile(values, [75, 25]))) for values in relative]
    widest = int(np.argmax(spread))
    ax.set(title=f"{tasks[widest]['task']} varies most: its middle half of calls spans {spread[widest]:.0%} of "
                 "its median", ylabel="call latency / the task's median",
           xlabel="task and model (box: the middle half of the calls, line: the median)")


def draw_memory(ax, outcome: dict) -> None:
    """Weights beside what one call needs on top of them, and the CUDA peak when present; each bar labelled."""
    tasks = outcome["tasks"]
    series = [("weights", [task["weights_mib"] for task in tasks]),
              ("one call, on top of the weights", [task["call_mib"] for task in tasks])]
    if any(task["cuda_alloc_mib"] is not None for task in tasks):
        series.append(("CUDA peak allocated by a call", [task["cuda_alloc_mib"] or 0 for task in tasks]))
    plots.grouped_bars(ax, [f"{task['task']}\n{task['model']}" for task in tasks], series, value_format="%.0f")
    worst = max(tasks, key=lambda task: task["call_mib"] / task["weights_mib"])
    share = worst["call_mib"] / worst["weights_mib"]
    ax.set(title=(f"The weights dominate: a call needs at most {share:.0%} of its model's weights on top"
                  if share < 1 else f"{worst['task']}: one call needs {share:.1f}x its weights on top of them"),
           ylabel="memory (MiB)", xlabel="task and model")


def draw_sweep(ax, sweeps: dict) -> None:
    """Each batch size's own texts/s with its median's interval, per workload (log2 x axis: sizes double), the
    knee starred."""
    for sweep in sweeps.values():
        table = sweep["table"]
        batches, values = [row["batch"] for row in table], [row["items_per_s"] for row in table]
        line = ax.errorbar(batches, values, yerr=[np.subtract(values, [row["items_per_s_low"] for row in table]),
                                                  np.subtract([row["items_per_s_high"] for row in table], values)],
                           marker="o", capsize=3, label=f"{sweep['role']}: {sweep['model']}").lines[0]
        if sweep["knee_batch"] is not None:
            knee = next(row for row in table if row["batch"] == sweep["knee_batch"])
            ax.plot([knee["batch"]], [knee["items_per_s"]], marker="*", markersize=16, color=line.get_color(),
                    linestyle="none", label=f"{sweep['role']}'s knee (batch {knee['batch']})")
    plots.log2_x(ax, [row["batch"] for sweep in sweeps.values() for row in sweep["table"]])
    knees = [f"{sweep['knee_batch']} ({sweep['role']})" for sweep in sweeps.values() if sweep["knee_batch"]]
    ax.set(title=("More batch stops paying at batch " + " and ".join(knees)) if knees else
           "Throughput still grows at the largest batch: no knee yet",
           xlabel="batch size (texts per call, log2 scale)", ylabel="texts per second")
    plots.legend_outside(ax, "error bars: the median's 95% interval")


def draw_devices(ax, rows: list[dict]) -> None:
    """Median latency per device with the median's interval as the error bar; the title is the best's speed-up."""
    bars = ax.bar([row["workload"] for row in rows], [row["p50_ms"] for row in rows],
                  yerr=[[row["p50_ms"] - row["ci95_low_ms"] for row in rows],
                        [row["ci95_high_ms"] - row["p50_ms"] for row in rows]], capsize=6, width=0.5)
    ax.bar_label(bars, [f"{row['items_per_s']:.1f} texts/s" for row in rows], label_type="center", color="white")
    best = max(rows, key=lambda row: row["speedup"])
    ax.set(title=f"{best['workload']} is {best['speedup']:.1f}x the CPU's speed ({best['verdict']})", xlabel="device",
           ylabel="median latency per call (ms; bar: the median's interval)")


def draw_seed_table(ax, rows: list[dict], ratios: dict) -> None:
    """Our measured time next to the course notes' published one, per model and device."""
    ours = [None if row.get("ours_time_s") is None else row["ours_time_s"] * 1e3 for row in rows]
    plots.grouped_bars(ax, [f"{row['model']}\n{row['device']}" for row in rows],
                       [("this machine", ours), ("the course notes (another machine)",
                                             [row["notes_time_s"] * 1e3 for row in rows])],
                       missing="not\nmeasured\nhere")
    plots.log_y(ax)
    ax.set(title="DistilBERT's speed over BERT-base's: " + "; ".join(
        f"{kind} {ratio['ours']:.2f}x here, {ratio['notes']:.2f}x in the notes" for kind, ratio in ratios.items()),
           xlabel=f"model and device (input {rows[0]['input_shape']} here)", ylabel="forward pass (ms, log scale)")


# ---------------------------------------------------------------- 7. What you would ship

@dataclass(frozen=True)
class Contest:
    """What --quick shrinks in the contest."""

    texts: int  # real paragraphs timed: one half chooses, the other (held out) confirms
    max_length: int  # tokens each text is cut to, here and in the snippet
    calibration: int  # other paragraphs, never timed, that NNCF calibrates OpenVINO int8 on
    rounds: int  # round-robin rounds per half
    peak_sizes: tuple[int, ...]  # square fp32 matmuls whose fastest call is the FLOP/s reference


CONTEST, CONTEST_QUICK = Contest(256, 128, 64, 5, (512, 1024, 2048)), Contest(12, 32, 4, 2, (512,))
SHIP_BATCH = 32  # what the snippet is pasted with, with the max_length: its fidelity is checked at exactly these
FIDELITY_BAR = recipe.FidelityBar(0.99, 0.98)  # cosine mean and worst text vs the reference, on both halves
APPROXIMATE = (PYTORCH_INT8, ONNX_INT8, OPENVINO_INT8)  # int8 changes the output; the rest compute fp32 exactly
FLOPS_FRACTION_TARGET = 0.7
PEAK_REPEATS = 5
EXAMPLE_TEXTS = [texts.SENTENCES[2], texts.SENTENCES[7]]  # what the pasted snippet embeds (Turkish too)


def contestants(ctx: cli.Context, where: models.Checkpoint, loaded: models.LoadedModel, calibration: list[str],
                max_length: int, forwards: dict) -> dict[str, Callable[[], Callable[[list[str]], torch.Tensor]]]:
    """Each candidate as a builder of embed(texts). All but sentence-transformers share runtimes.embed_sorted
    (tokenise once, length-sorted batches of SHIP_BATCH, mean-pool, L2-normalise) and differ only in the forward
    that turns a padded batch into the last hidden state; that forward is kept in `forwards` for the snippet's
    time split."""
    model, tokenizer = loaded.model, loaded.tokenizer
    threads, names = torch.get_num_threads(), list(tokenizer.model_input_names)
    reduce_range = choose_activation_range().reduce_range  # the safe int8 range on this CPU (section 3 of 03)

    def shared(name: str, make_forward: Callable[[], Callable[[dict], torch.Tensor]]):
        def build() -> Callable[[list[str]], torch.Tensor]:
            forwards[name] = forward = make_forward()
            return lambda corpus: runtimes.embed_sorted(forward, tokenizer, corpus, SHIP_BATCH, max_length)
        return build

    def pytorch(quantized: bool) -> Callable[[dict], torch.Tensor]:
        ready = model
        if quantized:  # stock module: 7-bit activations, safe on every x86 CPU; only public API
            with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
                warnings.simplefilter("ignore")
                ready = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {
                    torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)

        def forward(batch: dict) -> torch.Tensor:
            with torch.inference_mode():
                return ready(**batch.to(ctx.device)).last_hidden_state
        return forward

    def sentence_transformers() -> Callable[[list[str]], torch.Tensor]:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(where.path), device=str(ctx.device))
        st.max_seq_length = max_length  # the bundled folder says 256; every candidate truncates alike
        return lambda corpus: st.encode(corpus, batch_size=SHIP_BATCH, convert_to_tensor=True,
                                        normalize_embeddings=True, show_progress_bar=False).float().cpu()

    def onnx_runtime(quantized: bool) -> Callable[[dict], torch.Tensor]:
        import onnxruntime as ort

        path = runtimes.export_onnx(model, tokenizer, ctx.out_dir / "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # as many as torch uses: like for like
        session = ort.InferenceSession(str(runtimes.quantize_onnx_int8(path, reduce_range) if quantized else path),
                                       options, providers=["CPUExecutionProvider"])
        return lambda batch: torch.from_numpy(session.run(["last_hidden_state"],
                                                          {name: batch[name].numpy() for name in names})[0])

    def openvino(quantized: bool) -> Callable[[dict], torch.Tensor]:
        import openvino as ov

        converted = ov.convert_model(runtimes.export_onnx(model, tokenizer, ctx.out_dir / "onnx"))
        if quantized:  # static int8: activation ranges from calibration paragraphs that are never timed
            import nncf
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

            samples = [dict(tokenizer(text, truncation=True, max_length=max_length, return_tensors="np"))
                       for text in calibration]
            # without VNNI, 7-bit weights keep int8 sums from overflowing, as 7-bit activations do for PyTorch
            overflow = OverflowFix.ENABLE if reduce_range else OverflowFix.DISABLE
            nncf.set_log_level(logging.ERROR)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress bars
                converted = nncf.quantize(converted, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                          subset_size=len(samples),
                                          advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow))
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads})
        return lambda batch: torch.from_numpy(compiled({name: batch[name].numpy() for name in names})[0])

    return {SENTENCE_TRANSFORMERS: sentence_transformers, PYTORCH_FP32: shared(PYTORCH_FP32, lambda: pytorch(False)),
            PYTORCH_INT8: shared(PYTORCH_INT8, lambda: pytorch(True)),
            ONNX_FP32: shared(ONNX_FP32, lambda: onnx_runtime(False)),
            ONNX_INT8: shared(ONNX_INT8, lambda: onnx_runtime(True)),
            OPENVINO_FP32: shared(OPENVINO_FP32, lambda: openvino(False)),
            OPENVINO_INT8: shared(OPENVINO_INT8, lambda: openvino(True))}


def contest_round(ctx: cli.Context, embedders: dict, corpus: list[str], rounds: int, progress: str,
                  ) -> tuple[Comparison, recipe.Fidelity]:
    """Every candidate over the same texts, round-robin; each one's cosine mean and min against the reference
    (sentence-transformers' encode, else PyTorch fp32) on these texts."""
    outputs: dict[str, torch.Tensor] = {}

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = embedders[name](corpus)
        return run

    comparison = ctx.meter().compare({name: timed(name) for name in embedders}, items=len(corpus), warmup=1,
                                     min_rounds=rounds, budget_s=0, progress=progress)
    reference = outputs[SENTENCE_TRANSFORMERS if SENTENCE_TRANSFORMERS in outputs else PYTORCH_FP32]
    return comparison, {name: tuple(cosine_fidelity(reference, out).values()) for name, out in outputs.items()}


def cosines(fidelity: recipe.Fidelity, **more: dict) -> dict[str, dict]:
    """The extra table columns per candidate: its cosine mean and min against the reference, and `more`."""
    return {name: {"cos_mean": f"{mean:.4f}", "cos_min": f"{worst:.4f}",
                   **{column: values[name] for column, values in more.items() if name in values}}
            for name, (mean, worst) in fidelity.items()}


def ship_section(ctx: cli.Context) -> dict:
    """What you would ship: the runtimes a learner would reach for (sentence-transformers, ONNX Runtime, OpenVINO)
    beside plain PyTorch, chosen on half of the paragraphs and confirmed on the other half, which the choice never
    saw; only a confirmed winner becomes the code to paste."""
    c = ctx.pick(CONTEST, CONTEST_QUICK)
    max_length, reduce_range = c.max_length, choose_activation_range().reduce_range
    where, loaded = models.checkpoint("encoder", ctx.source), ctx.load("encoder")
    corpus = cli.read_user_texts(ctx.args) or texts.documentation_paragraphs(c.texts)
    lengths = [len(ids) for ids in loaded.tokenizer(corpus, truncation=True, max_length=max_length)["input_ids"]]
    choosing, confirming = texts.held_out_halves(corpus, lengths)
    calibration = [text for text in texts.documentation_paragraphs(c.texts + c.calibration)
                   if text not in corpus][:c.calibration]
    say(f"{len(corpus)} {'of your texts' if ctx.args.text or ctx.args.text_file else 'paragraphs of Python docs'}"
        f" split by length into a choosing and a held-out half; batches of {SHIP_BATCH}, max_length {max_length}. "
        f"Bar: {FIDELITY_BAR.text()} vs encode on both halves; int8 must beat the fastest exact option beyond "
        "+-3%; its ranges: " + ("7-bit (no VNNI: 8 could overflow)." if reduce_range else "8-bit (VNNI)."))
    problems = runtimes.peer_problems(where.path, ctx.device)
    problems[PYTORCH_INT8] = variant_unavailable("int8-dynamic", ctx.device)
    if ctx.quick:  # the full run has them
        problems[ONNX_INT8] = problems[ONNX_INT8] or "--quick (quantising the export takes seconds)"
        problems[OPENVINO_INT8] = problems[OPENVINO_INT8] or "--quick (NNCF's calibration takes ~20 s)"
    forwards: dict[str, Callable] = {}
    built = ctx.build_each("contest", contestants(ctx, where, loaded, calibration, max_length, forwards), problems.get,
                           lambda embed: embed(EXAMPLE_TEXTS))
    embedders = {name: entry["model"] for name, entry in built.items()}
    baseline = SENTENCE_TRANSFORMERS if SENTENCE_TRANSFORMERS in embedders else PYTORCH_FP32

    chosen_on, fidelity_a = contest_round(ctx, embedders, choosing, c.rounds, "choosing half")
    ctx.show(chosen_on, baseline, f"Choosing half: {len(choosing)} paragraphs per call", extra=cosines(fidelity_a),
             columns=("cos_mean", "cos_min"))
    choice = recipe.choose(list(embedders), chosen_on.ratio, fidelity_a, FIDELITY_BAR, APPROXIMATE)
    if choice.excluded:
        say("cannot win: " + "; ".join(f"{name}, {why}" for name, why in choice.excluded.items()), "  ")
    if choice.winner is None:
        raise RuntimeError(f"no candidate kept {FIDELITY_BAR.text()}, so there is nothing to ship")
    fastest_int8 = recipe.fastest([name for name in embedders if name in APPROXIMATE], chosen_on.ratio)
    other = choice.fastest_exact if choice.winner in APPROXIMATE else fastest_int8
    trade = f" ({'int8' if choice.winner in APPROXIMATE else 'exact'})"
    if other and other != choice.winner:  # what the approximation gains in speed and costs in fidelity
        why = ("beyond +-3%, so int8 wins" if choice.winner in APPROXIMATE else "outside the bar" if other in choice.excluded
               else "not beyond +-3%, so the exact one wins")
        int8, exact = (choice.winner, other) if choice.winner in APPROXIMATE else (other, choice.winner)
        trade += (f": {'it' if int8 == choice.winner else 'the fastest int8, ' + int8 + ','} runs "
                  f"{chosen_on.ratio_text(int8, exact)} {exact}'s speed at worst cosine {fidelity_a[int8][1]:.4f}, {why}")
    say(f"chosen: {choice.winner}{trade}")

    peaks = [matmul_peak(c.peak_sizes, PEAK_REPEATS, ctx.device)]
    held_out, fidelity_b = contest_round(ctx, embedders, confirming, c.rounds, "held-out half")
    peak = max(peaks + [matmul_peak(c.peak_sizes, PEAK_REPEATS, ctx.device)], key=lambda p: p["flops"])
    both = [name for name in embedders if name not in choice.excluded and FIDELITY_BAR.keeps(*fidelity_b[name])]
    refused = recipe.confirm(choice.winner, [name for name in embedders if name not in choice.excluded],
                             held_out.ratio, fidelity_b, FIDELITY_BAR, APPROXIMATE)
    shipped = choice.winner if not refused else recipe.fastest([n for n in both if n not in APPROXIMATE],
                                                               held_out.ratio)
    if shipped is None:
        raise RuntimeError(f"{choice.winner} was not confirmed ({refused}) and no exact candidate kept the bar")
    exact = recipe.fastest([name for name in both if name not in APPROXIMATE], held_out.ratio)
    approx = recipe.fastest([name for name in both if name in APPROXIMATE], held_out.ratio)
    held_lengths = [len(ids) for ids in loaded.tokenizer(confirming, truncation=True, max_length=max_length)[
        "input_ids"]]
    work = {name: recipe.pass_work(loaded.model.config, held_lengths, SHIP_BATCH,
                                   int8_streamed(loaded.model) if name in APPROXIMATE else
                                   streamed_weight_bytes(loaded.model)) for name in embedders}
    roles = {exact: "best exact", approx: "best int8"}
    roles[shipped] = "shipped"  # the baseline row is the best exact option, so "shipped" there says both
    rows = ctx.show(held_out, exact or shipped, f"Held-out half: {len(confirming)} other paragraphs; pick: the "
                    "fastest exact and int8 options keeping the bar, and the one shipped", columns=(
                        "cos_mean", "cos_min", "pick"), extra=cosines(fidelity_b, pick={k: v for k, v in roles.items()
                                                                                        if k}))
    say(f"{'confirmed' if not refused else 'NOT confirmed'}: {choice.winner}" + (
        f" ({refused}); shipping {shipped}, the fastest exact candidate keeping the bar on both halves" if refused
        else ""))
    best = recipe.best_peer(both, held_out.ratio, fidelity_b, FIDELITY_BAR, PEERS, shipped)
    if best:
        ctx.report.add_bar(ratio_bar("recipe vs best peer runtime", ">= 1.0x the best other peer in the bar",
                                     f"{shipped} {held_out.ratio_text(shipped, best)} {best}",
                                     held_out.ratio(shipped, best), held_out.rounds, 1.0))
    if exact:  # fp32 work against the fp32 matmul peak: an int8 pass would be measured against the wrong roof
        stats = held_out.measurements[exact].stats
        fraction = tuple(work[exact][0] / seconds / peak["flops"] for seconds in (stats.median, stats.ci95_high,
                                                                                   stats.ci95_low))
        ctx.report.add_bar(limit_bar("fastest exact option's FLOP/s vs matmul peak", f">= {FLOPS_FRACTION_TARGET:.0%}",
                                     f"{exact}: {fraction[0]:.0%} [{fraction[1]:.0%}-{fraction[2]:.0%}] of "
                                     f"{peak['flops'] / 1e9:.1f} GFLOP/s, the best fp32 matmul (useful: real tokens' "
                                     "FLOPs only)", fraction, held_out.rounds, FLOPS_FRACTION_TARGET))
    if shipped in forwards:
        share = runtimes.outside_forward_share(forwards[shipped], loaded.tokenizer, confirming, SHIP_BATCH,
                                               max_length)
        say(f"{shipped}: {share:.0%} of a pass is outside the model's forward (tokenising, padding, pooling, copies)")
    bandwidth = ctx.report.calibration.get("start", {}).get("copy_gb_s")
    if bandwidth and exact and ctx.device.type == "cpu":  # the calibration's copy measures host memory: a CPU's roof
        ctx.report.add_chart(roofline_chart(rows, work, exact, peak["flops"], bandwidth * 1e9, ctx.out_dir))
    return {"shipped": shipped, "chosen": choice.winner, "not_confirmed": refused, "best_peer": best,
            "fidelity_choosing": fidelity_a, "fidelity_held_out": fidelity_b, "excluded": choice.excluded,
            "snippet": paste(ctx, shipped, calibration, max_length)}


def int8_streamed(model: torch.nn.Module) -> int:
    """Bytes a forward streams once the Linears hold int8 weights (a quarter of their fp32 bytes)."""
    linear = sum(model.get_submodule(name).weight.nbytes for name in linear_names(model))
    return streamed_weight_bytes(model) - linear * 3 // 4


def paste(ctx: cli.Context, shipped: str, calibration: list[str], max_length: int) -> str:
    """Print the shipped candidate's code, and write it (with OpenVINO int8's calibration texts) to the output folder."""
    entry = models.CATALOG.get(ctx.load("encoder").info.name)
    code = runtimes.snippet(shipped, entry.hub_id if entry else ctx.load("encoder").info.name, EXAMPLE_TEXTS,
                            SHIP_BATCH, max_length, torch.get_num_threads(), choose_activation_range().reduce_range)
    code = (f"# confirmed on held-out texts; fidelity checked at batch_size={SHIP_BATCH}, max_length={max_length} "
            f"only (int8 moves with both)\n{code}")
    (ctx.out_dir / "recipe.py").write_text(code + "\n")
    if shipped == OPENVINO_INT8:
        (ctx.out_dir / "calibration.txt").write_text("\n".join(calibration) + "\n")
    shared = inspect.getsource(runtimes.embed_sorted)  # the same loop in every snippet, taught in 03's section 6
    shown = code.replace(shared, f"{shared.splitlines()[0]}\n    ...  # the shared loop: in full in recipe.py\n")
    print(f"to paste: {ctx.out_dir / 'recipe.py'}, runnable as it is; its lines:\n{'-' * 78}\n{shown}\n{'-' * 78}")
    return code


def roofline_chart(rows: list[dict], work: dict, exact: str, peak_flops: float, bandwidth: float,
                   out_dir: Path) -> Path | None:
    """Each fp32 candidate's useful FLOP/s against its arithmetic intensity, under this run's fp32 matmul and memory
    roofs (int8 has other roofs, not measured here)."""
    points = [{"group": "fp32 (exact)", "label": row["workload"],
               "intensity": work[row["workload"]][0] / work[row["workload"]][1],
               "flops": work[row["workload"]][0] / row["p50_ms"] * 1e3} for row in rows
              if row["workload"] not in APPROXIMATE]
    mine = next(point for point in points if point["label"] == exact)
    ridge = peak_flops / bandwidth
    bound = "past the ridge: compute-bound" if mine["intensity"] >= ridge else "under the memory roof"
    title = (f"{exact} reaches {mine['flops'] / peak_flops:.0%} of the fp32 matmul peak at "
             f"{mine['intensity']:.0f} FLOP/byte,\n{bound} (ridge {ridge:.0f} FLOP/byte)")
    if mine["flops"] > peak_flops:  # a roof something measured passes through is no roof (its bar says the same)
        title = (f"{exact} runs at {mine['flops'] / peak_flops:.0%} of torch's best fp32 matmul:\nthat matmul "
                 "is not this machine's limit, so this roof is only a reference")
    fig, ax = plots.figure(title,
                           "arithmetic intensity (useful FLOPs per byte moved: weights + activations)",
                           "useful GFLOP/s (real tokens only)", size=(8, 6))
    plots.roofline(ax, points, peak_flops, bandwidth, f"roofs: {bandwidth / 1e9:.1f} GB/s memory copy (calibration), "
                   f"{peak_flops / 1e9:.1f} GFLOP/s fp32 matmul (best-of)")
    return plots.save(fig, out_dir, "roofline")


SECTIONS = {"meter": ("1. Meet the meter", meet_the_meter_section), "loads": ("2. Model load time", load_time_section),
            "tasks": ("3. Task benchmarks", task_section), "sweep": ("4. Batch-size sweep", batch_sweep_section),
            "devices": ("5. Devices", devices_section),
            "seed": ("6. The course notes' table, reproduced", seed_table_section),
            "ship": ("7. What you would ship", ship_section)}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--compare", type=Path, metavar="PREVIOUS.json",
                        help="a previous run's report.json: check machine and environment, then give every shared "
                             "measurement a verdict from both runs' samples")
    cli.add_only_option(parser, SECTIONS)
    cli.add_text_options(parser)  # section 7's paragraphs: your own instead of Python's documentation
    args = parser.parse_args(argv)
    if (given := cli.read_user_texts(args)) is not None and len(given) < 4:
        raise UserError(f"--text/--text-file gave {len(given)} text(s); section 7 splits them into two halves of "
                        "at least 2, so give at least 4")
    # fail before minutes of measuring
    previous = runs.load_report(args.compare, SCRIPT, REPORT_VERSION) if args.compare else None
    ctx = cli.start(__file__, args)
    paper.attach(ctx.report)  # report.md and report.tex: the article, rebuilt from the data at every write
    # a calibration after every section as well: --compare then sees a machine that changed for a few sections only
    cli.run_sections(ctx, SECTIONS, only=args.only, after_each=lambda: ctx.report.calibration.setdefault(
        "sections", []).append(calibrate(ctx.device)))
    ctx.report.run_section("8. Report and comparison", report_section.__doc__, report_section, ctx, previous)
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
