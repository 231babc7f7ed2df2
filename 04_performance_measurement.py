#!/usr/bin/env python3
"""04 · Performance measurement: the PerformanceMeter as an instrument you can trust and cite.

Checks the meter against torch.utils.benchmark, then benchmarks model loads, four pipeline tasks, batch sizes and
devices, re-measures the course notes' DistilBERT/BERT table, and writes report.json, results.csv and report.md. A later
run with `--compare report.json` checks the machine and the environment first, then gives every shared
measurement a verdict from both runs' raw samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (first: it quiets torchao's import-time warnings; see common/__init__.py)
import numpy as np
import torch
from torch.utils.benchmark import Timer
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from common import cli, models, pipelines, plots, runs, texts
from common.calibration import calibrate
from common.device import mps_available, timed_once
from common.memory import MIB, CudaPeak, PeakRSSSampler, cleanup, rss_bytes, weights_bytes
from common.meter import VERDICT_WORDS, PerformanceMeter, measure_generation, verdict_of
from common.report import REPORT_VERSION, format_value, print_table, say
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
TWIN_NOTE = ("twin: random weights with the real parameter count and layer shapes; its borrowed tokenizer splits "
             "text differently from the real model's, so the same text gives a different number of tokens")
SCRIPT = Path(__file__).stem


# ------------------------------------------------------------------------------------------------ helpers


def available_devices(run_device: torch.device) -> tuple[list[torch.device], dict[str, str]]:
    """The CPU and this run's GPU (the one --device chose, so the environment describes it), and why any other
    backend is not timed."""
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
        say("(offline: the classifier role is the registered 'embedding-classification' stand-in, MiniLM plus "
              "similarity to example sentences, not a fine-tuned DistilBERT; its speed is a MiniLM encoder's)")
    return classifier, info


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

    meter = ctx.meter()
    m = meter.measure(workload, call, items=len(batch),
                      tokens=texts.count_tokens(loaded.tokenizer, batch, truncation=True))
    s = m.stats
    sync = ("torch.cuda/mps.synchronize() after every call, so the clock stops when the GPU is done"
            if ctx.device.type in ("cuda", "mps") else "not needed on CPU: the call returns when the work is done")
    tail = f"p99 {s.p99 * 1e3:.2f} ms" if s.p99 is not None else f"max {s.max * 1e3:.2f} ms (p99 needs 100 samples)"
    print(f"workload: {workload}\n  warm-up       {meter.warmup} untimed calls first (lazy init, allocator growth, "
          f"cold caches)\n  sync          {sync}\n  repeats       {s.count} timed calls: at least {meter.min_runs} "
          f"and until {meter.budget_s:g} s passed (took {m.wall_s:.2f} s)")
    print(f"  percentiles   p50 {s.median * 1e3:.2f} ms  p90 {s.p90 * 1e3:.2f} ms  {tail}")
    print(f"  median CI     {s.ci_text()} (exact order statistics, no normality assumed)")
    print(f"  noise         IQR {s.iqr * 1e3:.2f} ms = {s.iqr / s.median:.1%} of the median; above 10% the meter "
          f"warns: {'WARNED' if m.noisy else 'quiet enough'}")
    for warning in m.warnings:
        say(f"[noise] {warning}")

    overhead_s = meter.overhead_per_call_s(OVERHEAD_RUNS)
    say(f"\nmeter overhead: {overhead_s * 1e6:.2f} µs per timed call (an empty function, {OVERHEAD_RUNS} calls; "
          f"target < {OVERHEAD_TARGET_S * 1e6:.0f} µs: {'OK' if overhead_s < OVERHEAD_TARGET_S else 'OVER'}) "
          f"= 1/{s.median / overhead_s:,.0f} of this call's median")
    row = runs.result_row(m, measurement="one pipeline call", model=loaded.info.label, device=str(ctx.device),
                          batch=len(batch))
    ctx.report.add_rows("1. Meet the meter", [row])
    return {"workload": workload, "measurement": row, "meter_overhead_us": overhead_s * 1e6,
            "overhead_target_us": OVERHEAD_TARGET_S * 1e6, "overhead_ok": overhead_s < OVERHEAD_TARGET_S,
            **instrument_check(ctx, meter, call, workload)}


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
    ratio, low, high, coverage = runs.ratio_interval(timer_samples, meter_samples)  # meter / Timer
    verdict = runs.agreement(ratio, low, high, INSTRUMENT_TOLERANCE)
    meter_ms, timer_ms = float(np.median(meter_samples)) * 1e3, float(np.median(timer_samples)) * 1e3
    say(f"\ninstrument check, {s.instrument_rounds} alternating rounds: PerformanceMeter.measure median "
          f"{meter_ms:.3g} ms of {len(meter_samples)} calls; torch Timer.blocked_autorange median {timer_ms:.3g} ms of "
          f"{len(timer_samples)} blocks of {'/'.join(map(str, sorted(per_block)))} call(s) (a block's mean)")
    say(f"meter / Timer median: {ratio:.3f} (interval {low:.3f}-{high:.3f}, {coverage:.0%} coverage) -> " + {
        "agree": "they agree within 5%",
        "disagree": "DISAGREE by more than 5%: do not trust small differences from this run; --compare repeats this",
        "inconclusive": "inconclusive: the interval is wider than 5% either side, the machine is too busy to check "
                        "the instrument; --compare repeats this"}[verdict])
    return {"meter_median_ms": meter_ms, "timer_median_ms": timer_ms, "meter_over_timer": ratio,
            "meter_over_timer_interval": [low, high], "instrument_check": verdict}


def load_time_section(ctx: cli.Context) -> list[dict]:
    """Start-up cost: the first load of a checkpoint in this process against the same load again, one load
    each (a load is not repeatable), each followed by its first inference. safetensors weights are memory-mapped,
    not read, at load: their pages come in when the first inference touches them, so time to first inference
    (load + first inference) and RSS after it are the start-up cost; load time and load peak alone understate it."""
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
    say("cold = first load of that checkpoint in this process (section 1 already imported the loading code), warm = "
        "the same load again; both may read the OS page cache. One load each: cold/warm is one ratio, not a verdict. "
        "ttfi = time to first inference: the load plus one forward of a short prompt (an encoder-decoder: its first "
        "token). load_peak = the kernel's RSS high-water mark during the load minus RSS before it; resident = RSS "
        "after the first inference minus RSS before the load.")
    if ctx.device.type == "cpu":  # on a GPU the weights do not live in RSS, so the comparison would mean nothing
        mapped = [row["model"] for row in table if row["cold_load_peak_mib"] < 0.5 * row["weights_mib"]
                  <= row["cold_resident_mib"]]
        say(f"memory-mapped (under half the weights resident after the load, at least half after the first "
              f"inference): {len(mapped)} of {len(table)} cold loads{': ' + ', '.join(mapped) if mapped else ''}")
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
    m = meter.measure(task, lambda: run(batch, batch_size=len(batch), **options), items=len(batch),
                      tokens=texts.count_tokens(run.tokenizer, batch, truncation=True))
    return {"task": task, "model": info.label, "per_call": f"{len(batch)} texts", "tokens_counted": "input",
            "weights_mib": weights_bytes(run.model) / MIB, "measurements": [m]}


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
    sample = generate(new_tokens, return_full_text=False)[0]["generated_text"]
    say(f"{PROMPT!r} -> {sample!r}" + ("" if loaded.info.meaningful else f"  ({TWIN_NOTE}; its text is noise)"))
    g = measure_generation(meter, "text-generation", lambda n: generate(n, return_full_text=False), new_tokens)
    return {"task": "text-generation", "model": loaded.info.label, "per_call": f"1 prompt, {new_tokens} new tokens",
            "tokens_counted": "generated", "weights_mib": weights_bytes(loaded.model) / MIB,
            "measurements": [g.first_token, g.full],
            "generation": {"model": loaded.info.label, "new_tokens": new_tokens,
                           "ttft_ms": g.time_to_first_token_s * 1e3, "ttft_ci": g.first_token.stats.ci_text(),
                           "per_token_ms": g.per_token_s * 1e3}}


def bench_text_to_text(ctx: cli.Context, meter: PerformanceMeter) -> dict:
    """The seq2seq role through the registered text-to-text pipeline, exactly N new tokens per call."""
    loaded, new_tokens = ctx.load("seq2seq"), ctx.pick(FULL, QUICK).new_tokens
    rewriter = pipeline(pipelines.TEXT_TO_TEXT, model=loaded.model, tokenizer=loaded.tokenizer,
                        device=loaded.model.device)
    text = "summarize: " + " ".join(texts.SENTENCES[:3])
    output = rewriter(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if output["output_tokens"] - 1 != new_tokens:  # the output also holds the decoder's start token
        raise RuntimeError(f"asked for {new_tokens} new tokens, the model produced {output['output_tokens'] - 1}")
    say(f"text-to-text output: {output['generated_text']!r}" +
          ("" if loaded.info.meaningful else f"  ({TWIN_NOTE}; its text is noise)"))
    m = meter.measure("text-to-text", lambda: rewriter(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                      items=1, tokens=new_tokens)
    return {"task": "text-to-text", "model": loaded.info.label, "per_call": f"1 text, {new_tokens} new tokens",
            "tokens_counted": "generated", "weights_mib": weights_bytes(loaded.model) / MIB, "measurements": [m]}


def task_section(ctx: cli.Context) -> dict:
    """Four pipeline tasks, four models, one meter: tail latency, throughput in texts and real tokens,
    and the memory each one holds; a failing task is recorded and the others go on."""
    section, meter = "3. Task benchmarks", ctx.meter()
    tasks, generation = [], None
    benches = {"feature-extraction": bench_texts, "text-classification": bench_texts,
               "text-generation": bench_text_generation, "text-to-text": bench_text_to_text}
    for name, bench in benches.items():
        print(f"\n--- {name}")
        result = ctx.report.attempt(f"{section}: {name}", lambda: bench(ctx, meter, name) if bench is bench_texts
                                    else bench(ctx, meter), fails_run=True)  # the exit code still says it broke
        cleanup()
        if result is None:
            continue
        *first, m = result.pop("measurements")  # generation also measured its first token alone
        generation = result.pop("generation", generation)
        rows = [runs.result_row(x, measurement=f"{name} ({per_call})", model=result["model"], device=str(ctx.device))
                for x, per_call in zip([*first, m], ["1 prompt, 1 new token"] * len(first) + [result["per_call"]])]
        for warning in [w for x in (*first, m) for w in x.warnings]:
            say(f"[noise] {warning}")
        ctx.report.add_rows(section, rows)
        tasks.append({**result, **rows[-1]})
    if not tasks:
        raise RuntimeError("every task failed")
    print_table(tasks, ["task", "model", "per_call", "p50_ms", "items_per_s"],
                title=f"Task latency and throughput on {ctx.device}")
    say("throughput = work per call / median call; tokens/s counts real tokens only: input tokens without padding "
          "for the encoder tasks, generated tokens for the generation tasks. tokens/s, p90, p99 (it needs 100 "
          "samples), the maximum and the run count are in results.csv.")
    print_table(tasks, ["task", "weights_mib", "working_rss_mib", "peak_rss_mib", "cuda_alloc_mib", "cpu_util_pct",
                        "gpu_util_pct"], title="Memory and utilisation while measuring")
    say("weights: memory.weights_bytes; working RSS: the kernel's peak RSS during the timed calls above RSS before "
        "them (0: the warm-up calls already made the process hold what the timed calls need); peak RSS: the whole "
        "process (earlier sections' models included); cpu_util: CPU time / wall time.")
    if generation:
        print_table([generation], title="Generation latency (greedy; medians of 1-token and N-token calls; its "
                                        "tokens/s is in the table above)")
    outcome = {"tasks": tasks, "generation": generation,
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
    rows = [runs.result_row(m, measurement=f"batch sweep: {role}", model=label, device=str(ctx.device), batch=size)
            for size, m in zip(sizes, comparison.measurements.values())]
    ctx.report.add_rows("4. Batch-size sweep", rows)
    def gain(larger: int, smaller: int) -> tuple[float, ...]:
        """Throughput of one size over another: the paired per-round speed ratio times texts per call."""
        return tuple(x * larger / smaller for x in comparison.ratio(f"batch {larger}", f"batch {smaller}"))

    # One estimator: every throughput figure of this sweep is batch 1's texts / median call times the paired ratio
    base = rows[0]["items_per_s"]
    table = [{"batch": r["batch"], "items_per_s": base * gain(r["batch"], sizes[0])[0],
              "throughput_vs_batch1": gain(r["batch"], sizes[0])[0],
              "interval": "{:.2f}-{:.2f}".format(*gain(r["batch"], sizes[0])[1:]), "noisy": r["noisy"]} for r in rows]
    workload = f"{role}: {label}, {pipe.task}"
    print_table(table, title=f"{workload} on {ctx.device}: one call = one batch, all sizes timed round-robin")
    print(f"texts/s = batch {sizes[0]}'s texts / its median call x throughput_vs_batch1 (the paired per-round ratio, "
          "with its interval):\none estimator, so the two columns rank the sizes alike (each size's own median "
          "latency is in results.csv)")
    knee = find_knee(sizes, gain)
    best = max(table, key=lambda r: r["throughput_vs_batch1"])["batch"]
    if knee is None:
        say(f"{workload}: no knee in batch sizes {sizes[0]}..{sizes[-1]}: batch {sizes[-1]} still beats "
              f"batch {sizes[-2]}, so throughput has not levelled off")
    elif knee == best:
        say(f"{workload}: knee at batch {knee}: no larger batch beats it, and it is also the best measured")
    else:
        estimate, low, high = gain(best, knee)
        say(f"{workload}: knee at batch {knee}: no larger batch beats it; batch {best}'s {estimate:.2f}x its "
              f"throughput (interval {low:.2f}-{high:.2f}) is {VERDICT_WORDS[verdict_of(low, high)]}")
    return {"role": role, "model": label, "workload": workload, "knee_batch": knee, "best_batch": best,
            "stopped_because": stop_reason, "table": table,
            "items_per_s_interval": [[base * x for x in gain(size, sizes[0])[1:]] for size in sizes]}


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
    nothing else; the advice follows the verdict."""
    devices, missing = available_devices(ctx.device)
    for kind, reason in missing.items():
        ctx.report.skip(f"device {kind}", reason)
    batch, workloads = texts.repeated_sentences(TASK_TEXTS), {}
    for device in devices:
        loaded = ctx.load("encoder", device)
        extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer,
                             device=loaded.model.device)
        workloads[str(device)] = lambda e=extractor: e(batch, batch_size=len(batch), return_tensors=True)
    # A meter on the last device (the accelerator, when there is one) synchronises it after every timed call.
    comparison = ctx.meter(devices[-1]).compare(workloads, items=len(batch), progress="devices",
                                                tokens=texts.count_tokens(loaded.tokenizer, batch, truncation=True))
    rows = [runs.result_row(m, measurement="devices: feature-extraction", model=loaded.info.label, device=name,
                            batch=len(batch)) for name, m in comparison.measurements.items()]
    ctx.report.add_rows("5. Devices", rows)
    table = comparison.rows(baseline="cpu", per_call=f"{len(batch)} texts")
    print_table(table, title=f"Same workload on every device (encoder, {len(batch)} texts per call, round-robin)")
    for name in list(workloads)[1:]:
        print(comparison.sentence(name, "cpu"))
    if len(devices) == 1:  # one bar says nothing: the number is printed in the table above instead of a chart
        print("only the CPU is available here, so there is nothing to put beside it (see the skipped lines above)")
    else:
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
    measured, ratios, twins = {}, {}, False
    for kind, device in devices.items():
        forwards, memory, shape = seed_models_on(ctx, device, text)
        comparison = ctx.meter(device).compare(forwards, items=shape[0], tokens=shape[0] * shape[1],
                                               progress=f"notes' table on {kind}")
        for name, m in comparison.measurements.items():
            ctx.report.add_rows("6. The course notes' table, reproduced", [runs.result_row(
                m, measurement=f"notes' table: forward {shape}", model=memory[name]["label"], device=str(device),
                batch=shape[0])])
            measured[(name, kind)] = {
                "ours_time_s": m.stats.median, "ours_ci95_s": m.stats.ci_text(1, "s"),
                "ours_over_notes_time": m.stats.median / SEED_TABLE[(name, kind)][0],
                "ours_memory_gib": memory[name]["bytes"] / 2**30,
                "memory_measured_as": "CUDA allocated by load + one pass" if device.type == "cuda" else
                "RSS added by load + one pass"}
            twins = twins or not memory[name]["meaningful"]
        notes = SEED_TABLE[("BERT-base", kind)][0] / SEED_TABLE[("DistilBERT", kind)][0]
        ratios[kind] = {"ours": comparison.ratio("DistilBERT", "BERT-base")[0], "notes": notes,
                        "verdict": comparison.verdict("DistilBERT", "BERT-base")}
        say(f"on {kind}: {comparison.sentence('DistilBERT', 'BERT-base')}; the course notes' table says "
            f"{notes:.2f}x (one machine's ratio compares models fairly)")
        del forwards
        cleanup()
    rows = [{"model": model, "device": kind, "input_shape": f"{shape} tokens", "notes_time_s": time_s,
             "notes_memory_gb": memory_gb, **measured.get((model, kind), {"memory_measured_as": "not measured here"})}
            for (model, kind), (time_s, memory_gb) in SEED_TABLE.items()]
    print_table(rows, ["model", "device", "ours_time_s", "ours_ci95_s", "notes_time_s", "ours_over_notes_time"],
                title=f"The course notes' table: THIS machine (ours_*, input {shape} tokens) next to the notes' "
                      "published numbers (ANOTHER machine)")
    say("memory, ours (GiB) vs the notes (GB): " + "; ".join(
        f"{row['model']} {row['device']} {format_value(row.get('ours_memory_gib'))} vs {row['notes_memory_gb']}" for row in rows))
    say(f"ours: median of one forward pass, batch {shape[0]} x {shape[1]} real tokens, float32, under "
        "torch.inference_mode(); memory: " + "; ".join(f"{kind} rows: {how}" for kind, how in sorted(
            {(row["device"], row["memory_measured_as"]) for row in rows})) +
        ". The notes stated neither their input shape nor what their memory counted, so ours/notes compares "
        "machines, not code.")
    if twins:
        say(f"({TWIN_NOTE}: that is why the input is cut to exactly {SEED_INPUT_TOKENS} tokens here)")
    return {"input_shape": str(shape), "rows": rows, "distilbert_vs_bert": ratios}


