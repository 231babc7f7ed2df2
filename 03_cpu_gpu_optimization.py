#!/usr/bin/env python3
"""03 · CPU/GPU optimisation: the course notes' techniques in their order, each written out in its section, timed
round-robin against its baseline in the same run, with what it costs in output fidelity. It ends with the fastest
faithful settings found here; lesson 04's last section races them against ONNX Runtime and OpenVINO."""
from __future__ import annotations

import gc
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import common  # noqa: F401  (first: it quiets torchao's import-time warnings; see common/__init__.py)
import torch
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

from common import cli, memory, models, plots, texts
from common.device import compile_problem, timed_once
from common.errors import first_line
from common.fidelity import cosine_fidelity
from common.memory import MIB, PeakRSSSampler, saved_for_backward_bytes
from common.meter import VERDICT_WORDS
from common.pipelines import embed, mean_pool
from common.quantize import bnb_compute_dtype, linear_names, rank_sensitivity, storage_columns
from common.report import performance_bar, print_table, ratio_bar, say

# torch 2.13 deprecates torch.ao.quantization and its quantized tensors for torchao; quantize_dynamic still runs, and
# the course notes teach it. bitsandbytes logs a notice on every CPU call.
warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated|torch\.quantize_per_")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Settings:
    """What one run measures; QUICK keeps every section and shrinks the work (it is what the tests run)."""

    speed_role: str  # timed by threads, gradients, attention and memory: BERT-base's shapes, or MiniLM
    speed_batch: int  # the "batched" workload: this many everyday sentences
    corpus_size: int  # mixed-length texts for batching
    max_length: int  # what "pad to max_length" pads to, and where every strategy truncates
    batch_sizes: tuple[int, ...]
    rounds: int  # round-robin rounds behind every ratio
    sensitivity_stride: int  # every n-th fidelity text ranks the Linears: one pass per Linear is the whole cost
    torch_compile: bool  # torch.compile spends about a minute compiling on a small CPU


FULL = Settings(speed_role="bert-base-uncased", speed_batch=16, corpus_size=64, max_length=128,
                batch_sizes=(1, 8, 16, 32), rounds=5, sensitivity_stride=6, torch_compile=True)
QUICK = Settings(speed_role="encoder", speed_batch=4, corpus_size=12, max_length=32,
                 batch_sizes=(1, 4, 8), rounds=3, sensitivity_stride=18, torch_compile=False)

ENCODER_ROLE = "encoder"  # real weights (all-MiniLM-L6-v2): every fidelity figure is measured on it
FIDELITY_TEXTS = texts.FIDELITY_TEXTS  # 74 varied texts: what every "cosine vs fp32" is computed on
FIDELITY_BAR = (0.99, 0.98)  # cosine mean and worst text vs fp32: what a faithful setting must keep
FIDELITY_TEXT = f"cosine mean >= {FIDELITY_BAR[0]} and min >= {FIDELITY_BAR[1]}"
KEEP_LADDER = (1, 2, 3, 4, 6, 9, 12)  # how many of the most sensitive Linears (MiniLM has 36) may stay fp32
LONG_TEXT_WORDS = (40, 100)  # the mixed-length corpus: one text in five is this long; the rest are 4-16 words
INT8_TARGET = 2.0  # dynamic int8's bar: this speed-up over fp32 while keeping the fidelity bar
SORTED_TARGET = 2.0  # length-sorted dynamic padding over padding every text to max_length


