#!/usr/bin/env python3
"""03 · CPU/GPU optimisation: every speed and memory technique from the seed, each measured before/after on
the same inputs in the same run, with what it costs in output fidelity (embedding cosine or greedy-token
agreement with fp32). Ends with the best combination for this machine as a ready-to-paste snippet."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from common import cli, device as devices, memory, models, plots, texts
from common.errors import UserError
from common.meter import NOISY_CV, Measurement, PerformanceMeter, Stats
from common.pipelines import embed, mean_pool
from common.report import print_table


# Settings: plain constants, quick variants next to them.
SPEED_ROLE = "bert-base-uncased"    # offline a twin: BERT-base's exact shapes with random weights (speed only)
QUICK_SPEED_ROLE = "encoder"        # MiniLM does ~8x fewer FLOPs per token, which keeps --quick under a minute
ENCODER_ROLE = "encoder"            # real weights (all-MiniLM-L6-v2): fidelity, batching, the recipe
DECODER_ROLE = "decoder"            # real weights offline (SmolLM2-135M): greedy-token fidelity
OFFLOAD_ROLE = "distilbert-base-uncased"  # a twin squeezed under a deliberately small memory cap
SPEED_BATCH = 16                    # the "batched" workload: 16 everyday sentences
QUICK_SPEED_BATCH = 8
MEASURE_BUDGET_S = 1.0              # seconds of repeats per measurement (at least MIN_RUNS)
QUICK_MEASURE_BUDGET_S = 0.2
MIN_RUNS = 3
CORPUS_SIZE = 64                    # mixed-length texts for batching and the recipe
QUICK_CORPUS_SIZE = 32
LONG_TEXT_WORDS = (40, 100)         # one text in five is this long; the rest are 4-16 words
MAX_LENGTH = 128                    # what "pad to max_length" pads to (and where every strategy truncates)
QUICK_MAX_LENGTH = 64
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
QUICK_BATCH_SIZES = [1, 4, 8]
PASSES = 2                          # timed passes over the corpus per (strategy, batch size)
QUICK_PASSES = 1
GREEDY_TOKENS = 32                  # decoder fidelity: greedy tokens compared with fp32
QUICK_GREEDY_TOKENS = 8
DECODER_PROMPT = "The three most useful tips for making Python code run faster are"
MATMUL_SIZE = 2048                  # the peak-FLOP/s reference: one square fp32 matmul
QUICK_MATMUL_SIZE = 1024
STREAM_TEXTS = 512                  # the "long list" for streaming vs materialising
QUICK_STREAM_TEXTS = 64
STREAM_BATCH = 32
OFFLOAD_CAP = "100MiB"              # max_memory for the main device: far below the 265 MB twin
RECIPE_RUNS = 2                     # timed end-to-end passes of naive and best
QUICK_RECIPE_RUNS = 1
RECIPE_DEFAULT_BATCH = 32           # used when section 6 did not run
FIDELITY_FLOOR = 0.99               # a faster variant is recommended only at or above this cosine / agreement
WORTH_IT = 1.05                     # ... and only when it is at least 5% faster
FLOPS_FRACTION_TARGET = 0.7
INT8_SPEEDUP_TARGET = 1.8
INT8_COSINE_TARGET = 0.99
SORTED_SPEEDUP_TARGET = 2.0
SECTION_NAMES = ("device", "threads", "grad", "precision", "quantization", "batching", "attention", "memory",
                 "recipe")
BAR_NAMES = ("batched vs batch-1 throughput", "fp32 encoder FLOP/s vs matmul peak", "dynamic int8 vs fp32",
             "length-sorted dynamic vs pad-to-max")


_SHARED: dict[str, models.LoadedModel] = {}  # fp32 models several sections read; main() empties it
VARIANT_LABELS = {
    "fp32": "fp32",
    "bf16-autocast": "bf16 autocast",
    "bf16-weights": "bf16 weights",
    "fp16-autocast": "fp16 autocast",
    "fp16-weights": "fp16 weights",
    "int8-dynamic": "dynamic int8 per-channel",
    "bnb-8bit": "bitsandbytes 8-bit",
    "bnb-4bit": "bitsandbytes 4-bit nf4",
}
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_MODES = {"grad enabled": torch.enable_grad, "torch.no_grad()": torch.no_grad,
              "torch.inference_mode()": torch.inference_mode}


# ----------------------------------------------------------------------------- pure helpers (unit-tested)


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Row-by-row cosine similarity of two embedding matrices: the mean and the worst row."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Share of the reference's tokens the candidate repeats at the same position (missing ones disagree)."""
    if not reference:
        raise ValueError("no reference tokens to compare with")
    return sum(r == c for r, c in zip(reference, candidate)) / len(reference)


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Index of the first differing token; len(reference) when the candidate repeats all of it."""
    for index, token in enumerate(reference):
        if index >= len(candidate) or candidate[index] != token:
            return index
    return len(reference)


def make_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Text indices grouped into batches, in corpus order or shortest-first (so neighbours have similar lengths)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort_by_length else list(range(len(lengths)))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padding_waste(batches: Sequence[Sequence[int]], pad_to: int | None = None) -> dict[str, float]:
    """Token slots computed vs real tokens for batches of sequence lengths.

    pad_to=None is dynamic padding (each batch pads to its own longest text); an int pads every text to it."""
    real = sum(sum(batch) for batch in batches)
    slots = sum(len(batch) * (pad_to if pad_to is not None else max(batch)) for batch in batches if batch)
    return {"real_tokens": real, "padded_slots": slots, "waste_pct": 100.0 * (slots - real) / slots if slots else 0.0}


def encoder_forward_flops(config: Any, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one encoder forward on a padded batch: Q/K/V/O projections, feed-forward, attention scores."""
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    projections = 2 * seq_len * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * seq_len * seq_len * hidden  # QK^T and attention-weighted V
    return float(batch_size * layers * (projections + attention))


def bar(name: str, target: str, measured: str, value: float, passed: bool | None) -> dict[str, Any]:
    """One performance bar: target vs measured, PASS/MISS (or REPORTED when the issue sets no target)."""
    status = "REPORTED" if passed is None else ("PASS" if passed else "MISS")
    print(f"[{status}] {name}: measured {measured}  (target {target})")
    return {"bar": name, "target": target, "measured": measured, "value": value, "status": status}


# ------------------------------------------------------------------------------------------------ helpers


def pick(ctx: cli.Context, normal: Any, quick: Any) -> Any:
    """The setting for this run: the quick variant under --quick."""
    return quick if ctx.quick else normal


def make_meter(ctx: cli.Context, device: torch.device | None = None) -> PerformanceMeter:
    """The house meter with this run's budget."""
    return PerformanceMeter(device or ctx.device, warmup=1, min_runs=MIN_RUNS,
                            budget_s=pick(ctx, MEASURE_BUDGET_S, QUICK_MEASURE_BUDGET_S))


def shared_model(ctx: cli.Context, role: str, device: torch.device | None = None) -> models.LoadedModel:
    """The fp32 model for a role on a device, loaded once and shared by the sections that only read it."""
    device = device or ctx.device
    key = f"{role}@{device}"
    if key not in _SHARED:
        _SHARED[key] = models.load_model(role, source=ctx.source, device=device)
        ctx.report.add_model(_SHARED[key].info.to_dict())
    return _SHARED[key]


def speed_role(ctx: cli.Context) -> str:
    """The model timed in the speed sections (BERT-base, MiniLM under --quick)."""
    return pick(ctx, SPEED_ROLE, QUICK_SPEED_ROLE)


def speed_batch(ctx: cli.Context) -> int:
    """How many sentences the "batched" workload holds."""
    return pick(ctx, SPEED_BATCH, QUICK_SPEED_BATCH)