def report_section(ctx: cli.Context, results: dict, previous: dict | None) -> dict:
    """Everything above in report.json, results.csv and report.md with a one-page summary; with --compare,
    the machine and environment checked against a previous run, then a verdict for every shared measurement."""
    draw_summary(ctx, results)
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
    """Box plot of every call's latency per task (log scale: generation is slower by orders of magnitude)."""
    tasks = outcome["tasks"]
    ax.boxplot([outcome["latency_samples_ms"][task["task"]] for task in tasks], showfliers=True)
    ax.set_xticks(range(1, len(tasks) + 1), [f"{task['task']}\n({task['per_call']})" for task in tasks], fontsize=7,
                  rotation=15, ha="right")
    slowest = max(tasks, key=lambda task: task["p50_ms"])
    fastest = min(tasks, key=lambda task: task["p50_ms"])
    plots.log_y(ax)
    ax.set(title=f"{slowest['task']} takes {slowest['p50_ms'] / fastest['p50_ms']:.0f}x as long per call as "
                 f"{fastest['task']} (box: IQR, line: median)",
           ylabel="latency per call (ms, log scale)", xlabel="task (work done per call)")


def draw_memory(ax, outcome: dict) -> None:
    """Weights beside the working memory the timed calls added (each bar labelled, so a small one still reads);
    CUDA peak beside them when present."""
    tasks = outcome["tasks"]
    series = [("model weights (exact)", [task["weights_mib"] for task in tasks]),
              ("working RSS: peak during calls - before them", [task["working_rss_mib"] for task in tasks])]
    if any(task["cuda_alloc_mib"] is not None for task in tasks):
        series.append(("CUDA peak allocated", [task["cuda_alloc_mib"] or 0 for task in tasks]))
    plots.grouped_bars(ax, [task["task"] for task in tasks], series, value_format="%.0f")
    ax.tick_params(axis="x", labelrotation=15)
    heaviest = max(tasks, key=lambda task: task["weights_mib"])
    ax.set(title=f"The weights dominate: {heaviest['task']} holds {heaviest['weights_mib']:.0f} MiB",
           ylabel="memory (MiB)", xlabel="task")