def sentences(tokenizer: Any, count: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`count` everyday sentences, tokenised and padded to the longest, on the device."""
    return tokenizer(texts.repeated_sentences(count), padding=True, return_tensors="pt").to(device)


def keeps_fidelity(cosine: dict[str, float]) -> bool:
    """True when embeddings pass the fidelity bar against fp32's."""
    return cosine["cosine_mean"] >= FIDELITY_BAR[0] and cosine["cosine_min"] >= FIDELITY_BAR[1]


# ------------------------------------------------------------------------------------------ 1. device


def device_section(ctx: cli.Context, s: Settings) -> dict:
    """Code must run wherever the learner is: take the best device that exists, never assume one,
    and move the inputs to wherever the model is."""
    if torch.cuda.is_available():  # the course notes' check, with Apple's GPU added before the CPU
        best = torch.device("cuda")
    elif torch.backends.mps.is_available():
        best = torch.device("mps")
    else:
        best = torch.device("cpu")
    offers = [{"device": "cuda", "available": torch.cuda.is_available(),
               "why": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
               f"torch {torch.__version__} sees no NVIDIA GPU" + ("" if torch.version.cuda else " (a CPU-only build)")},
              {"device": "mps", "available": torch.backends.mps.is_available(),
               "why": "Apple GPU via Metal" if torch.backends.mps.is_available() else "not an Apple-silicon Mac"},
              {"device": "cpu", "available": True, "why": f"{os.cpu_count()} logical cores"}]
    print_table(offers, title="What this machine offers")
    try:
        torch.zeros(1).to("cuda")  # what the course notes' bad example, model.to("cuda"), does to every weight
        bad = "no error here, but the same line fails on any machine without CUDA"
    except (AssertionError, RuntimeError) as error:
        bad = first_line(error)
    loaded = ctx.load(ENCODER_ROLE)
    inputs = {name: tensor.to(ctx.device) for name, tensor in loaded.tokenizer(["a test"], return_tensors="pt").items()}
    with torch.inference_mode():
        output = loaded.model(**inputs).last_hidden_state
    say(f"best device here: {best}; this run: --device {ctx.args.device} -> {ctx.device}, output on {output.device}. "
        f"The hard-coded model.to('cuda') gives: {bad}")
    if ctx.device.type == "cpu":
        return {"best": str(best), "bad_pattern_error": bad, "choice": "device cpu (no accelerator to race)"}
    cpu_model = ctx.load(s.speed_role, "cpu").model
    device_model = ctx.load(s.speed_role).model
    runs = {}
    for name, model in (("cpu", cpu_model), (str(ctx.device), device_model)):
        batch = sentences(loaded.tokenizer, s.speed_batch, torch.device(name))
        runs[name] = lambda model=model, batch=batch: model(**batch)
    with torch.inference_mode():
        comparison = ctx.meter().compare(runs, items=s.speed_batch, min_rounds=s.rounds, progress="cpu vs device")
    ctx.show(comparison, "cpu", f"{s.speed_role}, batch {s.speed_batch} on each device")
    return {"best": str(best), "bad_pattern_error": bad, "choice": f"device {ctx.device}"}


# ------------------------------------------------------------------------------------------ 2. threads


def threads_section(ctx: cli.Context, s: Settings) -> dict:
    """PyTorch splits each matrix multiply over threads: more help until the cores run out, and more
    threads than cores (oversubscription) usually costs. Every count is timed round-robin, for one text and a batch."""
    cpu, default, cores = torch.device("cpu"), torch.get_num_threads(), os.cpu_count() or 1
    loaded = ctx.load(s.speed_role, cpu)  # threads only matter for CPU work
    counts = sorted({1, max(1, cores // 2), cores, 2 * cores, default})
    rows, best = [], {}
    try:
        for size in (1, s.speed_batch):
            batch = sentences(loaded.tokenizer, size, cpu)

            def forward_on(threads: int, batch: dict = batch) -> Callable[[], Any]:
                def run() -> Any:
                    torch.set_num_threads(threads)  # applies to every operation after it, in this process
                    with torch.inference_mode():
                        return loaded.model(**batch)
                return run

            comparison = ctx.meter(cpu).compare({thread_label(n): forward_on(n) for n in counts}, items=size,
                                                min_rounds=s.rounds, progress=f"threads, batch {size}")
            rows += [{**row, "threads": n, "batch": size} for n, row in zip(counts, ctx.show(
                comparison, thread_label(default), f"torch.set_num_threads on {loaded.info.label}, batch {size} "
                f"({cores} logical cores)"))]
            faster = [r for r in rows[-len(counts):] if r["verdict"] == "faster"]
            best[size] = max(faster, key=lambda r: r["speedup"])["threads"] if faster else default
    finally:
        torch.set_num_threads(default)  # the next section (and the learner's next line) gets the default back
    advice = ", ".join(f"{thread_label(n)} at batch {size}" for size, n in best.items())
    say(f"Use {advice} (the default {default} unless another count is faster beyond +-3%).")
    ctx.report.add_chart(threads_chart(rows, default, ctx.out_dir))
    return {"model": loaded.info.label, "default": default, "restored": torch.get_num_threads(),
            "best": {str(size): n for size, n in best.items()}, "choice": advice}


def thread_label(count: int) -> str:
    """"1 thread", "4 threads": a row's name."""
    return f"{count} thread{'s' if count > 1 else ''}"


def threads_chart(rows: list[dict], default: int, out_dir: Any) -> Any:
    """Speed-up over the default thread count, one line per batch size, with the paired-ratio intervals."""
    best = max(rows, key=lambda r: r["speedup"])
    title = (f"{thread_label(best['threads'])}: {best['speedup']:.2f}x the default {default} at batch {best['batch']}"
             if best["verdict"] == "faster" else f"No thread count beats the default {default} beyond +-3%")
    fig, ax = plots.figure(title, "torch threads", f"speed-up vs {default} threads (x)")
    ax.axvline(os.cpu_count() or 1, color="grey", linestyle=":", label="logical cores")
    plots.lines_by(ax, rows, "threads", "speedup", lambda r: f"batch {r['batch']}", ("speedup_low", "speedup_high"),
                   "bars: the ratio's interval")
    return plots.save(fig, out_dir, "threads")


# ------------------------------------------------------------------------------------------- 3. grad


def grad_section(ctx: cli.Context, s: Settings) -> dict:
    """Inference needs no backward pass; with autograd on, every forward keeps its activations for one.
    The three modes run the same batch, round-robin."""
    loaded = ctx.load(s.speed_role)
    model, batch = loaded.model, sentences(loaded.tokenizer, s.speed_batch, ctx.device)

    def grad_enabled() -> torch.Tensor:
        with torch.enable_grad():  # what a forward does outside any context in a training script
            return model(**batch).last_hidden_state

    def no_grad() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).last_hidden_state

    def inference_mode() -> torch.Tensor:
        with torch.inference_mode():  # no_grad, and its tensors also skip autograd's version counters
            return model(**batch).last_hidden_state

    runs = {"grad enabled": grad_enabled, "torch.no_grad()": no_grad, "torch.inference_mode()": inference_mode}
    kept = {name: {"kept_mib": saved_for_backward_bytes(model, run) / MIB} for name, run in runs.items()}
    comparison = ctx.meter().compare(runs, items=s.speed_batch, min_rounds=s.rounds, progress="gradient modes")
    ctx.show(comparison, "grad enabled", f"{loaded.info.label}, batch {s.speed_batch}; kept_mib = activations kept "
             "for a backward pass nobody runs", extra=kept, columns=("kept_mib",))
    line = comparison.sentence("torch.inference_mode()", "torch.no_grad()")
    say(f"Between the two: {line}.")
    return {"model": loaded.info.label, "inference_mode_vs_no_grad": line,
            "choice": "torch.inference_mode() (or no_grad)"}


# --------------------------------------------------------------------------------------- 4. precision


def precision_section(ctx: cli.Context, s: Settings) -> dict:
    """Half-size numbers halve the bytes moved, but only hardware with native bf16/fp16 arithmetic turns that into
    speed. Timed on the real encoder, so what each one does to the embeddings is measured too."""
    where, fp32 = models.checkpoint(ENCODER_ROLE, ctx.source), ctx.load(ENCODER_ROLE)
    half = torch.float16 if ctx.device.type in ("cuda", "mps") else torch.bfloat16  # CPUs: bf16 (fp16 is slow)
    name = str(half).removeprefix("torch.")
    half_model = ctx.record_load(where, lambda: AutoModel.from_pretrained(where.path, dtype=half,
                                                                          device_map=ctx.device))
    batch = sentences(fp32.tokenizer, s.speed_batch, ctx.device)

    def fp32_forward() -> Any:
        with torch.inference_mode():
            return fp32.model(**batch)

    def autocast_forward() -> Any:
        with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=half):  # fp32 weights, half matmuls
            return fp32.model(**batch)

    def half_forward() -> Any:
        with torch.inference_mode():
            return half_model(**batch)

    reference = embed(fp32.model, fp32.tokenizer, FIDELITY_TEXTS)
    with torch.autocast(ctx.device.type, dtype=half):
        autocast_embeddings = embed(fp32.model, fp32.tokenizer, FIDELITY_TEXTS)
    extra = {"fp32": {"weights_mib": memory.weights_bytes(fp32.model) / MIB},
             f"{name} autocast": {**cosine_fidelity(reference, autocast_embeddings),
                                  "weights_mib": memory.weights_bytes(fp32.model) / MIB},
             f"{name} weights": {**cosine_fidelity(reference, embed(half_model, fp32.tokenizer, FIDELITY_TEXTS)),
                                 "weights_mib": memory.weights_bytes(half_model) / MIB}}
    comparison = ctx.meter().compare({"fp32": fp32_forward, f"{name} autocast": autocast_forward,
                                      f"{name} weights": half_forward}, items=s.speed_batch, min_rounds=s.rounds,
                                     progress="precision")
    rows = ctx.show(comparison, "fp32", f"{fp32.info.label}, batch {s.speed_batch}; cosine vs fp32 on "
                    f"{len(FIDELITY_TEXTS)} varied texts", extra=extra,
                    columns=("weights_mib", "cosine_mean", "cosine_min"))
    faithful = [r for r in rows if r["verdict"] == "faster" and keeps_fidelity(r)]
    flags = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in ctx.report.environment.get("cpu_flags", [])]
    if faithful:
        best = max(faithful, key=lambda r: r["speedup"])["workload"]
        say(f"{best} is faster here and keeps {FIDELITY_TEXT}.")
    elif ctx.device.type == "cpu":
        best, native = "fp32", ", ".join(flags) or "neither avx512_bf16 nor amx_bf16"
        say(f"No half precision is both faster and faithful here. This CPU reports {native}"
            + ("." if flags else ": bf16 matmuls run on slow fallback kernels, and only the memory halves."))
    else:
        best = "fp32"
        say("No half precision is both faster and faithful on this device.")
    return {"model": fp32.info.label, "choice": f"precision {best}"}


# ------------------------------------------------------------------------------------ 5. quantization


def quantization_section(ctx: cli.Context, s: Settings) -> dict:
    """8- and 4-bit weights shrink the model; whether they are faster depends on the hardware's int8
    instructions, and how far the output moves is measured on the real encoder's embeddings."""
    where, fp32 = models.checkpoint(ENCODER_ROLE, ctx.source), ctx.load(ENCODER_ROLE)
    model, tokenizer = fp32.model, fp32.tokenizer
    reference = embed(model, tokenizer, FIDELITY_TEXTS)
    variants: dict[str, Any] = {"fp32": model}
    embedded = {"fp32": reference}  # each variant's fidelity-text embeddings, computed once
    if ctx.device.type == "cpu":
        # int8 weights; each batch's activations are scaled to int8 on the fly (7-bit: fbgemm's safe default)
        variants["dynamic int8"] = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        # one weight scale per output row instead of one per matrix: closer to fp32, the same speed
        per_channel = {torch.nn.Linear: per_channel_dynamic_qconfig}
        variants["int8 per-channel"] = quantize_dynamic(model, per_channel, dtype=torch.qint8)
        # the fidelity fix: rank the Linears by what int8 costs each alone, leave the worst ones in fp32
        subset = FIDELITY_TEXTS[::s.sensitivity_stride]
        ranking = rank_sensitivity(model, lambda m: embed(m, tokenizer, subset), reduce_range=True,
                                   progress="sensitivity")
        for keep in KEEP_LADDER:  # fewest kept first: every fp32 layer gives back some of int8's speed
            kept = {layer.name for layer in ranking[:keep]}
            quantised = [name for name in linear_names(model) if name not in kept]
            mixed = quantize_dynamic(model, dict.fromkeys(quantised, per_channel_dynamic_qconfig), dtype=torch.qint8)
            mixed_embedded = embed(mixed, tokenizer, FIDELITY_TEXTS)
            if keeps_fidelity(cosine_fidelity(reference, mixed_embedded)):
                break
        variants[f"int8, {keep} kept fp32"], embedded[f"int8, {keep} kept fp32"] = mixed, mixed_embedded
        say(f"Linears int8 hurts most (each quantised alone, {len(subset)} texts): "
            + ", ".join(f"{layer.name} ({layer.drop:.4f})" for layer in ranking[:3]) + f"; the last row keeps {keep}.")
    else:
        ctx.report.skip("dynamic int8", "PyTorch's dynamic int8 kernels are CPU-only")
    compute = bnb_compute_dtype(ctx.device)  # bitsandbytes computes in fp32 on a CPU, bf16/fp16 on a GPU
    for label, config in (("bitsandbytes 8-bit", BitsAndBytesConfig(load_in_8bit=True)),
                          ("bitsandbytes 4-bit nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                        bnb_4bit_compute_dtype=compute))):
        def load(config: BitsAndBytesConfig = config) -> Any:
            return ctx.record_load(where, lambda: AutoModel.from_pretrained(
                where.path, quantization_config=config, dtype=compute, device_map=ctx.device))
        loaded = ctx.report.attempt(label, load)
        if loaded is not None:  # quantised as it loads; a missing bitsandbytes backend was recorded as a skip
            variants[label] = loaded
    batch = sentences(tokenizer, s.speed_batch, ctx.device)
    extra = {name: {**storage_columns(variant, memory.weights_bytes(model)),
                    **cosine_fidelity(reference, embedded[name] if name in embedded else
                                      embed(variant, tokenizer, FIDELITY_TEXTS))}
             for name, variant in variants.items()}
    with torch.inference_mode():
        comparison = ctx.meter().compare({name: lambda v=variant: v(**batch) for name, variant in variants.items()},
                                         items=s.speed_batch, warmup=1, min_rounds=s.rounds, progress="quantization")
    faithful = [name for name in variants if name.startswith("int8") and keeps_fidelity(extra[name])]
    bar_name = "dynamic int8 vs fp32"
    rows = ctx.show(comparison, "fp32", f"encoder {fp32.info.label}, batch {s.speed_batch}; size_pct = bytes stored "
                    f"vs fp32; cosine vs fp32 on {len(FIDELITY_TEXTS)} varied texts in length-sorted batches of 32 "
                    "(int8 scales activations per batch, so batch size moves it)", extra=extra,
                    columns=("size_pct", "cosine_mean", "cosine_min"),
                    bar=(bar_name, faithful[-1], INT8_TARGET) if faithful else None)
    if ctx.device.type == "cpu" and not faithful:
        ctx.report.add_bar(performance_bar(bar_name, f">= {INT8_TARGET:g}x", f"no int8 variant keeps {FIDELITY_TEXT}",
                                           None, "MISS"))
    winners = [r for r in rows if r["verdict"] == "faster" and keeps_fidelity(r)]
    best = max(winners, key=lambda r: r["speedup"])["workload"] if winners else "fp32"
    say(f"Fastest variant that keeps {FIDELITY_TEXT}: {best}" + ("" if winners else " (nothing quantised is both "
        "faster beyond +-3% and faithful here)") + ".")
    ctx.report.add_chart(quantization_chart(rows, ctx.out_dir))
    return {"model": fp32.info.label, "kept_fp32": [layer.name for layer in ranking[:keep]]
            if ctx.device.type == "cpu" else [], "choice": f"quantisation {best}"}


def quantization_chart(rows: list[dict], out_dir: Any) -> Any:
    """Each variant as a point: speed-up over fp32 (with its interval) against its worst cosine, the bar drawn."""
    winners = [r for r in rows if r["verdict"] == "faster" and keeps_fidelity(r)]
    best = max(winners, key=lambda r: r["speedup"], default=None)
    fig, ax = plots.figure(f"{best['workload']}: {best['speedup']:.2f}x fp32 and keeps the fidelity bar" if best else
                           "No quantised variant is both faster beyond +-3% and within the fidelity bar here",
                           "speed-up vs fp32 (x; bars: the ratio's interval)", "worst cosine vs fp32 (74 texts)")
    for row in rows:
        ax.errorbar(row["speedup"], row["cosine_min"], xerr=[[row["speedup"] - row["speedup_low"]],
                    [row["speedup_high"] - row["speedup"]]], fmt="o", capsize=3, label=row["workload"])
    ax.axhline(FIDELITY_BAR[1], color="tab:red", linestyle="--", label=f"bar: worst cosine {FIDELITY_BAR[1]}")
    ax.axvline(1.0, color="grey", linestyle=":")
    plots.legend_outside(ax)
    return plots.save(fig, out_dir, "quantization")


# ---------------------------------------------------------------------------------------- 6. batching


def batching_section(ctx: cli.Context, s: Settings) -> dict:
    """Batches keep the cores busy, but padding tokens are computed too: pad each batch only to its own longest
    text (dynamic padding), and sort texts by length so neighbours need little padding."""
    loaded = ctx.load(ENCODER_ROLE)
    model, tokenizer = loaded.model, loaded.tokenizer
    corpus = texts.mixed_length_corpus(s.corpus_size, seed=ctx.args.seed, long=LONG_TEXT_WORDS)
    features = tokenizer(corpus, truncation=True, max_length=s.max_length)  # tokenised once, padded per batch
    lengths = [len(ids) for ids in features["input_ids"]]

    def corpus_pass(size: int, by_length: bool, pad_to: int | None) -> tuple[Callable[[], None], dict, torch.Tensor]:
        order = sorted(range(len(corpus)), key=lengths.__getitem__) if by_length else list(range(len(corpus)))
        groups = [order[start:start + size] for start in range(0, len(order), size)]
        batches = [tokenizer.pad({key: [features[key][i] for i in group] for key in features}, return_tensors="pt",
                                 padding="max_length" if pad_to else "longest", max_length=pad_to).to(ctx.device)
                   for group in groups]
        out = torch.empty(len(corpus), model.config.hidden_size, device=ctx.device)

        def run() -> None:
            with torch.inference_mode():
                for group, batch in zip(groups, batches):
                    out[group] = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        slots = sum(batch["input_ids"].numel() for batch in batches)
        return run, {"strategy": strategy, "batch": size, "waste_pct": 100 * (1 - sum(lengths) / slots)}, out

    strategies = {"pad to max_length": (False, s.max_length), "dynamic": (False, None),
                  "dynamic + sorted": (True, None)}  # (sort by length?, pad to)
    passes, extra, outputs = {}, {}, {}
    for size in s.batch_sizes:
        for strategy, (by_length, pad_to) in strategies.items():
            if not (by_length and size == 1):  # one text per batch: sorting changes nothing but the order
                name = f"{strategy}, batch {size}"
                passes[name], extra[name], outputs[name] = corpus_pass(size, by_length, pad_to)
    comparison = ctx.meter().compare(passes, items=len(corpus), warmup=1, min_rounds=s.rounds, budget_s=0,
                                     progress="batching passes")
    rows = ctx.show(comparison, "dynamic, batch 1", f"{len(corpus)} texts of {min(lengths)}-{max(lengths)} tokens "
                    f"through {loaded.info.label}, one pass per row; waste_pct = padding tokens computed",
                    extra=extra, columns=("waste_pct",))

    def best(strategy: str) -> str:
        return max((r for r in rows if r["strategy"] == strategy and r["batch"] > 1),
                   key=lambda r: r["items_per_s"])["workload"]

    sorted_best, padded_best = best("dynamic + sorted"), best("pad to max_length")
    bar = ctx.report.add_bar(ratio_bar("length-sorted dynamic vs pad-to-max", f">= {SORTED_TARGET:g}x texts/s",
                                       f"{sorted_best} vs {padded_best}, each at its best: "
                                       f"{comparison.ratio_text(sorted_best, padded_best)}",
                                       comparison.ratio(sorted_best, padded_best), comparison.rounds, SORTED_TARGET))
    reference = outputs["dynamic, batch 1"]
    worst = min(cosine_fidelity(reference, out)["cosine_min"] for out in outputs.values())
    say(f"Padding changes no embedding: worst cosine of any pass vs one text at a time {worst:.6f} (the attention "
        "mask hides the pad tokens, mean pooling skips them).")
    ctx.report.add_chart(batching_chart(rows, bar, ctx.out_dir))
    return {"model": loaded.info.label, "texts": len(corpus), "worst_cosine": worst,
            "choice": f"batches: {sorted_best}"}


def batching_chart(rows: list[dict], bar: dict, out_dir: Any) -> Any:
    """Texts/s by batch size for each padding strategy, titled with the bar's ratio."""
    unsettled = "" if bar["status"] in ("PASS", "MISS") else f" ({bar['status'].lower()})"
    fig, ax = plots.figure(f"Length-sorted dynamic padding: {bar['value']:.1f}x the texts/s of padding to max_length"
                           f"{unsettled}", "batch size (texts)", "throughput (texts/s)")
    one_text = [{**r, "strategy": "dynamic + sorted"} for r in rows if (r["strategy"], r["batch"]) == ("dynamic", 1)]
    order = list(dict.fromkeys(r["strategy"] for r in rows))
    points = sorted(rows + one_text, key=lambda r: (order.index(r["strategy"]), r["batch"]))
    plots.lines_by(ax, points, "batch", "items_per_s", lambda r: r["strategy"])
    return plots.save(fig, out_dir, "batching")


# ------------------------------------------------------------------------------- 7. attention, compile


def attention_section(ctx: cli.Context, s: Settings) -> dict:
    """A fused attention kernel (SDPA) and a compiled graph do the same maths with fewer trips to memory;
    compiling costs time up front, and a new input shape can cost a recompile."""
    where = models.checkpoint(s.speed_role, ctx.source)
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    batch = sentences(tokenizer, s.speed_batch, ctx.device)
    built = {implementation: ctx.record_load(where, lambda implementation=implementation: AutoModel.from_pretrained(
        where.path, attn_implementation=implementation, dtype=torch.float32, device_map=ctx.device))
        for implementation in ("eager", "sdpa")}
    runs = {name: lambda model=model: model(**batch).last_hidden_state for name, model in built.items()}
    problem = ("--quick (compiling takes about a minute on a small CPU; the full run has it)"
               if not s.torch_compile else compile_problem(ctx.device))
    with torch.inference_mode():
        if problem:
            ctx.report.skip("torch.compile", problem)
        else:
            compiled = torch.compile(built["sdpa"])  # compiles on its first call, for that call's shapes
            first_call_s = timed_once(lambda: compiled(**batch), ctx.device)
            runs["sdpa + torch.compile"] = lambda: compiled(**batch).last_hidden_state
        comparison = ctx.meter().compare(runs, items=s.speed_batch, min_rounds=s.rounds, progress="attention")
    rows = ctx.show(comparison, "eager", f"attn_implementation= and torch.compile on {where.label}, batch "
                    f"{s.speed_batch}")
    if not problem:
        saved = comparison.difference("sdpa", "sdpa + torch.compile")[0]  # seconds per call, median of rounds
        verdict = comparison.verdict("sdpa + torch.compile", "sdpa")
        say(f"The first compiled call took {first_call_s:.1f} s; " + (
            f"at {saved * 1e3:.1f} ms saved per call that pays back after ~{first_call_s / saved:,.0f} calls, and "
            "each new batch shape compiles again." if verdict == "faster" else f"against sdpa alone the compiled "
            f"calls are {VERDICT_WORDS[verdict]}, so compiling does not pay back in this run."))
    fastest = max(rows, key=lambda r: r["speedup"])
    choice = fastest["workload"] if fastest["verdict"] == "faster" else "eager or sdpa (no measurable difference)"
    return {"model": where.label, "compile_skipped": problem, "choice": f"attention {choice}"}


# ------------------------------------------------------------------------------------------ 8. memory


def memory_section(ctx: cli.Context, s: Settings) -> dict:
    """Peak memory decides whether a model fits at all: load it lean (straight onto its device, in the dtype
    it will run in), and give memory back when done (del, gc.collect(), torch.cuda.empty_cache())."""
    where = models.checkpoint(s.speed_role, ctx.source)
    batch = sentences(AutoTokenizer.from_pretrained(where.path), s.speed_batch, ctx.device)
    half = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16
    loads = {"from_pretrained, then .to(device)": lambda: AutoModel.from_pretrained(where.path).to(ctx.device),
             f'device_map="{ctx.device}"': lambda: AutoModel.from_pretrained(where.path, device_map=ctx.device),
             f"device_map + dtype={str(half)[6:]}": lambda: AutoModel.from_pretrained(where.path, dtype=half,
                                                                                        device_map=ctx.device)}
    AutoModel.from_pretrained(where.path)  # the file is now in the page cache, so every load below reads alike
    rows = []
    for label, load in loads.items():
        memory.cleanup()
        start = memory.resident_bytes(ctx.device)
        with PeakRSSSampler() as peak:  # one ceiling over the load and the first forward
            model, timing = ctx.meter().time_load(label, load)
            with torch.inference_mode():
                model(**batch)
        rows.append({"load": label, "load_s": timing.seconds, "weights_mib": memory.weights_bytes(model) / MIB,
                     "resident_after_forward_mib": (memory.resident_bytes(ctx.device) - start) / MIB,
                     "peak_mib": max(peak.peak_delta_bytes, memory.resident_bytes(ctx.device) - start) / MIB})
        del model
    print_table(rows, title=f"loading {where.label}, then one forward of {s.speed_batch} sentences; MiB above the "
                f"start ({'CUDA allocated' if ctx.device.type == 'cuda' else 'process RSS, resident memory'}); "
                "peak = the highest point during the load and forward (one load each: seconds are indicative)")
    say("safetensors files are memory-mapped: a load maps the file and the first forward reads the weights in, so "
        "resident memory can sit below the weights' size until every layer has run.")
    memory.cleanup()
    steps = [("before loading", memory.snapshot(ctx.device))]
    model = AutoModel.from_pretrained(where.path, device_map=ctx.device)
    output = model(**batch).last_hidden_state  # autograd on: the output holds every activation for a backward pass
    steps.append(("model + output held", memory.snapshot(ctx.device)))
    del model, output
    steps.append(("after del", memory.snapshot(ctx.device)))
    gc.collect()  # frees what only reference cycles kept alive
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the caching allocator's free blocks go back to the driver
    steps.append(("after gc.collect() + empty_cache()", memory.snapshot(ctx.device)))
    cleanup = memory.snapshot_rows(steps)
    print_table(cleanup, ["step", "rss_mib", "rss_vs_start_mib"] + (["cuda_allocated_mib", "cuda_reserved_mib"] if
                ctx.device.type == "cuda" else []), title="giving memory back, step by step (RSS: resident memory)")
    converted = rows[-1]
    if converted["peak_mib"] > max(r["peak_mib"] for r in rows[:-1]):
        say(f"{converted['load']} peaks highest although its weights are half the size: converting reads the whole "
            "fp32 file into memory beside the new copy.")
    lean = min(rows, key=lambda r: r["peak_mib"])
    alike = [r["load"] for r in rows if r["peak_mib"] <= 1.05 * lean["peak_mib"]]  # one load each: 5% is noise
    say(f"Leanest load here: {lean['load']} ({lean['peak_mib']:.0f} MiB at its peak)." if len(alike) == 1 else
        f"{' and '.join(alike)} peak alike here (within 5% of {lean['peak_mib']:.0f} MiB).")
    ctx.report.add_rows("memory", rows + cleanup)
    return {"model": where.label, "choice": f"load with {' or '.join(alike)}"}


# ------------------------------------------------------------------------------------- 9. GPU memory


def gpu_memory_section(ctx: cli.Context, s: Settings) -> dict:
    """On a GPU, memory decides which model and batch fit: the weights per precision, what a forward adds,
    and what the caching allocator keeps until torch.cuda.empty_cache()."""
    if ctx.device.type != "cuda":
        ctx.report.skip("GPU memory", f"needs a CUDA GPU; this run's device is {ctx.device}")
        return {}
    where, device = models.checkpoint(s.speed_role, ctx.source), ctx.device
    batch = sentences(AutoTokenizer.from_pretrained(where.path), s.speed_batch, device)
    compute = bnb_compute_dtype(device)
    loads = {"fp32": {}, "fp16 weights": {"dtype": torch.float16},
             "bitsandbytes 8-bit": {"dtype": compute, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
             "bitsandbytes 4-bit nf4": {"dtype": compute, "quantization_config": BitsAndBytesConfig(
                 load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)}}
    rows = []
    for label, options in loads.items():
        gc.collect(); torch.cuda.empty_cache()  # noqa: E702  (the course notes' pair, before each measurement)
        base = torch.cuda.memory_allocated(device)
        model = AutoModel.from_pretrained(where.path, device_map=device, **options)
        weights = torch.cuda.memory_allocated(device) - base
        with memory.CudaPeak(device) as peak, torch.inference_mode():
            model(**batch)
        rows.append({"precision": label, "weights_mib": weights / MIB, "forward_adds_mib": peak.delta_bytes / MIB})
        del model
    print_table(rows, title=f"{where.label} on {device}, batch {s.speed_batch}: MiB allocated")
    model = AutoModel.from_pretrained(where.path, device_map=device)
    big = sentences(AutoTokenizer.from_pretrained(where.path), 64 * s.speed_batch, device)
    with torch.inference_mode():
        model(**big)
    held = torch.cuda.memory_reserved(device)
    del model, big
    gc.collect(); torch.cuda.empty_cache()  # noqa: E702
    say(f"After a batch of {64 * s.speed_batch} and del, the allocator still reserved {held / MIB:.0f} MiB; "
        f"gc.collect() + torch.cuda.empty_cache() left {torch.cuda.memory_reserved(device) / MIB:.0f} MiB.")
    ctx.report.add_rows("gpu memory", rows)
    return {"model": where.label, "reserved_before_empty_cache_mib": held / MIB}


# ------------------------------------------------------------------------------------------- main

# --only name -> (title, section). Each section takes the context and the settings; its docstring is the why.
SECTIONS: dict[str, tuple[str, Callable[[cli.Context, Settings], dict]]] = {
    "device": ("1. Device selection", device_section),
    "threads": ("2. CPU threads", threads_section),
    "grad": ("3. Gradients off", grad_section),
    "precision": ("4. Precision and autocast", precision_section),
    "quantization": ("5. Quantization", quantization_section),
    "batching": ("6. Batching and dynamic padding", batching_section),
    "attention": ("7. Attention kernels and torch.compile", attention_section),
    "memory": ("8. Memory: lean loading and cleanup", memory_section),
    "gpu-memory": ("9. GPU memory", gpu_memory_section),
}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    cli.add_only_option(parser, SECTIONS)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    ctx = cli.start(__file__, args, roles=(ENCODER_ROLE, settings.speed_role))
    results = cli.run_sections(ctx, SECTIONS, settings, only=args.only)
    found = [result["choice"] for result in results.values() if result and result.get("choice")]
    if found:
        ctx.report.sections["Summary"] = summary = ("Fastest faithful settings found here: " + "; ".join(found)
                                                   + ". Lesson 04's last section races them against "
                                                   "sentence-transformers, ONNX Runtime and OpenVINO.")
        say(f"\n{summary}")
    memory.cleanup()
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