def sentence_batch(tokenizer: Any, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`batch_size` everyday sentences, tokenised and padded to the longest, on the device."""
    encoded = tokenizer(texts.repeated_sentences(batch_size), padding=True, return_tensors="pt")
    return {key: value.to(device) for key, value in encoded.items()}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens in a batch."""
    return int(batch["attention_mask"].sum())


def forward(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None = None,
            grad_mode: str = "torch.inference_mode()") -> Callable[[], torch.Tensor]:
    """A no-argument call of the model on a fixed batch, under a grad mode and optional autocast."""
    device_type = next(model.parameters()).device.type

    def run() -> torch.Tensor:
        with GRAD_MODES[grad_mode](), (torch.autocast(device_type, dtype=autocast) if autocast else nullcontext()):
            return model(**batch).last_hidden_state
    return run


def timing_row(measurement: Measurement, **labels: Any) -> dict[str, Any]:
    """A table row: median latency, spread, throughput, noise flag."""
    return {**labels, "p50_ms": measurement.median_ms, "iqr_ms": measurement.stats.iqr * 1e3,
            "runs": measurement.stats.count, "texts_per_s": measurement.items_per_s, "noisy": measurement.noisy}


def first_line(error: BaseException) -> str:
    """An exception as one short line for skip reasons."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def weights_mib(model: Any) -> float:
    """Bytes of everything in the state dict (packed int8/4-bit weights and their scales included; tied weights
    counted once): the model's real footprint, which parameters() alone misses for quantised layers."""
    sizes: dict[Any, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_quantized:
            sizes[id(value)] = value.numel() * value.element_size()
        elif isinstance(value, torch.Tensor):
            sizes[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (tuple, list)):  # dynamic int8 keeps (packed weight, bias) tuples
            for item in value:
                visit(item)

    for value in model.state_dict().values():
        visit(value)
    return sum(sizes.values()) / memory.MIB


def quantize_dynamic_int8(model: Any, per_channel: bool = True) -> Any:
    """PyTorch's dynamic int8 quantisation of every nn.Linear: int8 weights (one scale per output row, or one per
    matrix), activations quantised on the fly each call."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():  # deprecated in favour of torchao (not installed here); the section says so
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def bnb_config(variant: str, device: torch.device) -> Any:
    """The BitsAndBytesConfig for 8-bit or 4-bit nf4 (fp32 compute on CPU, fp16 on GPU)."""
    from transformers import BitsAndBytesConfig

    if variant == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def variant_unavailable(variant: str, device: torch.device) -> str | None:
    """Why a precision/quantisation variant cannot run here, or None."""
    if variant == "int8-dynamic":
        if device.type != "cpu":
            return "PyTorch's dynamic int8 kernels are CPU-only"
        if importlib.util.find_spec("torch.ao.quantization") is None:
            return f"torch {torch.__version__} no longer ships torch.ao.quantization (torchao replaces it)"
    if variant.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if variant.startswith("bnb") and device.type == "mps":
        return "bitsandbytes has no Apple MPS backend"
    return None


def make_variant(ctx: cli.Context, role: str, variant: str, device: torch.device,
                 **load_kwargs: Any) -> tuple[Any, torch.dtype | None]:
    """A freshly loaded model in one precision/quantisation variant, and the autocast dtype to run it under."""
    if variant.startswith("bnb"):
        loaded = models.load_model(role, source=ctx.source, device=device,
                                   quantization_config=bnb_config(variant, device), **load_kwargs)
        return loaded.model, None
    model = models.load_model(role, source=ctx.source, device=device, **load_kwargs).model
    precision = variant.split("-")[0]
    if variant == "int8-dynamic":
        return quantize_dynamic_int8(model), None
    if variant.endswith("-weights"):
        return model.to(LOW_PRECISION[precision]), None
    return model, LOW_PRECISION.get(precision)


def low_precision_variants(device: torch.device) -> list[str]:
    """The precision variants worth trying on this device: bf16 on CPU, fp16 (and bf16 autocast) on GPUs."""
    if device.type == "cpu":
        return ["bf16-autocast", "bf16-weights"]
    extra = ["bf16-autocast"] if device.type == "cuda" and torch.cuda.is_bf16_supported() else []
    return ["fp16-autocast", "fp16-weights", *extra]


def greedy_tokens(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> list[int]:
    """Exactly `new_tokens` greedy tokens after the prompt (no sampling, no early stop)."""
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def peak_memory_delta(run: Callable[[], Any], device: torch.device) -> int:
    """Peak memory above the start while `run` executes and its result is still held (allocator on CUDA, RSS else)."""
    memory.cleanup()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        with memory.PeakRSSSampler() as sampler:
            result = run()
        peak = sampler.peak_delta_bytes
    del result
    return peak


def saved_for_backward_bytes(model: Any, run: Callable[[], Any]) -> int:
    """Exact bytes of activations autograd keeps for a backward pass during `run` (parameters not counted)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()  # held until we have counted, so no saved storage can be freed and its address reused
    total = sum(saved.values())
    del output
    return total


def interleaved(workloads: dict[Any, Callable[[], Any]], rounds: int, device: torch.device) -> dict[Any, Stats]:
    """Time every workload once per round, round-robin, so load that drifts during the sweep (other programs on a
    shared machine) hits all of them alike instead of whichever happened to run then."""
    samples: dict[Any, list[float]] = {name: [] for name in workloads}
    with tqdm(total=rounds * len(workloads), desc="interleaved timing", disable=None, leave=False) as progress:
        for _ in range(rounds):
            for name, run in workloads.items():
                started = time.perf_counter()
                run()
                devices.synchronize(device)
                samples[name].append(time.perf_counter() - started)
                progress.update()
    return {name: Stats.from_samples(values) for name, values in samples.items()}


def matmul_peak_flops(ctx: cli.Context, meter: PerformanceMeter) -> tuple[float, Measurement]:
    """This machine's fp32 matmul FLOP/s: the best the hardware does on an ideal dense workload."""
    size = pick(ctx, MATMUL_SIZE, QUICK_MATMUL_SIZE)
    a = torch.randn(size, size, device=ctx.device)
    b = torch.randn(size, size, device=ctx.device)
    measurement = meter.measure(f"fp32 matmul {size}x{size}", lambda: a @ b)
    return 2 * size**3 / measurement.stats.median, measurement


def corpus(ctx: cli.Context) -> list[str]:
    """The deterministic mixed-length corpus: mostly short texts, one in five long."""
    return texts.mixed_length_corpus(pick(ctx, CORPUS_SIZE, QUICK_CORPUS_SIZE), seed=ctx.args.seed,
                                     long=LONG_TEXT_WORDS)


def embed_sorted(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled sentence embeddings, batched shortest-first so each batch pads only to its own longest text."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    embeddings = torch.empty(len(texts), model.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({key: [encoded[key][i] for i in rows] for key in encoded}, return_tensors="pt")
            batch = batch.to(model.device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            embeddings[rows] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float().cpu()
    return embeddings


def embed_naive(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """The seed's 'before': one text at a time, padded to max_length, gradients left on."""
    rows = []
    for text in texts:
        batch = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        batch = batch.to(model.device)
        rows.append(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(rows).detach().float().cpu()


# ------------------------------------------------------------------------------------------ 1. device


def device_section(ctx: cli.Context) -> dict:
    """What `auto` chose and why, what the machine offers, and the seed's unconditional .to("cuda") as our error."""
    cuda = torch.cuda.is_available()
    flags = devices.cpu_flags()
    offers = [
        {"backend": "cuda", "available": cuda,
         "detail": f"{torch.cuda.device_count()} GPU(s), first: {torch.cuda.get_device_name(0)}" if cuda else
         (f"torch {torch.__version__} has CUDA {torch.version.cuda} but sees no GPU" if torch.version.cuda else
          f"torch {torch.__version__} is a CPU-only build")},
        {"backend": "mps", "available": devices.mps_available(),
         "detail": "Apple GPU via Metal" if devices.mps_available() else "not an Apple-silicon Mac"},
        {"backend": "cpu", "available": True,
         "detail": f"{os.cpu_count()} logical cores; flags {', '.join(flags) or 'unknown'}"},
    ]
    print_table(offers, title="What this machine offers")
    auto = devices.pick_device("auto")
    reason = {"cuda": "a CUDA GPU is visible", "mps": "no CUDA, but Apple's MPS is available",
              "cpu": "neither CUDA nor MPS is available"}[auto.type]
    print(f"\nauto picks the first available of cuda > mps > cpu -> {auto} ({reason}); this run: "
          f"--device {ctx.args.device} -> {ctx.device}")

    try:
        torch.zeros(1).to("cuda")  # exactly what the seed's `model = model.to("cuda")` does to every weight
        raw = "no error here (CUDA is present), but the same line crashes on any machine without it"
    except (AssertionError, RuntimeError) as error:
        raw = first_line(error)
    try:
        devices.pick_device("cuda")
        ours = "no error: CUDA is present"
    except UserError as error:
        ours = f"UserError (exit 2, one line): {error}"
    print(f"\n  bad  : model.to('cuda')            -> {raw}")
    print(f"  ours : pick_device('cuda')         -> {ours}")

    loaded = shared_model(ctx, ENCODER_ROLE)
    inputs = sentence_batch(loaded.tokenizer, 2, ctx.device)  # the good pattern: inputs follow the model
    with torch.inference_mode():
        output = loaded.model(**inputs).last_hidden_state
    print(f"  good : device = pick_device('auto'); model.to(device); inputs moved too -> output on {output.device}")
    mixed = None
    if ctx.device.type != "cpu":  # the other classic: model on the GPU, inputs left on the CPU
        try:
            cpu_inputs = {key: value.cpu() for key, value in inputs.items()}
            with torch.inference_mode():
                loaded.model(**cpu_inputs)
            mixed = "no error"
        except RuntimeError as error:
            mixed = first_line(error)
        print(f"  bad  : inputs left on the CPU      -> {mixed}")
    return {"offers": offers, "auto": str(auto), "auto_reason": reason, "used": str(ctx.device),
            "bad_pattern_raw_error": raw, "our_error": ours, "good_pattern_output_device": str(output.device),
            "mixed_devices_error": mixed}


# ------------------------------------------------------------------------------------------ 2. threads


def thread_counts() -> list[int]:
    """1, powers of two up to the core count, the core count, and one oversubscribed value (2x cores)."""
    cores = os.cpu_count() or 1
    return sorted({1, cores, 2 * cores, *(2**i for i in range(cores.bit_length()) if 2**i <= cores)})


def threads_section(ctx: cli.Context) -> dict:
    """Latency and throughput for torch.set_num_threads over 1..N (+ oversubscribed), single texts and batched."""
    cpu = torch.device("cpu")
    loaded = shared_model(ctx, speed_role(ctx), cpu)  # threads only matter for CPU work
    meter = make_meter(ctx, cpu)
    batches = {size: sentence_batch(loaded.tokenizer, size, cpu) for size in (1, speed_batch(ctx))}
    original = torch.get_num_threads()
    rows = []
    try:
        for threads in tqdm(thread_counts(), desc="threads", disable=None, leave=False):
            torch.set_num_threads(threads)
            for size, batch in batches.items():
                m = meter.measure(f"{threads} threads, batch {size}", forward(loaded.model, batch), items=size,
                                  tokens=real_tokens(batch))
                rows.append(timing_row(m, threads=threads, batch=size))
    finally:
        torch.set_num_threads(original)  # later sections (and the learner's next line) get the default back
    for row in rows:
        one_thread = next(r for r in rows if r["batch"] == row["batch"] and r["threads"] == 1)
        row["speedup_vs_1"] = row["texts_per_s"] / one_thread["texts_per_s"]
    print_table(rows, ["threads", "batch", "p50_ms", "iqr_ms", "texts_per_s", "speedup_vs_1", "noisy"],
                title=f"torch.set_num_threads on {loaded.info.label} ({os.cpu_count()} logical cores; "
                      f"{2 * (os.cpu_count() or 1)} is oversubscribed)")
    best = {}
    for size in batches:
        winner = max((r for r in rows if r["batch"] == size), key=lambda r: r["texts_per_s"])
        best[str(size)] = winner["threads"]
        print(f"best for batch {size}: {winner['threads']} threads ({winner['texts_per_s']:.1f} texts/s, "
              f"{winner['speedup_vs_1']:.2f}x vs 1 thread)")
    print(f"threads restored to {torch.get_num_threads()}")

    batched = max((r for r in rows if r["batch"] > 1), key=lambda r: r["texts_per_s"])
    fig, ax = plots.figure(f"Threads: {batched['threads']} is fastest for batch {batched['batch']} "
                           f"({batched['speedup_vs_1']:.2f}x vs 1 thread)", "torch threads", "speed-up vs 1 thread (x)")
    for size in batches:
        points = [r for r in rows if r["batch"] == size]
        ax.plot([r["threads"] for r in points], [r["speedup_vs_1"] for r in points], marker="o", label=f"batch {size}")
    ax.axvline(os.cpu_count() or 1, color="grey", linestyle=":", label="logical cores")
    ax.set_xscale("log", base=2)
    ax.set_xticks(thread_counts(), [str(n) for n in thread_counts()])
    ax.minorticks_off()
    ax.legend()
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "threads"))
    ctx.report.add_rows("threads", rows)
    return {"model": loaded.info.label, "rows": rows, "best_threads": best, "restored_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- 3. grad


def grad_section(ctx: cli.Context) -> dict:
    """Grad enabled vs torch.no_grad() vs torch.inference_mode(): latency and memory on the same batch."""
    loaded = shared_model(ctx, speed_role(ctx))
    batch_size = speed_batch(ctx)
    batch = sentence_batch(loaded.tokenizer, batch_size, ctx.device)
    meter = make_meter(ctx)
    rows = []
    for mode in reversed(GRAD_MODES):  # leanest first, so allocator caching cannot flatter the leaner modes
        run = forward(loaded.model, batch, grad_mode=mode)
        rows.append({"mode": mode, "kept_for_backward_mib": saved_for_backward_bytes(loaded.model, run) / memory.MIB,
                     "peak_mem_delta_mib": peak_memory_delta(run, ctx.device) / memory.MIB})
    for row in rows:
        m = meter.measure(row["mode"], forward(loaded.model, batch, grad_mode=row["mode"]), items=batch_size,
                          tokens=real_tokens(batch))
        row.update(timing_row(m))
    rows.reverse()
    grad_row = rows[0]
    for row in rows:
        row["speedup_vs_grad"] = grad_row["p50_ms"] / row["p50_ms"]
    print_table(rows, ["mode", "p50_ms", "iqr_ms", "speedup_vs_grad", "kept_for_backward_mib", "peak_mem_delta_mib",
                       "noisy"], title=f"{loaded.info.label}, batch {batch_size}")
    print("kept_for_backward: activations autograd stores for a backward pass nobody runs (exact, counted with "
          "saved_tensors_hooks);\npeak_mem_delta: high-water mark above the start while the output is held "
          f"({'CUDA allocator' if ctx.device.type == 'cuda' else 'process RSS'}).")
    fastest = max(rows, key=lambda r: r["speedup_vs_grad"])["mode"]
    ctx.report.add_rows("grad", rows)
    return {"model": loaded.info.label, "rows": rows, "fastest": fastest}


# --------------------------------------------------------------------------------------- 4. precision


def precision_section(ctx: cli.Context) -> dict:
    """fp32 vs autocast vs low-precision weights on the real encoder: speed and embedding fidelity together."""
    reference = shared_model(ctx, ENCODER_ROLE)  # precision moves outputs, so it is timed where they mean something
    batch_size = speed_batch(ctx)
    batch = sentence_batch(reference.tokenizer, batch_size, ctx.device)
    meter = make_meter(ctx)
    fp32_embeddings = embed(reference.model, reference.tokenizer, texts.SENTENCES)
    rows = []
    for variant in ["fp32", *low_precision_variants(ctx.device)]:
        precision = variant.split("-")[0]
        weights = LOW_PRECISION[precision] if variant.endswith("-weights") else None
        autocast = LOW_PRECISION[precision] if variant.endswith("-autocast") else None
        model = copy.deepcopy(reference.model).to(weights) if weights else reference.model
        m = meter.measure(variant, forward(model, batch, autocast), items=batch_size, tokens=real_tokens(batch))
        with torch.autocast(ctx.device.type, dtype=autocast) if autocast else nullcontext():
            embeddings = embed(model, reference.tokenizer, texts.SENTENCES)
        rows.append(timing_row(m, variant=VARIANT_LABELS[variant], key=variant, weights_mib=weights_mib(model),
                               **cosine_fidelity(fp32_embeddings, embeddings)))
        del model
    for row in rows:
        row["speedup"] = row["texts_per_s"] / rows[0]["texts_per_s"]
    print_table(rows, ["variant", "p50_ms", "iqr_ms", "texts_per_s", "speedup", "weights_mib", "cosine_mean",
                       "cosine_min", "noisy"],
                title=f"{reference.info.label}: speed at batch {batch_size}; fidelity = embeddings of "
                      f"{len(texts.SENTENCES)} sentences vs fp32")
    slower = [r["variant"] for r in rows[1:] if r["speedup"] < 1]
    note = None
    if ctx.device.type == "cpu" and slower:
        flags = devices.cpu_flags()
        native = [f for f in flags if f in ("avx512_bf16", "amx_bf16")]
        note = (f"{', '.join(slower)} ran slower than fp32 here. This CPU reports {', '.join(flags) or 'no flags'}: "
                + (f"it has {', '.join(native)}, yet these kernels did not win on this workload."
                   if native else "no avx512_bf16 or amx_bf16, so bf16 matmuls run on fallback kernels that "
                   "convert to fp32 as they go; only the weights' memory halves."))
        print(f"\nnote: {note}")

    fig, ax = plots.figure("Lower precision: speed vs fp32, with fidelity", "variant", "throughput (texts/s)")
    bars_ = ax.bar([r["variant"] for r in rows], [r["texts_per_s"] for r in rows], color="tab:blue")
    for patch, row in zip(bars_, rows):
        ax.annotate(f"{row['speedup']:.2f}x\ncos {row['cosine_min']:.4f}", (patch.get_x() + patch.get_width() / 2,
                    patch.get_height()), ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.2)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "precision"))
    ctx.report.add_rows("precision", rows)
    return {"model": reference.info.label, "rows": rows, "cpu_flags": devices.cpu_flags(), "note": note}


# ------------------------------------------------------------------------------------ 5. quantization


def quantized_encoder_rows(ctx: cli.Context, meter: PerformanceMeter) -> list[dict]:
    """fp32, dynamic int8 and bitsandbytes 8/4-bit encoders: size, speed and embedding cosine vs fp32."""
    reference = shared_model(ctx, ENCODER_ROLE)
    batch_size = speed_batch(ctx)
    batch = sentence_batch(reference.tokenizer, batch_size, ctx.device)
    fp32_embeddings = embed(reference.model, reference.tokenizer, texts.SENTENCES)
    rows = []
    for variant in tqdm(("fp32", "int8-dynamic", "bnb-8bit", "bnb-4bit"), desc="encoder variants", disable=None,
                        leave=False):
        problem = variant_unavailable(variant, ctx.device)
        if problem:
            ctx.report.skip(f"encoder {VARIANT_LABELS[variant]}", problem)
            continue
        try:
            started = time.perf_counter()
            model = reference.model if variant == "fp32" else make_variant(ctx, ENCODER_ROLE, variant, ctx.device,
                                                                            verbose=False)[0]
            prepare_s = time.perf_counter() - started
            m = meter.measure(variant, forward(model, batch), items=batch_size, tokens=real_tokens(batch))
            fidelity = cosine_fidelity(fp32_embeddings, embed(model, reference.tokenizer, texts.SENTENCES))
        except Exception as error:  # e.g. a bitsandbytes build without this device's backend
            ctx.report.skip(f"encoder {VARIANT_LABELS[variant]}", first_line(error))
            continue
        rows.append(timing_row(m, model="encoder", variant=VARIANT_LABELS[variant], key=variant,
                               size_mib=weights_mib(model), prepare_s=prepare_s, **fidelity))
        del model
        memory.cleanup()
    return rows


def quantized_decoder_rows(ctx: cli.Context, meter: PerformanceMeter) -> tuple[list[dict], dict[str, str]]:
    """The same variants of the decoder: size, greedy tokens/s and agreement with fp32's greedy tokens."""
    new_tokens = pick(ctx, GREEDY_TOKENS, QUICK_GREEDY_TOKENS)
    rows, continuations = [], {}
    reference_tokens: list[int] | None = None
    for variant in tqdm(("fp32", "int8-dynamic", "bnb-8bit", "bnb-4bit"), desc="decoder variants", disable=None,
                        leave=False):
        problem = variant_unavailable(variant, ctx.device)
        if ctx.quick and variant.startswith("bnb") and ctx.device.type == "cpu":
            problem = "--quick (bitsandbytes generation on a CPU takes several seconds per variant; the full run has it)"
        if problem:
            ctx.report.skip(f"decoder {VARIANT_LABELS[variant]}", problem)
            continue
        try:
            started = time.perf_counter()
            if variant == "fp32":
                loaded = models.load_model(DECODER_ROLE, source=ctx.source, device=ctx.device)
                ctx.report.add_model(loaded.info.to_dict())
                model, tokenizer = loaded.model, loaded.tokenizer
            else:
                model = make_variant(ctx, DECODER_ROLE, variant, ctx.device, verbose=False)[0]
            prepare_s = time.perf_counter() - started
            prompt = {k: v.to(ctx.device) for k, v in tokenizer(DECODER_PROMPT, return_tensors="pt").items()}
            latest: dict[str, list[int]] = {}

            def generate() -> None:
                latest["tokens"] = greedy_tokens(model, prompt, new_tokens)

            m = meter.measure(variant, generate, items=1, tokens=new_tokens, warmup=0, min_runs=pick(ctx, 2, 1),
                              budget_s=0)  # a 32-token generation is its own warm-up; --quick times just one
        except Exception as error:
            ctx.report.skip(f"decoder {VARIANT_LABELS[variant]}", first_line(error))
            if variant == "fp32":
                return rows, continuations  # nothing to compare the others with
            continue
        reference_tokens = reference_tokens or latest["tokens"]
        continuations[VARIANT_LABELS[variant]] = tokenizer.decode(latest["tokens"], skip_special_tokens=True)
        rows.append({"model": "decoder", "variant": VARIANT_LABELS[variant], "key": variant,
                     "size_mib": weights_mib(model), "prepare_s": prepare_s, "p50_ms": m.median_ms,
                     "iqr_ms": m.stats.iqr * 1e3, "runs": m.stats.count, "tokens_per_s": m.tokens_per_s,
                     "token_agreement": token_agreement(reference_tokens, latest["tokens"]),
                     "first_divergence": first_divergence(reference_tokens, latest["tokens"]), "noisy": m.noisy})
        del model
        memory.cleanup()
    return rows, continuations


def quantization_section(ctx: cli.Context) -> dict:
    """Dynamic int8 and bitsandbytes 8/4-bit vs fp32 on real weights: footprint, latency, throughput, fidelity."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its per-call "cast to fp16" notice, said once below
    print(f"dynamic int8: torch.ao.quantization.quantize_dynamic (deprecated in torch {torch.__version__} in favour "
          f"of torchao, which is {'installed' if importlib.util.find_spec('torchao') else 'not installed here'}; "
          "it still works). bitsandbytes "
          f"{devices.package_version('bitsandbytes') or 'missing'}: BitsAndBytesConfig as quantization_config "
          "(8-bit casts activations to fp16 per call on CPU).")
    meter = make_meter(ctx)
    encoder_rows = quantized_encoder_rows(ctx, meter)
    per_tensor_cosine = None
    if not variant_unavailable("int8-dynamic", ctx.device):
        reference = shared_model(ctx, ENCODER_ROLE)
        per_tensor = quantize_dynamic_int8(copy.deepcopy(reference.model), per_channel=False)
        per_tensor_cosine = cosine_fidelity(embed(reference.model, reference.tokenizer, texts.SENTENCES),
                                            embed(per_tensor, reference.tokenizer, texts.SENTENCES))["cosine_mean"]
        del per_tensor
    decoder_rows, continuations = quantized_decoder_rows(ctx, meter)
    for rows, speed_key in ((encoder_rows, "texts_per_s"), (decoder_rows, "tokens_per_s")):
        for row in rows:
            row["speedup"] = row[speed_key] / rows[0][speed_key]
            row["size_pct"] = 100 * row["size_mib"] / rows[0]["size_mib"]
    print_table(encoder_rows, ["variant", "size_mib", "size_pct", "p50_ms", "iqr_ms", "texts_per_s", "speedup",
                               "cosine_mean", "cosine_min", "noisy"],
                title=f"encoder (real weights), batch {speed_batch(ctx)}; fidelity = embedding cosine vs fp32")
    print_table(decoder_rows, ["variant", "size_mib", "size_pct", "p50_ms", "tokens_per_s", "speedup",
                               "token_agreement", "first_divergence", "noisy"],
                title=f"decoder (real weights), {pick(ctx, GREEDY_TOKENS, QUICK_GREEDY_TOKENS)} greedy tokens; "
                      "fidelity = same token at the same position as fp32")
    for variant, text in continuations.items():
        print(f"  {variant:>24}: {DECODER_PROMPT} ->{text[:90]!r}")
    if per_tensor_cosine is not None:
        print(f"\ndynamic int8 here uses one weight scale per output row (per-channel); the default single scale per "
              f"matrix gives encoder cosine {per_tensor_cosine:.4f}. Either way PyTorch's x86 kernels quantise "
              "activations to 7 bits (reduce_range=True, so AVX2's 8-bit multiply-adds cannot overflow), which is "
              "where most of the remaining fidelity goes.")

    bars = []
    int8 = next((r for r in encoder_rows if r["key"] == "int8-dynamic"), None)
    if int8 is not None:
        bars.append(bar(BAR_NAMES[2], f">= {INT8_SPEEDUP_TARGET}x throughput at cosine >= {INT8_COSINE_TARGET}",
                        f"{int8['speedup']:.2f}x at cosine {int8['cosine_mean']:.4f} (min {int8['cosine_min']:.4f})",
                        int8["speedup"], int8["speedup"] >= INT8_SPEEDUP_TARGET and
                        int8["cosine_mean"] >= INT8_COSINE_TARGET))

    fig, ax = plots.figure("Quantisation: smaller and faster, at what fidelity?", "weights in memory (% of fp32)",
                           "speed-up vs fp32 (x)")
    for rows, marker, fidelity_key, label in ((encoder_rows, "o", "cosine_mean", "encoder: cos"),
                                              (decoder_rows, "s", "token_agreement", "decoder: tokens")):
        if rows:
            ax.scatter([r["size_pct"] for r in rows], [r["speedup"] for r in rows], marker=marker, s=60,
                       label=label.split(":")[0])
        for r in rows[1:]:  # rows[0] is fp32 itself: (100%, 1x), labelled once below
            ax.annotate(f"{r['variant']}\n{label.split(': ')[1]} {r[fidelity_key]:.3f}",
                        (r["size_pct"], r["speedup"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.annotate("fp32 (the reference)", (100, 1), textcoords="offset points", xytext=(-10, 8), ha="right", fontsize=7)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.legend()
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "quantization"))
    ctx.report.add_rows("quantization", encoder_rows + decoder_rows)
    return {"encoder": encoder_rows, "decoder": decoder_rows, "continuations": continuations,
            "int8_per_tensor_cosine_mean": per_tensor_cosine, "bars": bars}


# ---------------------------------------------------------------------------------------- 6. batching


def batching_section(ctx: cli.Context) -> dict:
    """Pad-to-max vs dynamic vs length-sorted dynamic padding over batch sizes: texts/s, waste, FLOP/s."""
    loaded = shared_model(ctx, ENCODER_ROLE)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.model.config
    texts_ = corpus(ctx)
    max_length = pick(ctx, MAX_LENGTH, QUICK_MAX_LENGTH)
    encoded = tokenizer(texts_, truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    print(f"corpus: {len(texts_)} texts, {min(lengths)}-{max(lengths)} tokens (median {sorted(lengths)[len(lengths) // 2]}"
          f", max_length {max_length}); model {loaded.info.label}; tokenised once up front, so passes time the model")
    meter = make_meter(ctx)
    peak_before, peak = matmul_peak_flops(ctx, meter)

    strategies = {"pad to max_length": (False, max_length), "dynamic": (False, None), "dynamic + sorted": (True, None)}
    passes, outputs, work = {}, {}, {}
    for batch_size in pick(ctx, BATCH_SIZES, QUICK_BATCH_SIZES):
        for strategy, (sort, pad_to) in strategies.items():
            groups = make_batches(lengths, batch_size, sort)
            tensors = [tokenizer.pad({k: [encoded[k][i] for i in rows_] for k in encoded}, padding="max_length" if
                                     pad_to else "longest", max_length=pad_to, return_tensors="pt").to(ctx.device)
                       for rows_ in groups]
            embeddings = outputs[(strategy, batch_size)] = torch.empty(len(texts_), config.hidden_size,
                                                                        device=ctx.device)

            def one_pass(groups=groups, tensors=tensors, embeddings=embeddings) -> None:
                with torch.inference_mode():
                    for rows_, batch in zip(groups, tensors):
                        embeddings[rows_] = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])

            passes[(strategy, batch_size)] = one_pass
            work[(strategy, batch_size)] = (
                sum(encoder_forward_flops(config, *batch["input_ids"].shape) for batch in tensors),
                padding_waste([[lengths[i] for i in g] for g in groups], pad_to))
    with torch.inference_mode():
        model(**sentence_batch(tokenizer, 8, ctx.device))  # warm the kernels once, outside every timing
    timings = interleaved(passes, pick(ctx, PASSES, QUICK_PASSES), ctx.device)
    rows = []
    for (strategy, batch_size), stats in timings.items():
        flops, waste = work[(strategy, batch_size)]
        rows.append({"strategy": strategy, "batch": batch_size, "pass_s": stats.median, "iqr_s": stats.iqr,
                     "texts_per_s": len(texts_) / stats.median, "waste_pct": waste["waste_pct"],
                     "padded_slots": waste["padded_slots"], "gflop_per_s": flops / stats.median / 1e9,
                     "runs": stats.count, "noisy": stats.count > 2 and stats.iqr / stats.median > NOISY_CV})
    print_table(rows, ["strategy", "batch", "pass_s", "iqr_s", "texts_per_s", "waste_pct", "gflop_per_s", "noisy"],
                title="one pass over the corpus per row (median of the passes, taken round-robin)")
    peak_flops = max(peak_before, matmul_peak_flops(ctx, meter)[0])  # before and after the sweep: load drifts
    print(f"fp32 matmul peak here: {peak_flops / 1e9:.1f} GFLOP/s (best of {peak.name} before and after the sweep)")
    baseline = next(r for r in rows if r["strategy"] == "dynamic" and r["batch"] == 1)  # batch 1 never pads
    reference = outputs[("dynamic", 1)].float().cpu()
    agreement = {s: min(cosine_fidelity(reference, outputs[(s, b)].float().cpu())["cosine_min"]
                        for (s2, b) in outputs if s2 == s) for s in strategies}
    print("worst embedding cosine vs unpadded batch 1: " + ", ".join(f"{s} {c:.6f}" for s, c in agreement.items())
          + " (padding is masked out, so only float rounding differs)")

    best = max((r for r in rows if r["batch"] > 1), key=lambda r: r["texts_per_s"], default=baseline)
    densest = max(rows, key=lambda r: r["gflop_per_s"])
    best_sorted = max((r for r in rows if r["strategy"] == "dynamic + sorted"), key=lambda r: r["texts_per_s"])
    best_padded = max((r for r in rows if r["strategy"] == "pad to max_length"), key=lambda r: r["texts_per_s"])
    fraction = densest["gflop_per_s"] * 1e9 / peak_flops
    sorted_ratio = best_sorted["texts_per_s"] / best_padded["texts_per_s"]
    bars = [
        bar(BAR_NAMES[0], "a ratio (no target)", f"{best['texts_per_s'] / baseline['texts_per_s']:.2f}x "
            f"({best['strategy']}, batch {best['batch']} vs batch 1)", best["texts_per_s"] / baseline["texts_per_s"],
            None),
        bar(BAR_NAMES[1], f">= {FLOPS_FRACTION_TARGET:.0%} of {peak_flops / 1e9:.1f} GFLOP/s",
            f"{fraction:.0%} ({densest['gflop_per_s']:.1f} GFLOP/s, {densest['strategy']}, batch {densest['batch']})",
            fraction, fraction >= FLOPS_FRACTION_TARGET),
        bar(BAR_NAMES[3], f">= {SORTED_SPEEDUP_TARGET}x texts/s", f"{sorted_ratio:.2f}x (batch {best_sorted['batch']} "
            f"vs batch {best_padded['batch']}, each at its best)", sorted_ratio, sorted_ratio >= SORTED_SPEEDUP_TARGET),
    ]

    fig, ax = plots.figure(f"Sorted dynamic padding: {sorted_ratio:.1f}x the texts/s of pad-to-max (each at its best)", "batch size (texts)", "throughput (texts/s)")
    for strategy in strategies:
        points = [r for r in rows if r["strategy"] == strategy]
        ax.plot([r["batch"] for r in points], [r["texts_per_s"] for r in points], marker="o",
                label=f"{strategy} (waste {points[-1]['waste_pct']:.0f}% at batch {points[-1]['batch']})")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch"] for r in rows})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.legend()
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "batching"))
    ctx.report.add_rows("batching", rows)
    return {"model": loaded.info.label, "texts": len(texts_), "max_length": max_length, "rows": rows,
            "matmul_peak_gflop_per_s": peak_flops / 1e9, "cosine_vs_batch1": agreement,
            "best_sorted_batch": best_sorted["batch"], "bars": bars}


# ------------------------------------------------------------------------------- 7. attention, compile


def compile_problem(ctx: cli.Context) -> str | None:
    """Why torch.compile is not tried here, or None."""
    if ctx.quick:
        return "--quick (compiling takes tens of seconds on a small CPU)"
    if ctx.device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
        return "no C++ compiler on PATH (inductor needs g++ or clang++ for CPU kernels)"
    if ctx.device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (inductor's GPU kernels need it)"
    if ctx.device.type == "mps":
        return "inductor's MPS backend is experimental; not measured"
    return None


def attention_section(ctx: cli.Context) -> dict:
    """attn_implementation eager vs sdpa on the same batch, then torch.compile: compile time vs steady state."""
    role = speed_role(ctx)
    batch_size = speed_batch(ctx)
    meter = make_meter(ctx)
    rows, hidden = [], {}
    batch = None
    for implementation in ("eager", "sdpa"):
        loaded = models.load_model(role, source=ctx.source, device=ctx.device, attn_implementation=implementation)
        label = loaded.info.label
        batch = batch or sentence_batch(loaded.tokenizer, batch_size, ctx.device)
        run = forward(loaded.model, batch)
        m = meter.measure(implementation, run, items=batch_size, tokens=real_tokens(batch))
        hidden[implementation] = run().flatten(1).float().cpu()
        rows.append(timing_row(m, variant=f'attn_implementation="{implementation}"', key=implementation))
        if implementation == "sdpa":
            sdpa_model = loaded.model
    agreement = cosine_fidelity(hidden["eager"], hidden["sdpa"])["cosine_min"]

    problem = compile_problem(ctx)
    compile_s = None
    if problem:
        ctx.report.skip("torch.compile", problem)
    else:
        try:
            compiled = torch.compile(sdpa_model)
            started = time.perf_counter()
            first = forward(compiled, batch)()
            first_call_s = time.perf_counter() - started
            m = meter.measure("torch.compile (sdpa)", forward(compiled, batch), items=batch_size,
                              tokens=real_tokens(batch))
            compile_s = first_call_s - m.stats.median
            rows.append(timing_row(m, variant="sdpa + torch.compile", key="compiled", compile_s=compile_s))
            agreement = min(agreement, cosine_fidelity(hidden["sdpa"], first.flatten(1).float().cpu())["cosine_min"])
        except Exception as error:  # a broken toolchain shows up only when inductor builds its first kernel
            ctx.report.skip("torch.compile", first_line(error))
    for row in rows:
        row["speedup_vs_eager"] = rows[0]["p50_ms"] / row["p50_ms"]
    print_table(rows, ["variant", "p50_ms", "iqr_ms", "texts_per_s", "speedup_vs_eager", "compile_s", "noisy"],
                title=f"{label}, batch {batch_size}")
    print(f"worst output cosine between variants: {agreement:.6f} (same weights, so this checks equivalence, "
          "not quality)")
    if compile_s is not None:
        gain_s = (rows[1]["p50_ms"] - rows[-1]["p50_ms"]) / 1e3
        break_even = compile_s / gain_s if gain_s > 0 else None
        print(f"torch.compile: {compile_s:.1f} s of compiling before the first answer; "
              + (f"it pays for itself after ~{break_even:,.0f} calls of this exact shape (a new shape recompiles)"
                 if break_even else "no steady-state gain here, so it never pays back"))
    faster = min(rows[:2], key=lambda r: r["p50_ms"])["key"]
    ctx.report.add_rows("attention", rows)
    return {"rows": rows, "faster_attention": faster, "cosine_min_between_variants": agreement,
            "compile_s": compile_s, "compile_skipped": problem}


# ------------------------------------------------------------------------------------------ 8. memory


def resident_bytes(device: torch.device) -> int:
    """Memory the model lives in: the CUDA allocator's bytes on a GPU, the process RSS otherwise."""
    return torch.cuda.memory_allocated() if device.type == "cuda" else memory.rss_bytes()


def load_rows(ctx: cli.Context, meter: PerformanceMeter) -> list[dict]:
    """Load time and peak RSS of the speed model: plain, low_cpu_mem_usage, device_map, half-precision dtype."""
    role = speed_role(ctx)
    half = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16
    variants = [
        ("plain from_pretrained", {"device_map": None}),
        ("low_cpu_mem_usage=True", {"device_map": None, "low_cpu_mem_usage": True}),
        (f'device_map="{ctx.device}"', {"device_map": str(ctx.device)}),
        (f"dtype={str(half).replace('torch.', '')}", {"dtype": half}),
    ]
    models.load_model(role, source=ctx.source, device=ctx.device, verbose=False)  # file now in the page cache
    rows = []
    for label, kwargs in variants:
        def load() -> models.LoadedModel:
            loaded = models.load_model(role, source=ctx.source, device=ctx.device, verbose=False, **kwargs)
            if kwargs.get("device_map", "set") is None:
                loaded.model.to(ctx.device)
            return loaded

        memory.cleanup()
        start = resident_bytes(ctx.device)
        loaded, load_m = meter.time_load(label, load)
        after_load = resident_bytes(ctx.device)
        with torch.inference_mode():
            loaded.model(**sentence_batch(loaded.tokenizer, 1, ctx.device))
        rows.append({"technique": label, "load_s": load_m.seconds, "peak_rss_delta_mib": load_m.peak_rss_delta_bytes
                     / memory.MIB, "mem_after_load_mib": (after_load - start) / memory.MIB,
                     "mem_after_first_call_mib": (resident_bytes(ctx.device) - start) / memory.MIB,
                     "weights_mib": weights_mib(loaded.model)})
        del loaded
    return rows


def streaming_rows(ctx: cli.Context) -> list[dict]:
    """Embedding a long list: materialising every input and output vs streaming batches through a generator."""
    loaded = shared_model(ctx, ENCODER_ROLE)
    model, tokenizer = loaded.model, loaded.tokenizer
    long_list = texts.repeated_sentences(pick(ctx, STREAM_TEXTS, QUICK_STREAM_TEXTS))
    starts = range(0, len(long_list), STREAM_BATCH)
    held: dict[str, int] = {}

    def materialised() -> torch.Tensor:
        inputs = [tokenizer(long_list[s:s + STREAM_BATCH], padding=True, return_tensors="pt").to(ctx.device)
                  for s in starts]
        with torch.inference_mode():
            outputs = [model(**batch) for batch in inputs]  # every full output kept until the end
        held["materialised"] = sum(o.last_hidden_state.nbytes for o in outputs)
        return torch.cat([mean_pool(o.last_hidden_state, b["attention_mask"]) for o, b in zip(outputs, inputs)])

    def batches():
        for s in starts:
            yield tokenizer(long_list[s:s + STREAM_BATCH], padding=True, return_tensors="pt").to(ctx.device)

    def streamed() -> torch.Tensor:
        with torch.inference_mode():
            pooled = [mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]) for batch in batches()]
        held["streamed"] = sum(p.nbytes for p in pooled)
        return torch.cat(pooled)

    results: dict[str, torch.Tensor] = {}
    peaks = {name: peak_memory_delta(lambda: results.setdefault(name, fn()), ctx.device)
             for name, fn in (("streamed", streamed), ("materialised", materialised))}
    same = cosine_fidelity(results["materialised"].float().cpu(), results["streamed"].float().cpu())["cosine_min"]
    return [{"technique": f"{name} ({len(long_list)} texts)", "peak_rss_delta_mib": peaks[name] / memory.MIB,
             "held_mib": held[name] / memory.MIB, "cosine_min": same} for name in peaks]


def cleanup_rows(ctx: cli.Context) -> list[dict]:
    """What del, gc.collect() and torch.cuda.empty_cache() give back after a model and a grad-on output."""
    memory.cleanup()
    steps = [("before load", memory.snapshot())]
    loaded = models.load_model(speed_role(ctx), source=ctx.source, device=ctx.device, verbose=False)
    output = loaded.model(**sentence_batch(loaded.tokenizer, speed_batch(ctx), ctx.device)).last_hidden_state
    steps.append(("model + grad-on output held", memory.snapshot()))
    del loaded, output
    steps.append(("after del", memory.snapshot()))
    freed = memory.cleanup(trim=False)
    steps.append(("after gc.collect() + empty_cache()", memory.snapshot()))
    if memory.trim_heap():
        steps.append(("after glibc malloc_trim(0)", memory.snapshot()))
    base = steps[0][1]
    print(f"cleanup(): gc.collect() + empty_cache() freed {freed['rss_freed_bytes'] / memory.MIB:.1f} MiB RSS, "
          f"{freed['cuda_reserved_freed_bytes'] / memory.MIB:.1f} MiB CUDA reserved; freed pages the C allocator keeps "
          "for reuse still count in RSS until malloc_trim hands them back")
    return [{"step": step, "rss_mib": snap.rss_bytes / memory.MIB, "rss_vs_start_mib": (snap.rss_bytes - base.rss_bytes)
             / memory.MIB, "cuda_allocated_mib": snap.cuda_allocated_bytes / memory.MIB,
             "cuda_reserved_mib": snap.cuda_reserved_bytes / memory.MIB} for step, snap in steps]


def offload_rows(ctx: cli.Context, meter: PerformanceMeter) -> list[dict]:
    """device_map="auto" with a small max_memory: what lands where, and what it costs per call."""
    cap = {0: OFFLOAD_CAP, "cpu": "64GiB"} if ctx.device.type == "cuda" else {"cpu": OFFLOAD_CAP}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, kwargs in (("whole model in memory", {}),
                              (f"device_map='auto', max_memory={cap}", {"device_map": "auto", "max_memory": cap,
                                                                        "offload_folder": folder})):
            loaded, load_m = meter.time_load(label, lambda: models.load_model(
                OFFLOAD_ROLE, source=ctx.source, device=ctx.device, **kwargs))
            batch = sentence_batch(loaded.tokenizer, 4, ctx.device)
            m = meter.measure(label, forward(loaded.model, batch), items=4, tokens=real_tokens(batch))
            placement = Counter(getattr(loaded.model, "hf_device_map", {"": str(ctx.device)}).values())
            rows.append(timing_row(m, technique=label, load_s=load_m.seconds, peak_rss_delta_mib=
                                   load_m.peak_rss_delta_bytes / memory.MIB, placement=dict(placement)))
            del loaded
            memory.cleanup()
    rows[1]["slowdown"] = rows[1]["p50_ms"] / rows[0]["p50_ms"]
    return rows


def memory_section(ctx: cli.Context) -> dict:
    """Lean loading, streaming vs materialising, what cleanup frees, and offloading under a memory cap."""
    meter = make_meter(ctx)
    loads = load_rows(ctx, meter)
    print_table(loads, ["technique", "load_s", "peak_rss_delta_mib", "mem_after_load_mib", "mem_after_first_call_mib",
                        "weights_mib"],
                title=f"loading {models.resolve(speed_role(ctx), ctx.source)[1].name} (file already in the page cache;"
                      f" mem = {'CUDA allocated' if ctx.device.type == 'cuda' else 'RSS'}, MiB above the start)")
    print(f"transformers {devices.package_version('transformers')} drops low_cpu_mem_usage without a word: v5 always "
          "builds the model on the meta device and memory-maps the safetensors file, so fp32 weights only become "
          "resident when the first call reads them; a half-precision dtype must convert (read) everything at load, "
          "and is what really halves the footprint.")
    streams = streaming_rows(ctx)
    print_table(streams, ["technique", "peak_rss_delta_mib", "held_mib", "cosine_min"],
                title="a long list through the encoder (same embeddings either way)")
    cleanup = cleanup_rows(ctx)
    print_table(cleanup, title="del + gc.collect() + torch.cuda.empty_cache(), step by step")
    offload: list[dict] = []
    try:
        offload = offload_rows(ctx, meter)
        print_table(offload, ["technique", "load_s", "peak_rss_delta_mib", "p50_ms", "slowdown", "placement"],
                    title=f"{OFFLOAD_ROLE} twin (random weights: plumbing and cost only) under a {OFFLOAD_CAP} cap")
        print("offloaded modules are read back from disk (or CPU) on every call: it fits, and it is slower.")
    except Exception as error:  # accelerate missing or a dispatch this version refuses
        ctx.report.skip("device_map='auto' offloading", first_line(error))

    bars_ = [(f"load: {r['technique']}", r["mem_after_first_call_mib"]) for r in loads]
    bars_ += [(f"embed list: {r['technique'].split(' (')[0]}", r["peak_rss_delta_mib"]) for r in streams]
    bars_ += [(f"offload: {'cap ' + OFFLOAD_CAP if 'max_memory' in r['technique'] else 'none'}",
               r["peak_rss_delta_mib"]) for r in offload]
    fig, ax = plots.figure("What each technique costs in memory", "MiB above the start (loads: after the first "
                           "call; others: peak)", "", size=(8, 5.2))
    ax.barh([label for label, _ in bars_][::-1], [value for _, value in bars_][::-1], color="tab:purple")
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "memory"))
    ctx.report.add_rows("memory", loads + streams + offload)
    return {"loads": loads, "streaming": streams, "cleanup": cleanup, "offload": offload}