def draw_sweep(ax, sweeps: dict) -> None:
    """Throughput against batch size per model (log2 x axis: sizes double), the knee starred."""
    for sweep in sweeps.values():
        batches = [row["batch"] for row in sweep["table"]]
        values = [row["items_per_s"] for row in sweep["table"]]
        low, high = zip(*sweep["items_per_s_interval"])
        line, = ax.plot(batches, values, marker="o", label=sweep["workload"])
        ax.errorbar(batches, values, yerr=[np.subtract(values, low), np.subtract(high, values)], fmt="none",
                    capsize=3, color=line.get_color())
        if sweep["knee_batch"] is not None:
            knee = next(row for row in sweep["table"] if row["batch"] == sweep["knee_batch"])
            ax.plot([knee["batch"]], [knee["items_per_s"]], marker="*", markersize=16, color=line.get_color(),
                    linestyle="none", label=f"{sweep['role']} knee (batch {knee['batch']})")
    plots.log2_x(ax, [row["batch"] for sweep in sweeps.values() for row in sweep["table"]])
    knees = [f"{sweep['role']} at batch {sweep['knee_batch']}" for sweep in sweeps.values() if sweep["knee_batch"]]
    ax.set(title="Throughput stops paying for latency: " + (", ".join(knees) or "no knee in the sizes tried"),
           xlabel="batch size (texts per call, log2 scale)",
           ylabel="texts/s (batch 1's median x paired ratio; bars: its interval)")
    plots.legend_outside(ax)


def draw_devices(ax, rows: list[dict]) -> None:
    """Median latency per device with the median's interval as the error bar; the title is the best's speed-up."""
    bars = ax.bar([row["workload"] for row in rows], [row["p50_ms"] for row in rows],
                  yerr=[[row["p50_ms"] - row["ci95_low_ms"] for row in rows],
                        [row["ci95_high_ms"] - row["p50_ms"] for row in rows]], capsize=6, width=0.5)
    ax.bar_label(bars, [f"{row['items_per_s']:.1f} texts/s" for row in rows], label_type="center", color="white")
    best = max(rows, key=lambda row: row["speedup"])
    ax.set(title=f"{best['workload']} is {best['speedup']:.1f}x the CPU's speed ({best['verdict']}; "
                 f"{rows[0]['per_call']} per call)", xlabel="device",
           ylabel="median latency per call (ms; bar: the median's interval)")


def draw_seed_table(ax, seed: dict) -> None:
    """Our measured time next to the course notes' published one, per model and device."""
    rows = seed["rows"]
    ours = [None if row.get("ours_time_s") is None else row["ours_time_s"] * 1e3 for row in rows]
    plots.grouped_bars(ax, [f"{row['model']}\n{row['device']}" for row in rows],
                       [("this run, this machine", ours), ("course notes (another machine)",
                                                           [row["notes_time_s"] * 1e3 for row in rows])],
                       missing="not\nmeasured\nhere")
    plots.log_y(ax)
    ax.set(title=f"The course notes' table: forward pass {rows[0]['input_shape']}, this machine vs theirs",
           xlabel="model and device", ylabel="inference time (ms, log scale)")