# ------------------------------------------------------------------------------------------ 9. recipe


def choose_recipe(ctx: cli.Context, results: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The best setting for each knob from the sections that ran (a safe default, said so, for the rest)."""
    found = {name: result for name, result in results.items() if result}
    choice: dict[str, Any] = {"threads": torch.get_num_threads(), "variant": "fp32", "attention": "sdpa",
                              "batch": RECIPE_DEFAULT_BATCH}
    evidence = {knob: "default (its section did not run)" for knob in choice}
    if "threads" in found:
        choice["threads"] = found["threads"]["best_threads"][str(speed_batch(ctx))]
        evidence["threads"] = f"section 2: fastest at batch {speed_batch(ctx)}"
    candidates = [(row["speedup"], row["key"], "section 4", row["cosine_min"])
                  for row in (found.get("precision") or {}).get("rows", [])[1:]]
    candidates += [(row["speedup"], row["key"], "section 5", row["cosine_mean"])
                   for row in (found.get("quantization") or {}).get("encoder", [])[1:]]
    good = [c for c in candidates if c[0] >= WORTH_IT and c[3] >= FIDELITY_FLOOR
            and not variant_unavailable(c[1], ctx.device)]
    if good:
        speedup, choice["variant"], where, fidelity = max(good)
        evidence["variant"] = f"{where}: {speedup:.2f}x at cosine {fidelity:.4f}"
    elif candidates:
        evidence["variant"] = f"sections 4-5: nothing was >= {WORTH_IT}x faster at cosine >= {FIDELITY_FLOOR}"
    if "attention" in found:
        choice["attention"] = found["attention"]["faster_attention"]
        evidence["attention"] = "section 7: faster of eager/sdpa"
    if "batching" in found:
        choice["batch"] = found["batching"]["best_sorted_batch"]
        evidence["batch"] = "section 6: best batch for length-sorted dynamic padding"
    rows = [{"knob": knob, "choice": VARIANT_LABELS.get(str(value), value), "evidence": evidence[knob]}
            for knob, value in choice.items()]
    speedups = {row["mode"]: row["speedup_vs_grad"] for row in (found.get("grad") or {}).get("rows", [])}
    rows.append({"knob": "gradients", "choice": "torch.inference_mode()", "evidence": "section 3: " + ", ".join(
        f"{mode} {speedup:.2f}x" for mode, speedup in speedups.items() if mode != "grad enabled") + " vs grad on"
        if speedups else "default: inference never needs autograd"})
    rows.append({"knob": "torch.compile", "choice": "not used", "evidence": "dynamic padding makes new shapes, and "
                 "each new shape recompiles"})
    return choice, rows


def recipe_snippet(choice: dict[str, Any], hub_id: str, max_length: int, speedup: float, cosine: float,
                   device: torch.device) -> str:
    """The chosen combination as code a learner can paste (it calls exactly the function that was measured)."""
    variant = choice["variant"]
    load_args = f'"{hub_id}", attn_implementation="{choice["attention"]}"'
    lines = [f"# measured here: {speedup:.1f}x faster than fp32 / batch 1 / grad on / pad to max_length, "
             f"worst cosine {cosine:.4f}", "import torch", "from transformers import AutoModel, AutoTokenizer"]
    if variant.startswith("bnb"):
        lines[-1] += ", BitsAndBytesConfig"
        config = ("BitsAndBytesConfig(load_in_8bit=True)" if variant == "bnb-8bit" else
                  'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")')
        load_args += f", quantization_config={config}"
    load_args += f', device_map="{device.type}"'
    lines += ["", f"torch.set_num_threads({choice['threads']})",
              f'tokenizer = AutoTokenizer.from_pretrained("{hub_id}")',
              f"model = AutoModel.from_pretrained({load_args}).eval()"]
    dtype = str(LOW_PRECISION.get(variant.split("-")[0]))  # e.g. "torch.bfloat16"
    if variant == "int8-dynamic":
        lines.append("model = torch.ao.quantization.quantize_dynamic(\n    model, {torch.nn.Linear: "
                     "torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)")
    elif variant.endswith("-weights"):
        lines.append(f"model = model.to({dtype})")
    call = f"embeddings = embed_sorted(model, tokenizer, texts, batch_size={choice['batch']}, max_length={max_length})"
    if variant.endswith("-autocast"):
        call = f'with torch.autocast("{device.type}", dtype={dtype}):\n    {call}'
    return "\n".join(lines) + "\n\n\n" + inspect.getsource(embed_sorted) + "\n\ntexts = [...]  # your texts\n" + call


def recipe_section(ctx: cli.Context, results: dict[str, Any]) -> dict:
    """Best combination vs the naive baseline, end to end (tokenising included) on the mixed corpus."""
    choice, choice_rows = choose_recipe(ctx, results)
    print_table(choice_rows, title="the recipe's choices")
    naive = shared_model(ctx, ENCODER_ROLE)
    best_model, autocast = make_variant(ctx, ENCODER_ROLE, choice["variant"], ctx.device,
                                        attn_implementation=choice["attention"])
    texts_ = corpus(ctx)
    max_length = pick(ctx, MAX_LENGTH, QUICK_MAX_LENGTH)
    outputs: dict[str, torch.Tensor] = {}

    def naive_pass() -> None:
        outputs["naive"] = embed_naive(naive.model, naive.tokenizer, texts_, max_length)  # grad stays on

    def best_pass() -> None:
        original = torch.get_num_threads()
        torch.set_num_threads(choice["threads"])
        try:
            with torch.autocast(ctx.device.type, dtype=autocast) if autocast else nullcontext():
                outputs["best"] = embed_sorted(best_model, naive.tokenizer, texts_, choice["batch"], max_length)
        finally:
            torch.set_num_threads(original)  # the naive pass keeps torch's default, as a learner's first try would

    best_pass()  # the freshly loaded model's first call, outside the timing (the naive model is already warm)
    timings = interleaved({"naive": naive_pass, "recipe": best_pass}, pick(ctx, RECIPE_RUNS, QUICK_RECIPE_RUNS),
                          ctx.device)
    speedup = timings["naive"].median / timings["recipe"].median
    fidelity = cosine_fidelity(outputs["naive"], outputs["best"])
    rows = [{"pipeline": label, "p50_s": stats.median, "iqr_s": stats.iqr, "runs": stats.count,
             "texts_per_s": len(texts_) / stats.median}
            for label, stats in (("naive: fp32, batch 1, grad on, pad to max_length", timings["naive"]),
                                 ("recipe", timings["recipe"]))]
    print_table(rows, title=f"{len(texts_)} mixed-length texts end to end (tokenising included), {naive.info.label}; "
                            "runs taken round-robin")
    print(f"\nspeed-up {speedup:.2f}x, embedding cosine vs naive: mean {fidelity['cosine_mean']:.5f}, worst "
          f"{fidelity['cosine_min']:.5f}")
    entry = models.CATALOG.get(naive.info.name)
    snippet = recipe_snippet(choice, entry.hub_id if entry else naive.info.name, max_length, speedup,
                             fidelity["cosine_min"], ctx.device)
    print("\nready to paste:\n" + "-" * 78 + f"\n{snippet}\n" + "-" * 78)
    ctx.report.add_rows("recipe", rows)
    return {"choices": choice_rows, "rows": rows, "speedup": speedup, **fidelity, "snippet": snippet}


# ------------------------------------------------------------------------------------------- bars, main


def bars_section(ctx: cli.Context, results: dict[str, Any]) -> dict:
    """Every performance bar in one table; a bar whose section did not run says so."""
    measured = {b["bar"]: b for result in results.values() if result for b in result.get("bars", [])}
    bars = [measured.get(name, {"bar": name, "target": "-", "measured": "not measured (its section did not run "
                                "or failed)", "value": None, "status": "NOT RUN"}) for name in BAR_NAMES]
    print_table(bars, ["bar", "status", "measured", "target"])
    return {"bars": bars, "pass": sum(b["status"] == "PASS" for b in bars),
            "miss": sum(b["status"] == "MISS" for b in bars)}


def section_list(text: str) -> list[str]:
    """--only's comma-separated section names, checked against the known ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTION_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(SECTION_NAMES)}")
    return names


def run_if_wanted(ctx: cli.Context, name: str, title: str, why: str, fn: Callable[..., dict], *args: Any) -> Any:
    """Run one section when --only allows it; None when it was left out."""
    if name not in ctx.args.only:
        return None
    return ctx.report.run_section(title, why, fn, ctx, *args)


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--only", type=section_list, default=list(SECTION_NAMES), metavar="SECTION[,SECTION]",
                        help=f"run a subset of: {', '.join(SECTION_NAMES)}")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    ctx = cli.start(__file__, args)
    if len(args.only) < len(SECTION_NAMES):
        print(f"--only: running {', '.join(args.only)}")
    _SHARED.clear()
    results = {
        "device": run_if_wanted(ctx, "device", "1. Device selection", "Code must run wherever the learner is: pick "
                                "the best device that exists, and fail clearly when asked for one that does not.",
                                device_section),
        "threads": run_if_wanted(ctx, "threads", "2. CPU threads", "PyTorch splits each operation over threads; "
                                 "more help until the cores run out, and oversubscribing them costs.", threads_section),
        "grad": run_if_wanted(ctx, "grad", "3. Gradients off", "Inference needs no backward pass; keeping autograd's "
                              "bookkeeping costs time and memory for nothing.", grad_section),
        "precision": run_if_wanted(ctx, "precision", "4. Precision", "Half-size numbers halve memory traffic, but "
                                   "only hardware with native support turns that into speed.", precision_section),
        "quantization": run_if_wanted(ctx, "quantization", "5. Quantization", "8- and 4-bit weights shrink the "
                                      "model; whether they are faster, and how much the output moves, is measured.",
                                      quantization_section),
        "batching": run_if_wanted(ctx, "batching", "6. Batching and padding", "Batches keep the cores busy, but "
                                  "padding is computed too: sorting texts by length removes most of it.",
                                  batching_section),
        "attention": run_if_wanted(ctx, "attention", "7. Attention implementation and compilation", "Fused "
                                   "attention kernels and compiled graphs do the same maths with fewer trips to "
                                   "memory; compiling costs time up front.", attention_section),
        "memory": run_if_wanted(ctx, "memory", "8. Memory-lean inference", "Peak memory decides whether a model "
                                "fits at all: how it is loaded, what is kept alive, and what cleanup really frees.",
                                memory_section),
    }
    results["recipe"] = run_if_wanted(ctx, "recipe", "9. Recipe for this machine", "The winners above, combined "
                                      "and measured end to end against the naive baseline in this same run.",
                                      recipe_section, results)
    ctx.report.run_section("Performance bars", "What this lesson set out to show, target vs measured.",
                           bars_section, ctx, results)
    _SHARED.clear()
    memory.cleanup()
    return ctx.report.finish()


if __name__ == "__main__":
    cli.run(main)