def draw_summary(ctx: cli.Context, results: dict) -> None:
    """The four main charts on one page, titled with the machine they were measured on."""
    panels = [("tasks", draw_latency), ("sweep", draw_sweep), ("tasks", draw_memory), ("seed", draw_seed_table)]
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


SECTIONS = {"meter": ("1. Meet the meter", meet_the_meter_section), "loads": ("2. Model load time", load_time_section),
            "tasks": ("3. Task benchmarks", task_section), "sweep": ("4. Batch-size sweep", batch_sweep_section),
            "devices": ("5. Devices", devices_section),
            "seed": ("6. The course notes' table, reproduced", seed_table_section)}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--compare", type=Path, metavar="PREVIOUS.json",
                        help="a previous run's report.json: check machine and environment, then give every shared "
                             "measurement a verdict from both runs' samples")
    args = parser.parse_args(argv)
    # fail before minutes of measuring
    previous = runs.load_report(args.compare, SCRIPT, REPORT_VERSION) if args.compare else None
    ctx = cli.start(__file__, args)
    ctx.report.latex = True  # the timed rows also as report.tex, a booktabs table a paper can \input
    # a calibration after every section as well: --compare then sees a machine that changed for a few sections only
    results = cli.run_sections(ctx, SECTIONS, after_each=lambda: ctx.report.calibration.setdefault(
        "sections", []).append(calibrate(ctx.device)))
    ctx.report.run_section("7. Report and comparison", report_section.__doc__, report_section, ctx, results,
                           previous)
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
