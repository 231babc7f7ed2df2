#!/usr/bin/env python3
"""03 · CPU/GPU optimisation: every speed and memory technique from the course notes, each timed round-robin against
its baseline in the same run with a verdict, and what it costs in output fidelity (embedding cosine or greedy-token
agreement with fp32). Ends with the best combination for this machine as a ready-to-paste snippet."""
from __future__ import annotations

import copy
import gc
import inspect
import logging
import os
import tempfile
import textwrap
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import common  # noqa: F401  (first: it quiets torchao's import-time warnings; see common/__init__.py)
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from common import (calibration, cli, device as devices, memory, models, plots, quantize, recipe as recipes, runtimes,
                    texts)
from common.batching import (batch_shapes, batch_work, encoder_forward_bytes, encoder_forward_flops, make_batches,
                             padded_batches, streamed_weight_bytes)
from common.errors import UserError, first_line
from common.fidelity import cosine_fidelity, decoder_fidelity, embedding_fidelity
from common.memory import MIB, peak_while_held, saved_for_backward_bytes
from common.meter import Comparison
from common.pipelines import embed, mean_pool
from common.quantize import bnb_compute_dtype, int8_dynamic, variant_unavailable
from common.report import (bar_line, collect_bars, limit_bar, performance_bar, print_table, ratio_bar, ratio_cell,
                           say)
from common.runtimes import PEERS, SENTENCE_TRANSFORMERS as PEER_BASELINE
from common.sweep import fitting_batches


@dataclass(frozen=True)
class Settings:
    """What one run measures; QUICK keeps every section and shrinks the work (it is what the tests run)."""

    speed_role: str  # timed by the speed sections: BERT-base's shapes, or MiniLM (~8x fewer FLOPs per token)
    speed_batch: int  # the "batched" workload: this many everyday sentences
    corpus_size: int  # mixed-length texts for batching, torch.compile and the recipe
    max_length: int  # what "pad to max_length" pads to, and where every strategy truncates
    batch_sizes: tuple[int, ...]
    rounds: int  # round-robin rounds behind every ratio that decides a bar or the recipe
    greedy_tokens: int  # decoder fidelity: greedy tokens compared with fp32's
    matmul_size: int  # the peak-FLOP/s reference: the largest of three square fp32 matmul sizes
    stream_texts: int  # the "long list" for streaming vs materialising
    recipe_texts: int  # real paragraphs every recipe candidate and peer runtime embeds, in one round-robin
    recipe_batches: tuple[int, ...]  # batch sizes tried for the lead int8 configuration
    screen_every: int  # every n-th recipe text (by length) screens all candidates before the full round-robin
    torch_compile: bool  # torch.compile spends about a minute compiling on a small CPU
    decoder_bnb: bool  # bitsandbytes generation on a CPU takes seconds per call
    torchao: bool  # torchao int8 has no fast kernel on an AVX2 CPU: its check pass alone took ~20 s there
    sensitivity_stride: int  # every n-th varied text ranks the Linears: one pass per Linear is the whole cost


FULL = Settings(speed_role="bert-base-uncased", speed_batch=16, corpus_size=64, max_length=128,
                batch_sizes=(1, 8, 16, 32), rounds=5, greedy_tokens=16, matmul_size=2048,
                stream_texts=512, recipe_texts=512, recipe_batches=(32, 64), screen_every=8, torch_compile=True,
                decoder_bnb=True, torchao=True, sensitivity_stride=6)
QUICK = Settings(speed_role="encoder", speed_batch=4, corpus_size=12, max_length=32,
                 batch_sizes=(1, 4, 8), rounds=3, greedy_tokens=4, matmul_size=1024,
                 stream_texts=64, recipe_texts=24, recipe_batches=(8, 32), screen_every=3, torch_compile=False,
                 decoder_bnb=False, torchao=False, sensitivity_stride=18)

ENCODER_ROLE = "encoder"  # real weights (all-MiniLM-L6-v2): fidelity, batching, compile, the recipe
DECODER_ROLE = "decoder"  # real weights (SmolLM2-135M offline): greedy-token fidelity
FIDELITY_TEXTS = texts.FIDELITY_TEXTS  # 74 varied texts: what every "cosine vs fp32" is computed on
EXAMPLE_TEXTS = [texts.SENTENCES[1], texts.SENTENCES[9], FIDELITY_TEXTS[63]]  # what the pasted recipe embeds
LONG_TEXT_WORDS = (40, 100)  # the mixed-length corpus: one text in five is this long; the rest are 4-16 words
DECODER_PROMPT = "The three most useful tips for making Python code run faster are"
OFFLOAD_CAP = "100MiB"  # max_memory for the main device: far below the 265 MB model
RECIPE_DEFAULT_BATCH = 32  # used when section 6 did not run
# A variant whose one check pass takes this many times fp32's is not timed round-robin: at torchao's 0.1x here (its
# int8 matmul has no fast kernel on an AVX2 CPU) every round would cost seconds, and its generation minutes.
# bitsandbytes 8-bit, about 4x slower on such a CPU, stays in: its BitsAndBytesConfig is what this section teaches.
SLOW_VARIANT = 8.0
DECODER_ROUNDS = 3  # bitsandbytes generation on a CPU takes seconds a call, and no bar or recipe rests on these
MIXED_KEEP_LADDER = (0, 1, 2, 3, 4, 6, 9, 12)  # how many of the most sensitive Linears (MiniLM has 37) stay unquantised
FIDELITY_BAR = (0.99, 0.98)  # cosine mean and worst text vs the reference: what every recommendation must keep
FIDELITY_TEXT = f"cosine mean >= {FIDELITY_BAR[0]} and min >= {FIDELITY_BAR[1]}"
FLOPS_FRACTION_TARGET = 0.7
PEAK_REPEATS = 5  # timed calls per matmul size; the fastest of all of them is the reference
INT8_SPEEDUP_TARGET = 2.0  # dynamic int8's bar: this speed-up over fp32 while keeping the fidelity bar
SORTED_SPEEDUP_TARGET = 2.0
BAR_NAMES = ("batched vs batch-1 throughput", "fp32 encoder FLOP/s vs matmul peak", "dynamic int8 vs fp32",
             "length-sorted dynamic vs pad-to-max", "recipe vs best peer runtime")
VARIANT_LABELS = {"fp32": "fp32", "tf32": "TF32 matmuls", "bf16-autocast": "bf16 autocast",
                  "bf16-weights": "bf16 weights",
                  "fp16-autocast": "fp16 autocast", "fp16-weights": "fp16 weights", "bnb-8bit": "bitsandbytes 8-bit",
                  "int8-dynamic": "dynamic int8 per-channel", "int8-dynamic-8bit": "dynamic int8, 8-bit activations",
                  "torchao-int8": "torchao int8 dyn-act/int8-weight", "bnb-4bit": "bitsandbytes 4-bit nf4",
                  "int8-mixed": "int8, most sensitive Linears kept"}
SPEED = ["p50_ms", "items_per_s", "speedup", "verdict"]  # a compared table's timing columns (the rest: results.csv)


# ------------------------------------------------------------------------------------------- shared helpers


def sentence_batch(tokenizer: Any, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`batch_size` everyday sentences, tokenised and padded to the longest, on the device."""
    return tokenizer(texts.repeated_sentences(batch_size), padding=True, return_tensors="pt").to(device)


def keeps_fidelity(row: dict[str, Any]) -> bool:
    """True when a row's embeddings pass the fidelity bar (cosine mean and worst text against its reference)."""
    return row["cosine_mean"] >= FIDELITY_BAR[0] and row["cosine_min"] >= FIDELITY_BAR[1]


@contextmanager
def tf32_matmuls() -> Iterator[None]:
    """fp32 weights whose matmuls run on TF32 tensor cores (10-bit mantissa): matmul precision "high" (CUDA only)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def precision_mode(device_type: str, mode: torch.dtype | str | None) -> Any:
    """The context a precision variant runs in: autocast to a dtype, TF32 matmuls for "tf32", else nothing."""
    if mode == "tf32":
        return tf32_matmuls()
    return torch.autocast(device_type, dtype=mode) if mode else nullcontext()


def forward(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | str | None = None) -> Callable[[], Any]:
    """A no-argument inference call of the model on a fixed batch, under autocast (a dtype) or TF32 ("tf32")."""
    device_type = next(model.parameters()).device.type

    def run() -> torch.Tensor:
        with torch.inference_mode(), precision_mode(device_type, autocast):
            return model(**batch).last_hidden_state
    return run


# ------------------------------------------------------------------------------------------ 1. device


def device_offers() -> list[dict[str, Any]]:
    """What this machine offers: CUDA, MPS and the CPU, each with why or why not."""
    cuda = torch.cuda.is_available()
    return [
        {"backend": "cuda", "available": cuda,
         "detail": f"{torch.cuda.device_count()} GPU(s), first: {torch.cuda.get_device_name(0)}" if cuda else
         (f"torch {torch.__version__} has CUDA {torch.version.cuda} but sees no GPU" if torch.version.cuda else
          f"torch {torch.__version__} is a CPU-only build")},
        {"backend": "mps", "available": devices.mps_available(),
         "detail": "Apple GPU via Metal" if devices.mps_available() else "not an Apple-silicon Mac"},
        {"backend": "cpu", "available": True,
         "detail": f"{os.cpu_count()} logical cores; flags {', '.join(devices.cpu_flags()) or 'unknown'}"},
    ]


def device_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """Code must run wherever the learner is: pick the best device that exists,
    and fail clearly when asked for one that does not."""
    offers = device_offers()
    print_table(offers, title="What this machine offers")
    auto = devices.pick_device("auto")
    reason = {"cuda": "a CUDA GPU is visible", "mps": "no CUDA, but Apple's MPS is available",
              "cpu": "neither CUDA nor MPS is available"}[auto.type]
    say(f"\nauto picks the first available of cuda > mps > cpu -> {auto} ({reason}); this run: "
        f"--device {ctx.args.device} -> {ctx.device}")
    try:
        torch.zeros(1).to("cuda")  # exactly what the course notes' `model = model.to("cuda")` does to every weight
        raw = "no error here (CUDA is present), but the same line crashes on any machine without it"
    except (AssertionError, RuntimeError) as error:
        raw = first_line(error)
    try:
        devices.pick_device("cuda")
        ours = "no error: CUDA is present"
    except UserError as error:
        ours = f"UserError (exit 2, one line): {error}"
    print()
    say(f"bad  : model.to('cuda')    -> {raw}", "  ")
    say(f"ours : pick_device('cuda') -> {ours}", "  ")
    loaded = ctx.load(ENCODER_ROLE)
    output = forward(loaded.model, sentence_batch(loaded.tokenizer, 2, ctx.device))()  # inputs follow the model
    print(f"  good : device = pick_device('auto'); model.to(device); inputs moved too -> output on {output.device}")
    result = {"offers": offers, "auto": str(auto), "auto_reason": reason, "used": str(ctx.device),
              "bad_pattern_raw_error": raw, "our_error": ours, "good_pattern_output_device": str(output.device)}
    if ctx.device.type == "cpu":
        print("\nonly the CPU is in use in this run: there is no accelerator to time against it")
        return result
    try:  # the other classic: model on the GPU, inputs left on the CPU
        forward(loaded.model, sentence_batch(loaded.tokenizer, 2, torch.device("cpu")))()
        result["mixed_devices_error"] = "no error"
    except RuntimeError as error:
        result["mixed_devices_error"] = first_line(error)
    print(f"  bad  : inputs left on the CPU      -> {result['mixed_devices_error']}")
    runs = {str(d): forward(ctx.load(ENCODER_ROLE, d).model, sentence_batch(loaded.tokenizer, s.speed_batch, d))
            for d in (torch.device("cpu"), ctx.device)}  # the same batch timed on the CPU and on the accelerator
    comparison = ctx.meter().compare(runs, items=s.speed_batch, min_rounds=s.rounds, progress="cpu vs device")
    print_table(comparison.rows(baseline="cpu"), title=f"{loaded.info.label}, batch {s.speed_batch}")
    result.update(devices=comparison.rows(baseline="cpu"), verdicts=comparison.print_verdicts("cpu"))
    return result


# ------------------------------------------------------------------------------------------ 2. threads


def threads_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """PyTorch splits each operation over threads; more help until the cores run out,
    and oversubscribing them costs. All counts are timed round-robin, single texts and batched."""
    cpu, label = torch.device("cpu"), devices.thread_label
    loaded = ctx.load(s.speed_role, cpu)  # threads only matter for CPU work
    default, counts = torch.get_num_threads(), devices.thread_counts()
    rows, lines, recommended, decisions = [], [], {}, {}
    try:
        for size in (1, s.speed_batch):
            run = forward(loaded.model, sentence_batch(loaded.tokenizer, size, cpu))
            comparison = ctx.meter(cpu).compare({label(n): devices.with_threads(n, run) for n in counts}, items=size,
                                                min_rounds=s.rounds, progress=f"threads, batch {size}")
            rows += [{**row, "threads": n} for n, row in zip(counts, comparison.rows(baseline=label(1), batch=size))]
            print(f"\nbatch {size}, against 1 thread:")
            lines += comparison.print_verdicts(label(1))
            by_label = {label(n): n for n in counts}  # ranked by their direct paired ratios, as every verdict
            fastest = by_label[recipes.fastest(list(by_label), comparison.ratio)]
            faster = comparison.verdict(label(fastest), label(default)) == "faster"
            recommended[str(size)] = fastest if faster else default
            decisions[str(size)] = f"use {label(recommended[str(size)])}: " + (
                comparison.sentence(label(fastest), label(default)) if fastest != default
                else f"torch's default of {default} was the fastest by direct paired ratios")
            say(f"batch {size}: {decisions[str(size)]}")
    finally:
        torch.set_num_threads(default)  # later sections (and the learner's next line) get the default back
    print_table(rows, ["threads", "batch", *SPEED], title=f"torch.set_num_threads on {loaded.info.label} "
                f"({os.cpu_count()} logical cores; {2 * (os.cpu_count() or 1)} is oversubscribed); speedup vs 1 thread")
    print(f"threads restored to {torch.get_num_threads()}")
    ctx.report.add_chart(threads_chart(rows, ctx.out_dir))
    ctx.report.add_rows("threads", rows)
    return {"model": loaded.info.label, "rows": rows, "verdicts": lines, "best_threads": recommended,
            "decisions": decisions, "restored_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- 3. grad


def grad_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """Inference needs no backward pass; keeping autograd's bookkeeping costs time and memory for nothing.
    The three modes run the same batch, timed round-robin."""
    loaded = ctx.load(s.speed_role)
    model, batch = loaded.model, sentence_batch(loaded.tokenizer, s.speed_batch, ctx.device)

    def grad_enabled() -> torch.Tensor:
        with torch.enable_grad():  # autograd records every operation for a backward pass
            return model(**batch).last_hidden_state

    def no_grad() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).last_hidden_state

    def inference_mode() -> torch.Tensor:
        with torch.inference_mode():  # no_grad, and tensors skip version counting too
            return model(**batch).last_hidden_state

    runs = {"grad enabled": grad_enabled, "torch.no_grad()": no_grad, "torch.inference_mode()": inference_mode}
    held = {name: {"kept_for_backward_mib": saved_for_backward_bytes(model, run) / MIB,
                   "peak_mem_delta_mib": peak_while_held(run, ctx.device) / MIB}
            for name, run in reversed(runs.items())}  # leanest first, so allocator caching cannot flatter them
    comparison = ctx.meter().compare(runs, items=s.speed_batch, min_rounds=s.rounds, progress="gradient modes")
    rows = [{"mode": row["workload"], **row, **held[row["workload"]]}
            for row in comparison.rows(baseline="grad enabled")]
    print_table([{**row, "kept_mib": row["kept_for_backward_mib"], "peak_mib": row["peak_mem_delta_mib"]}
                 for row in rows], ["mode", *SPEED, "kept_mib", "peak_mib"],
                title=f"{loaded.info.label}, batch {s.speed_batch}")
    say("kept_mib: activations autograd stores for a backward pass nobody runs (exact, counted with "
        "saved_tensors_hooks); peak_mib: high-water mark above the start while the output is held "
        f"({'CUDA allocator' if ctx.device.type == 'cuda' else 'process RSS'}).")
    lines = comparison.print_verdicts("grad enabled")
    lines.append(comparison.sentence("torch.inference_mode()", "torch.no_grad()"))
    say(lines[-1], "  ")
    ctx.report.add_rows("grad", rows)
    return {"model": loaded.info.label, "rows": rows, "verdicts": lines, "inference_mode_verdict": lines[1],
            "kept_by_grad_mib": held["grad enabled"]["kept_for_backward_mib"]}


# --------------------------------------------------------------------------------------- 4. precision


def precision_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """Half-size numbers halve memory traffic, but only hardware with native support turns that into speed.
    Timed on the real encoder, so what each variant does to the embeddings is measured too."""
    where = models.checkpoint(ENCODER_ROLE, ctx.source)
    fp32 = ctx.load(ENCODER_ROLE)
    half = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16  # GPUs: fp16 tensor cores; CPUs: bf16
    half_model = ctx.record_load(where, lambda: AutoModel.from_pretrained(where.path, dtype=half,
                                                                          device_map=ctx.device))
    short = "fp16" if half == torch.float16 else "bf16"
    variants = {"fp32": (fp32.model, None), f"{short}-autocast": (fp32.model, half),
                f"{short}-weights": (half_model, None)}
    if devices.native_bf16(ctx.device):  # Ampere (8.0) on: bf16 and TF32 tensor cores; earlier GPUs emulate bf16
        variants["bf16-autocast"] = (fp32.model, torch.bfloat16)
        variants["tf32"] = (fp32.model, "tf32")  # the "fp32" row is true fp32 only at matmul precision "highest"
    batch = sentence_batch(fp32.tokenizer, s.speed_batch, ctx.device)
    comparison = ctx.meter().compare({VARIANT_LABELS[key]: forward(model, batch, autocast) for key, (model, autocast)
                                      in variants.items()}, items=s.speed_batch, min_rounds=s.rounds,
                                     progress="precision")
    reference = embed(fp32.model, fp32.tokenizer, FIDELITY_TEXTS)
    rows, lengths = comparison.rows(baseline="fp32"), batch["attention_mask"].sum(1).tolist()
    for row, (key, (model, autocast)) in zip(rows, variants.items()):
        with precision_mode(ctx.device.type, autocast):
            embeddings = embed(model, fp32.tokenizer, FIDELITY_TEXTS)
        row.update(variant=row["workload"], key=key, weights_mib=memory.weights_bytes(model) / MIB,
                   **cosine_fidelity(reference, embeddings), batch=s.speed_batch,  # where section 6 plots it:
                   useful_flops=sum(encoder_forward_flops(model.config, 1, n) for n in lengths),
                   bytes=encoder_forward_bytes(model.config, *batch["input_ids"].shape, streamed_weight_bytes(model),
                                               torch.finfo(autocast or model.dtype).bits // 8))
    print_table(rows, ["variant", *SPEED, "weights_mib", "cosine_mean", "cosine_min"],
                title=f"{fp32.info.label}: speed at batch {s.speed_batch}; fidelity = embeddings of "
                      f"{len(FIDELITY_TEXTS)} sentences vs fp32")
    lines = comparison.print_verdicts("fp32")
    slower, flags = [row["variant"] for row in rows if row["verdict"] == "slower"], devices.cpu_flags()
    native = [flag for flag in flags if flag in ("avx512_bf16", "amx_bf16")]
    note = None if ctx.device.type != "cpu" or not slower else (
        f"{', '.join(slower)} measured slower than fp32 here. This CPU reports {', '.join(flags) or 'no flags'}"
        + (f": it has {', '.join(native)}, yet these kernels did not win on this workload." if native else
           ": no avx512_bf16 or amx_bf16, so bf16 matmuls run on fallback kernels; only the memory halves."))
    if note:
        say(f"\nnote: {note}")
    ctx.report.add_chart(precision_chart(rows, ctx.out_dir))
    ctx.report.add_rows("precision", rows)
    return {"model": fp32.info.label, "rows": rows, "verdicts": lines, "cpu_flags": flags, "note": note}


# ------------------------------------------------------------------------------------ 5. quantization


def quantization_recipes(where: models.Checkpoint, fp32_model: Any, device: torch.device, torchao: bool,
                         **load: Any) -> dict[str, Callable[[], Any]]:
    """How each quantised variant is made: dynamic int8 converts a loaded model, bitsandbytes quantises as it loads;
    torchao's int8 only when asked for (and installed)."""
    auto = AutoModelForCausalLM if where.kind == "decoder" else AutoModel
    compute = bnb_compute_dtype(device)  # the unquantised parts load in it too: fp32 would be cast on every Linear
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    recipes = {"int8-dynamic": lambda: int8_dynamic(fp32_model)}
    if quantize.choose_activation_range().measure_both:  # AVX2 only: show what 8-bit activations' saturation costs
        recipes["int8-dynamic-8bit"] = lambda: int8_dynamic(fp32_model, reduce_range=False)
    if torchao and quantize.torchao_unavailable() is None:
        recipes["torchao-int8"] = lambda: quantize.quantize_torchao_int8(fp32_model)
    return {
        **recipes,
        "bnb-8bit": lambda: auto.from_pretrained(where.path, dtype=compute, device_map=device,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True), **load),
        "bnb-4bit": lambda: auto.from_pretrained(where.path, dtype=compute, device_map=device,
                                                 quantization_config=four_bit, **load),
    }


def compare_variants(ctx: cli.Context, built: dict[str, dict[str, Any]], what: str, run: Callable[[str, Any], Any],
                     fidelity: Callable[[str], dict[str, float]], rounds: int, **work: Any) -> tuple[list, Comparison]:
    """Time the built variants round-robin against fp32: rows with each one's size, quantised share and fidelity."""
    comparison = ctx.meter().compare({VARIANT_LABELS[key]: run(key, variant["model"]) for key, variant in
                                      built.items()}, warmup=1, min_rounds=rounds, progress=f"{what} variants", **work)
    fp32_bytes = memory.weights_bytes(built["fp32"]["model"])
    rows = comparison.rows(baseline="fp32", model=what)
    for row, (key, variant) in zip(rows, built.items()):
        row.update(variant=row["workload"], key=key, **quantize.storage_columns(variant["model"], fp32_bytes),
                   prepare_s=variant["prepare_s"], **fidelity(key))
    return rows, comparison


def bf16_is_fast(ctx: cli.Context, hidden: int, s: Settings) -> tuple[bool, str]:
    """Time one of the encoder's FFN Linears in bf16 against fp32, round-robin: bf16 keeps a layer only if faster."""
    linear, x = torch.nn.Linear(hidden, 4 * hidden), torch.randn(s.speed_batch * 32, hidden)
    half, half_x = copy.deepcopy(linear).to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.inference_mode():
        comparison = ctx.meter(torch.device("cpu")).compare({"bf16": lambda: half(half_x), "fp32": lambda: linear(x)},
                                                            min_rounds=s.rounds)
    return comparison.verdict("bf16", "fp32") == "faster", comparison.sentence("bf16", "fp32")


def mixed_int8(ctx: cli.Context, s: Settings, fp32: models.LoadedModel) -> tuple[Any, dict]:
    """Rank the Linears by what int8 alone costs each, then keep the fewest most sensitive ones unquantised
    that bring the whole model to the fidelity bar (in bf16 where this CPU measured bf16 faster, else fp32)."""
    activation = quantize.choose_activation_range()
    reference = embed_sorted(fp32.model, fp32.tokenizer, FIDELITY_TEXTS, max_length=s.max_length)  # same truncation

    def fidelity(model: Any) -> dict[str, float]:  # int8 scales activations per batch: the worst batching counts
        runs = [cosine_fidelity(reference, embed_sorted(model, fp32.tokenizer, FIDELITY_TEXTS, batch, s.max_length))
                for batch in s.recipe_batches]
        return {key: min(run[key] for run in runs) for key in ("cosine_mean", "cosine_min")}

    worst = {reduce_range: fidelity(int8_dynamic(fp32.model, reduce_range=reduce_range))["cosine_min"]
             for reduce_range in ((True, False) if activation.measure_both else (activation.reduce_range,))}
    reduce_range = max(worst, key=worst.get)  # where both ranges are safe to try, the more faithful one
    print(f"mixed precision starts from int8 with {7 if reduce_range else 8}-bit activations (worst cosine "
          + ", ".join(f"{7 if r else 8}-bit {c:.4f}" for r, c in worst.items()) + ")")
    subset = FIDELITY_TEXTS[::s.sensitivity_stride]
    ranking = quantize.rank_sensitivity(fp32.model, lambda model: embed(model, fp32.tokenizer, subset), reduce_range,
                                        progress="sensitivity")
    rows = [{"layer": layer.name, "cosine_drop": layer.drop, "cosine_min": layer.cosine_min} for layer in ranking]
    print_table(rows[:6], title=f"where int8 hurts: each Linear quantised alone, cosine drop on {len(subset)} texts")
    fast, why = bf16_is_fast(ctx, fp32.model.config.hidden_size, s)
    keep_dtype = torch.bfloat16 if fast and ctx.device.type == "cpu" else torch.float32
    print(f"kept layers run in {str(keep_dtype).removeprefix('torch.')}: {why}")
    ladder, chosen = [], None
    for k in MIXED_KEEP_LADDER:  # fewest kept layers first: every kept layer gives back some of int8's speed
        kept = [layer.name for layer in ranking[:k]]
        model = quantize.quantize_mixed(fp32.model, kept, keep_dtype, reduce_range)
        ladder.append({"kept": k, **fidelity(model)})
        if keeps_fidelity(ladder[-1]):
            chosen = (model, kept)
            break
    print_table(ladder, title=f"int8 with the k most sensitive Linears kept: worst of batches {s.recipe_batches} "
                f"on {len(FIDELITY_TEXTS)} varied texts")
    model, kept = chosen or (model, kept)  # none passed: the largest k goes on, and the table shows it fails
    ctx.report.add_rows("sensitivity", rows)
    return model, {"kept": kept, "keep_dtype": str(keep_dtype).removeprefix("torch."), "reduce_range": reduce_range,
                   "ladder": ladder, "bf16_verdict": why}


def drop_slow(ctx: cli.Context, built: dict[str, dict[str, Any]], what: str,
              known: dict[str, str] | None = None) -> dict[str, str]:
    """Take out of the round-robin each variant whose check pass took SLOW_VARIANT x fp32's (or that `known` already
    found slow): timing it for every round would take minutes. The reasons, each also recorded as a skip."""
    slow = {}
    for key in [key for key in built if key != "fp32"]:
        factor = built[key]["check_s"] / built["fp32"]["check_s"]
        if key in (known or {}) or factor > SLOW_VARIANT:
            slow[key] = (known or {}).get(key) or (
                f"its one pass over the fidelity texts took {factor:.1f}x fp32's ({built[key]['check_s']:.1f} vs "
                f"{built['fp32']['check_s']:.1f} s): too slow on this CPU to time in every round")
            ctx.report.skip(f"{what} {VARIANT_LABELS[key]}", slow[key])
            del built[key]
    return slow


def quantized_encoders(ctx: cli.Context, s: Settings) -> tuple[list[dict], Comparison, float | None, dict,
                                                                dict[str, str]]:
    """fp32, int8 and bitsandbytes 8/4-bit encoders, timed round-robin: size, speed, cosine (and per-tensor int8's)."""
    where = models.checkpoint(ENCODER_ROLE, ctx.source)
    fp32 = ctx.load(ENCODER_ROLE)
    builders, mixed = {"fp32": lambda: fp32.model, **quantization_recipes(where, fp32.model, ctx.device,
                                                                          s.torchao)}, {}
    if ctx.device.type == "cpu":
        builders["int8-mixed"] = lambda: mixed.setdefault("model", mixed_int8(ctx, s, fp32))[0]
    built = ctx.build_each("encoder", builders, lambda key: variant_unavailable(key, ctx.device),
                           lambda model: embed(model, fp32.tokenizer, FIDELITY_TEXTS), where, VARIANT_LABELS)
    slow = drop_slow(ctx, built, "encoder")
    batch = sentence_batch(fp32.tokenizer, s.speed_batch, ctx.device)
    rows, comparison = compare_variants(ctx, built, "encoder", lambda key, model: forward(model, batch), lambda key:
                                        embedding_fidelity(built["fp32"]["output"], built[key]["output"]), s.rounds,
                                        items=s.speed_batch)
    print_table(rows, ["variant", *SPEED, "cosine_mean", "cosine_min"],
                title=f"encoder {fp32.info.label}, batch {s.speed_batch}; fidelity on {len(FIDELITY_TEXTS)} texts = "
                "embedding cosine vs fp32 (size, quantised share and Spearman of pairwise similarities: results.csv)")
    per_tensor = None
    if "int8-dynamic" in built:  # one weight scale per matrix instead of one per output row
        per_tensor = cosine_fidelity(built["fp32"]["output"], embed(int8_dynamic(fp32.model, per_channel=False),
                                                                    fp32.tokenizer, FIDELITY_TEXTS))["cosine_mean"]
        print(f"\ndynamic int8 above: one weight scale per output row (per-channel); one scale per matrix gives "
              f"encoder cosine {per_tensor:.4f}.")
    return rows, comparison, per_tensor, mixed.get("model", (None, {}))[1], slow


def quantized_decoders(ctx: cli.Context, s: Settings, slow: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The same variants of the decoder, timed round-robin: size, greedy tokens/s, agreement with fp32's tokens."""
    where = models.checkpoint(DECODER_ROLE, ctx.source)
    fp32 = ctx.load(DECODER_ROLE)
    prompt = fp32.tokenizer(DECODER_PROMPT, return_tensors="pt").to(ctx.device)
    tokens: dict[str, list[int]] = {}

    def greedy(model: Any, new_tokens: int) -> list[int]:
        with torch.inference_mode():  # exactly new_tokens tokens: no sampling, no early stop
            output = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return output[0, prompt["input_ids"].shape[1]:].tolist()

    def generate(key: str, model: Any) -> Callable[[], None]:
        def run() -> None:
            tokens[key] = greedy(model, s.greedy_tokens)  # greedy repeats itself: any call's tokens are the answer
        return run

    builders = {"fp32": lambda: fp32.model, **quantization_recipes(where, fp32.model, ctx.device, s.torchao)}
    for key in ("bnb-8bit", "bnb-4bit") if not s.decoder_bnb and ctx.device.type == "cpu" else ():
        del builders[key]
        ctx.report.skip(f"decoder {VARIANT_LABELS[key]}", "--quick (bitsandbytes generation on a CPU takes "
                        "seconds per call; the full run has it)")
    built = ctx.build_each("decoder", builders, lambda key: variant_unavailable(key, ctx.device),
                           lambda model: greedy(model, 1), where, VARIANT_LABELS)  # 1 token: it runs
    drop_slow(ctx, built, "decoder", {key: f"the encoder's check found it too slow here: {why}"
                                      for key, why in slow.items()})
    rows, comparison = compare_variants(ctx, built, "decoder", generate, lambda key: decoder_fidelity(
        tokens["fp32"], tokens[key]), DECODER_ROUNDS, tokens=s.greedy_tokens)
    print_table(rows, ["variant", "tokens_per_s", "speedup", "tokens_before_divergence",
                       "token_agreement"], title=f"decoder {fp32.info.label}, "
                f"{s.greedy_tokens} greedy tokens, {DECODER_ROUNDS} rounds (these ratios decide no bar or recipe); "
                "fidelity = greedy tokens identical to fp32's before the first difference, then the share at the same "
                "position (after a difference the text shifts, so positions disagree even when it reads alike)")
    lines = comparison.print_verdicts("fp32")
    if where.meaningful:  # a twin's text is noise
        print(f"greedy continuations of {DECODER_PROMPT!r}:")
        for key in built:
            text = fp32.tokenizer.decode(tokens[key], skip_special_tokens=True)
            print(f"  {VARIANT_LABELS[key]:>31}: {textwrap.shorten(repr(text), 84, placeholder='...')}")
    return rows, lines


def int8_bar(rows: list[dict], comparison: Comparison, rounds: int) -> dict:
    """The int8 bar on the fastest int8 variant keeping the fidelity bar (else plain int8, a MISS on fidelity)."""
    int8 = {row["workload"]: row for row in rows if row["key"].startswith("int8-")}
    passing = [name for name, row in int8.items() if keeps_fidelity(row)]
    int8 = int8[recipes.fastest(passing, comparison.ratio) or VARIANT_LABELS["int8-dynamic"]]
    name, target = BAR_NAMES[2], f">= {INT8_SPEEDUP_TARGET}x fp32 throughput at {FIDELITY_TEXT}"
    measured = (f"{int8['variant']} {ratio_cell(int8['speedup'], int8['speedup_low'], int8['speedup_high'])} "
                f"({int8['verdict']}) at cosine mean {int8['cosine_mean']:.4f}, min {int8['cosine_min']:.4f}")
    if not keeps_fidelity(int8):
        return performance_bar(name, target, measured + ": fails the fidelity bar", int8["speedup"], "MISS")
    ratio = (int8["speedup"], int8["speedup_low"], int8["speedup_high"])
    return ratio_bar(name, target, measured, ratio, rounds, INT8_SPEEDUP_TARGET)


def quantization_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """8- and 4-bit weights shrink the model; whether they are faster, and how much the output moves,
    is measured on real weights: the encoder's embeddings and the decoder's greedy tokens."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notice on every CPU call
    activation, torchao_problem = quantize.choose_activation_range(), quantize.torchao_unavailable()
    say(f"dynamic int8: torch.ao.quantization.quantize_dynamic (torch {torch.__version__} deprecates it for "
          f"torchao: {torchao_problem or 'installed, measured below'}). bitsandbytes "
          f"{devices.package_version('bitsandbytes') or 'missing'}: BitsAndBytesConfig as quantization_config.\n"
          f"activations: {activation.bits}-bit (reduce_range={activation.reduce_range}; True keeps a bit of "
          f"headroom by using 7 of the 8 bits) because {activation.reason}\n"
          f"bitsandbytes 8-bit is LLM.int8(): activation columns holding any |value| > llm_int8_threshold "
          f"({BitsAndBytesConfig(load_in_8bit=True).llm_int8_threshold:g}) run in {bnb_compute_dtype(ctx.device)} "
          "against those weight columns, the rest as int8 x int8.")
    if torchao_problem or not s.torchao:
        ctx.report.skip("encoder/decoder torchao int8", torchao_problem or "--quick (its int8 matmul has no fast "
                        "kernel on some CPUs, where one check pass takes 20 s; the full run measures it)")
    encoder_rows, comparison, per_tensor_cosine, mixed, slow = quantized_encoders(ctx, s)
    encoder_lines = comparison.print_verdicts("fp32")
    decoder_rows, decoder_lines = quantized_decoders(ctx, s, slow)
    has_int8 = any(row["key"] == "int8-dynamic" for row in encoder_rows)
    bars = [int8_bar(encoder_rows, comparison, s.rounds)] if has_int8 else []
    ctx.report.add_chart(quantization_chart(encoder_rows, decoder_rows, ctx.out_dir))
    ctx.report.add_rows("quantization", encoder_rows + decoder_rows)
    return {"encoder": encoder_rows, "decoder": decoder_rows, "verdicts": encoder_lines + decoder_lines,
            "int8_per_tensor_cosine_mean": per_tensor_cosine, "mixed": mixed, "too_slow": slow, "bars": bars}


# ---------------------------------------------------------------------------------------- 6. batching


def tokenized_corpus(ctx: cli.Context, s: Settings, tokenizer: Any) -> tuple[list[str], Any, list[int]]:
    """The mixed-length corpus, its token ids (once up front: the passes time the model) and each text's length."""
    corpus = texts.mixed_length_corpus(s.corpus_size, seed=ctx.args.seed, long=LONG_TEXT_WORDS)
    encoded = tokenizer(corpus, truncation=True, max_length=s.max_length)
    return corpus, encoded, [len(ids) for ids in encoded["input_ids"]]


def corpus_pass(model: Any, groups: list[list[int]], batches: list[Any], out: torch.Tensor) -> Callable[[], None]:
    """One pass of the model over prepared batches, writing each text's mean-pooled embedding into `out`."""
    def run() -> None:
        with torch.inference_mode():
            for group, batch in zip(groups, batches):
                out[group] = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).to(out.dtype)
    return run


def batching_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """Batches keep the cores busy, but padding is computed too: sorting texts by length removes most of it.
    Every (padding strategy, batch size) pass over the same corpus is timed round-robin."""
    loaded = ctx.load(ENCODER_ROLE)
    model, tokenizer = loaded.model, loaded.tokenizer
    corpus, encoded, lengths = tokenized_corpus(ctx, s, tokenizer)
    print(f"corpus: {len(corpus)} texts, {min(lengths)}-{max(lengths)} tokens (median "
          f"{sorted(lengths)[len(lengths) // 2]}, max_length {s.max_length}); model {loaded.info.label}")
    strategies = {"pad to max_length": (False, s.max_length), "dynamic": (False, None),
                  "dynamic + sorted": (True, None)}  # (sort by length?, pad to)
    passes, work, outputs, streamed = {}, {}, {}, streamed_weight_bytes(model)
    for batch_size in s.batch_sizes:
        for strategy, (by_length, pad_to) in strategies.items():
            if by_length and batch_size == 1:  # one text per batch: sorting changes nothing but the order
                continue
            groups = make_batches(lengths, batch_size, sort_by_length=by_length)
            batches = padded_batches(tokenizer, encoded, groups, pad_to, ctx.device)
            name = f"{strategy}, batch {batch_size}"
            outputs[name] = torch.empty(len(corpus), model.config.hidden_size, device=ctx.device)
            passes[name] = corpus_pass(model, groups, batches, outputs[name])
            work[name] = {"strategy": strategy, "batch": batch_size,
                          **batch_work(model.config, batches, lengths, groups, pad_to, streamed)}
    sizes = (s.matmul_size // 4, s.matmul_size // 2, s.matmul_size)
    peaks = [calibration.matmul_peak(sizes, PEAK_REPEATS, ctx.device)]
    comparison = ctx.meter().compare(passes, items=len(corpus), warmup=1, min_rounds=s.rounds, budget_s=0,
                                     progress="batching passes")
    peaks.append(calibration.matmul_peak(sizes, PEAK_REPEATS, ctx.device))  # load drifts: best of before and after
    peak = max(peaks, key=lambda p: p["flops"])
    rows = [{**work[row["workload"]], **row, "useful_gflop_per_s": work[row["workload"]]["useful_flops"]
             / row["p50_ms"] / 1e6, "flop_per_byte": work[row["workload"]]["useful_flops"]
             / work[row["workload"]]["bytes"]} for row in comparison.rows(baseline="dynamic, batch 1")]
    print_table(rows, ["strategy", "batch", *SPEED, "waste_pct", "useful_gflop_per_s"],
                title="one pass over the corpus per row; speedup vs dynamic batch 1 (which never pads);\n"
                      "useful_gflop_per_s counts real tokens' FLOPs only (each text as if alone), never padding")
    theory, how = (calibration.theoretical_peak_flops(devices.cpu_flags(), calibration.cores_in_use(),
                                                      calibration.cpu_frequency_mhz())
                   if ctx.device.type == "cpu" else (None, "not derived for GPUs here"))
    print(f"fp32 matmul peak here: {peak['flops'] / 1e9:.1f} GFLOP/s, the fastest of {2 * peak['calls']} timed "
          f"matmuls\n  ({'/'.join(map(str, sizes))} square, before and after the sweep; reached at {peak['size']})\n"
          "theoretical peak: " + (calibration.theory_text(peak["flops"], theory, how) if theory else how))
    reference = outputs["dynamic, batch 1"].float().cpu()
    agreement = {strategy: min(cosine_fidelity(reference, outputs[name].float().cpu())["cosine_min"]
                               for name in outputs if work[name]["strategy"] == strategy) for strategy in strategies}
    print("worst embedding cosine vs unpadded batch 1: " + ", ".join(f"{k} {v:.6f}" for k, v in agreement.items()))
    bars, lines, best_sorted = batching_bars(comparison, rows, peak)
    ctx.report.add_chart(batching_chart(rows, bars[2], ctx.out_dir))
    bandwidth = ctx.report.calibration.get("start", {}).get("copy_gb_s")
    if ctx.device.type == "cpu" and bandwidth:  # the calibration's copy measures host memory, a CPU's roof only
        ctx.report.add_chart(roofline_chart(roofline_points(rows, (results.get("precision") or {}).get("rows", [])),
                                            peak["flops"], bandwidth * 1e9, ctx.out_dir))
    ctx.report.add_rows("batching", rows)
    return {"model": loaded.info.label, "texts": len(corpus), "max_length": s.max_length, "rows": rows,
            "matmul_peak_gflop_per_s": peak["flops"] / 1e9, "matmul_peak_size": peak["size"],
            "theoretical_peak_gflop_per_s": theory / 1e9 if theory else None, "theoretical_peak_how": how,
            "copy_gb_s": bandwidth, "cosine_vs_batch1": agreement, "verdicts": lines,
            "best_sorted_batch": best_sorted["batch"], "bars": bars}


def batching_bars(comparison: Comparison, rows: list[dict], peak: dict) -> tuple[list[dict], list[str], dict]:
    """The three batching bars from the round-robin passes, each with its verdict line."""
    def fastest(strategy: str | None = None) -> dict:
        return max((r for r in rows if strategy in (None, r["strategy"]) and r["batch"] > 1),
                   key=lambda r: r["items_per_s"])

    best, best_sorted, best_padded = fastest(), fastest("dynamic + sorted"), fastest("pad to max_length")
    batch1 = "dynamic, batch 1"
    lines = [comparison.sentence(best["workload"], batch1),
             comparison.sentence(best_sorted["workload"], best_padded["workload"])]
    for line in lines:
        say(line, "  ")
    sorted_ratio = comparison.ratio(best_sorted["workload"], best_padded["workload"])
    # the FLOP/s bar on the strategy this section recommends, counting real tokens only; the median's interval
    # turns into the fraction's (a longer time is a smaller fraction)
    stats = comparison.measurements[best_sorted["workload"]].stats
    fraction = tuple(best_sorted["useful_flops"] / seconds / peak["flops"]
                     for seconds in (stats.median, stats.ci95_high, stats.ci95_low))
    bars = [
        performance_bar(BAR_NAMES[0], "", f"{comparison.ratio_text(best['workload'], batch1)} "
                        f"({best['workload']} vs {batch1})", best["speedup"], "REPORTED"),
        limit_bar(BAR_NAMES[1], f">= {FLOPS_FRACTION_TARGET:.0%} of the {peak['flops'] / 1e9:.1f} GFLOP/s matmul peak",
                  f"{fraction[0]:.0%} [{fraction[1]:.0%}-{fraction[2]:.0%}] ({best_sorted['useful_gflop_per_s']:.1f} "
                  f"useful GFLOP/s, {best_sorted['workload']})", fraction, comparison.rounds, FLOPS_FRACTION_TARGET),
        ratio_bar(BAR_NAMES[3], f">= {SORTED_SPEEDUP_TARGET}x texts/s",
                        f"{comparison.ratio_text(best_sorted['workload'], best_padded['workload'])} "
                        f"({best_sorted['workload']} vs {best_padded['workload']}, each at its best)",
                        sorted_ratio, comparison.rounds, SORTED_SPEEDUP_TARGET),
    ]
    return bars, lines, best_sorted


def roofline_points(batching: list[dict], precision: list[dict]) -> list[dict]:
    """Where the recommended batching rows and the precision rows sit: useful FLOPs per byte moved, useful FLOP/s."""
    points = [{"group": "length-sorted dynamic padding (section 6)", "label": f"batch {r['batch']}", "joined": True,
               "intensity": r["flop_per_byte"], "flops": r["useful_gflop_per_s"] * 1e9}
              for r in batching if r["strategy"] == "dynamic + sorted" or (r["strategy"], r["batch"]) == ("dynamic", 1)]
    return points + [{"group": f"precision, batch {r['batch']} (section 4)", "label": r["variant"],
                      "intensity": r["useful_flops"] / r["bytes"], "flops": r["useful_flops"] / r["p50_ms"] * 1e3}
                     for r in precision]


# ------------------------------------------------------------------------------- 7. attention, compile


def attention_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """Fused attention kernels and compiled graphs do the same maths with fewer trips to memory;
    compiling costs time up front, and every new input shape may cost more."""
    where = models.checkpoint(s.speed_role, ctx.source)
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    batch = sentence_batch(tokenizer, s.speed_batch, ctx.device)
    runs = {}
    for implementation in ("eager", "sdpa"):
        model = ctx.record_load(where, lambda: AutoModel.from_pretrained(
            where.path, attn_implementation=implementation, dtype=torch.float32, device_map=ctx.device))
        runs[implementation] = forward(model, batch)
    comparison = ctx.meter().compare(runs, items=s.speed_batch, min_rounds=s.rounds, progress="attention")
    rows = comparison.rows(baseline="eager", model=where.label)
    print_table(rows, ["workload", *SPEED], title=f"attn_implementation= on {where.label}, batch {s.speed_batch}")
    agreement = cosine_fidelity(runs["eager"]().flatten(1).float().cpu(), runs["sdpa"]().flatten(1).float().cpu())
    print(f"worst output cosine sdpa vs eager: {agreement['cosine_min']:.6f} (same weights: equivalence, not quality)")
    lines = comparison.print_verdicts("eager")
    verdict = comparison.verdict("sdpa", "eager")
    problem = devices.compile_problem(ctx.device) if s.torch_compile else (
        "--quick (compiling takes about a minute on a small CPU; the full run has it)")
    compiled = None
    try:
        if problem:
            raise RuntimeError(problem)
        compiled = compile_on_corpus(ctx, s, results)
        lines.append(compiled["verdict_line"])
    except Exception as error:  # a broken toolchain shows up only when inductor builds its first kernel
        ctx.report.skip("torch.compile", problem or first_line(error))
    ctx.report.add_rows("attention", rows + (compiled or {}).get("rows", []))
    return {"rows": rows, "verdicts": lines, "attention_verdict": verdict,
            "attention_choice": "eager" if verdict == "slower" else "sdpa",  # a tie keeps transformers' default
            "cosine_min_between_variants": agreement["cosine_min"], "compile": compiled, "compile_skipped": problem}


def compile_on_corpus(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """torch.compile on the recipe's many-shaped sorted batches: first calls, recompiles, then steady state vs eager."""
    loaded = ctx.load(ENCODER_ROLE)
    batch_size = (results.get("batching") or {}).get("best_sorted_batch", RECIPE_DEFAULT_BATCH)
    corpus, encoded, lengths = tokenized_corpus(ctx, s, loaded.tokenizer)
    groups = make_batches(lengths, batch_size, sort_by_length=True)
    batches = padded_batches(loaded.tokenizer, encoded, groups, None, ctx.device)
    compiled = torch.compile(loaded.model)
    seconds, graphs = devices.first_calls(compiled, batches, ctx.device)  # a call compiles when it needs a new graph
    before = devices.compiled_graphs()
    out = torch.empty(len(corpus), loaded.model.config.hidden_size, device=ctx.device)
    comparison = ctx.meter().compare({"eager": corpus_pass(loaded.model, groups, batches, out),
                                      "torch.compile": corpus_pass(compiled, groups, batches, out)},
                                     items=len(corpus), min_rounds=s.rounds, progress="compile vs eager")
    result = {"batch": batch_size, "shapes": len(batch_shapes(lengths, groups)),
              **devices.compile_costs(seconds, graphs, comparison.measurements["torch.compile"].stats.median,
                                      comparison.difference("eager", "torch.compile")),  # seconds saved per pass
              "graphs_during_timing": devices.compiled_graphs() - before,
              "verdict": comparison.verdict("torch.compile", "eager"),
              "verdict_line": comparison.sentence("torch.compile", "eager"),
              "rows": comparison.rows(baseline="eager", model=f"{loaded.info.label}, corpus pass")}
    say(f"\ntorch.compile on {len(corpus)} length-sorted texts in batches of {batch_size} ({result['shapes']} "
        f"distinct batch shapes): first call {seconds[0]:.1f} s ({graphs[0]} graph(s)); {result['recompiles']} "
        f"recompile(s) over the other shapes, {result['recompile_s']:.1f} s; {result['graphs_during_timing']} "
        "during the timed passes")
    print_table(result["rows"], ["workload", *SPEED])
    result["break_even_line"] = devices.break_even_text(result) + f"; a pass embeds these {len(corpus)} texts"
    say(result["verdict_line"], "  ")
    say(result["break_even_line"], "  ")
    return result


# ------------------------------------------------------------------------------------------ 8. memory


def load_on(device: torch.device, path: Any, **kwargs: Any) -> Any:
    """from_pretrained, then .to(device) unless a device_map placed it: timed as one, every row includes the copy."""
    model = AutoModel.from_pretrained(path, **kwargs)
    return model if "device_map" in kwargs else model.to(device)


def load_and_first_forward(ctx: cli.Context, label: str, load: Callable[[], Any],
                           batch: dict) -> tuple[Any, Callable[[], Any], dict]:
    """The model, its forward, and what loading it and its first forward cost: seconds, and MiB above the start."""
    memory.cleanup()
    start = memory.resident_bytes(ctx.device)
    model, timing = ctx.meter().time_load(label, load)
    after_load, run = memory.resident_bytes(ctx.device), forward(model, batch)
    first_s = devices.timed_once(run, ctx.device)
    return model, run, {"load_s": timing.seconds, "first_inference_s": timing.seconds + first_s,
                        "load_peak_mib": timing.peak_rss_delta_bytes / MIB,
                        "after_load_mib": (after_load - start) / MIB,
                        "after_first_forward_mib": (memory.resident_bytes(ctx.device) - start) / MIB}


def load_rows(ctx: cli.Context, s: Settings) -> list[dict]:
    """Load time and memory of the speed model (plain, low_cpu_mem_usage, device_map, half-precision dtype), then the
    first forward that a memory-mapped load defers the reading to, and what a forward adds above the weights."""
    where = models.checkpoint(s.speed_role, ctx.source)
    batch = sentence_batch(AutoTokenizer.from_pretrained(where.path), s.speed_batch, ctx.device)
    half = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16
    variants = {
        "plain from_pretrained": dict(dtype=torch.float32),
        "low_cpu_mem_usage=True": dict(dtype=torch.float32, low_cpu_mem_usage=True),
        f'device_map="{ctx.device}"': dict(dtype=torch.float32, device_map=ctx.device),
        f"dtype={str(half).removeprefix('torch.')}": dict(dtype=half, device_map=ctx.device),
    }
    AutoModel.from_pretrained(where.path)  # the file is now in the page cache, so the loads below compare alike
    rows = []
    for label, kwargs in variants.items():
        model, run, row = load_and_first_forward(ctx, label, lambda: load_on(ctx.device, where.path, **kwargs), batch)
        rows.append({"technique": label, **row, "activations_mib": peak_while_held(run, ctx.device) / MIB,
                     "weights_mib": memory.weights_bytes(model) / MIB,
                     "dtype": str(model.dtype).removeprefix("torch.")})
        del model, run
    return rows


def load_peak_notes(rows: list[dict], stored: dict[str, int]) -> list[str]:
    """One line for each load whose peak exceeds its weights, saying where the extra memory came from."""
    floats = {name: stored[code] / MIB for code, name in (("F32", "float32"), ("BF16", "bfloat16"),
                                                          ("F16", "float16")) if code in stored}
    notes = []
    for row in rows:
        if row["load_peak_mib"] <= row["weights_mib"]:
            continue
        head = (f"{row['technique']}: load peak {row['load_peak_mib']:.0f} MiB > its {row['weights_mib']:.0f} MiB of "
                "weights: ")
        read = sum(floats.values())
        notes.append(head + (f"the file stores {'/'.join(floats)}, so every tensor is read from the mapped file (its "
                             f"pages count in RSS) into a new {row['dtype']} copy: {read:.0f} + "
                             f"{row['weights_mib']:.0f} = {read + row['weights_mib']:.0f} MiB"
                             if floats and row["dtype"] not in floats else
                             "tensors were copied out of the memory-mapped file, whose pages count in RSS while both "
                             "are held"))
    return notes


def streaming_rows(ctx: cli.Context, s: Settings) -> list[dict]:
    """Embedding a long list: materialising every input and output vs streaming batches through a generator."""
    loaded = ctx.load(ENCODER_ROLE)
    model, tokenizer, long_list = loaded.model, loaded.tokenizer, texts.repeated_sentences(s.stream_texts)
    held: dict[str, int] = {}

    def batches():  # a generator: each batch is tokenised when the loop asks for it
        for i in range(0, len(long_list), 32):
            yield tokenizer(long_list[i:i + 32], padding=True, return_tensors="pt").to(ctx.device)

    def materialised() -> torch.Tensor:
        inputs = list(batches())  # every input tokenised up front
        with torch.inference_mode():
            outputs = [model(**batch) for batch in inputs]  # every full output kept until the end
        held["materialised"] = sum(o.last_hidden_state.nbytes for o in outputs)
        return torch.cat([mean_pool(o.last_hidden_state, b["attention_mask"]) for o, b in zip(outputs, inputs)])

    def streamed() -> torch.Tensor:
        with torch.inference_mode():
            pooled = [mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]) for batch in batches()]
        held["streamed"] = sum(p.nbytes for p in pooled)
        return torch.cat(pooled)

    embeddings: dict[str, torch.Tensor] = {}
    peaks = {name: peak_while_held(lambda: embeddings.setdefault(name, run()), ctx.device)
             for name, run in (("streamed", streamed), ("materialised", materialised))}
    same = cosine_fidelity(embeddings["materialised"].float().cpu(), embeddings["streamed"].float().cpu())["cosine_min"]
    return [{"technique": f"{name} ({len(long_list)} texts)", "peak_rss_delta_mib": peaks[name] / MIB,
             "held_mib": held[name] / MIB, "cosine_min": same} for name in peaks]


def cleanup_rows(ctx: cli.Context, s: Settings) -> list[dict]:
    """What del, gc.collect() and torch.cuda.empty_cache() give back after a model and a grad-on output."""
    where = models.checkpoint(s.speed_role, ctx.source)
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    memory.cleanup()
    steps = [("before load", memory.snapshot(ctx.device))]
    model = AutoModel.from_pretrained(where.path, dtype=torch.float32, device_map=ctx.device)
    output = model(**sentence_batch(tokenizer, s.speed_batch, ctx.device)).last_hidden_state
    steps.append(("model + grad-on output held", memory.snapshot(ctx.device)))
    del model, output
    steps.append(("after del", memory.snapshot(ctx.device)))
    gc.collect()  # what only reference cycles kept alive
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the allocator's cached blocks go back to the driver
    steps.append(("after gc.collect() + empty_cache()", memory.snapshot(ctx.device)))
    if memory.trim_heap():
        steps.append(("after glibc malloc_trim(0)", memory.snapshot(ctx.device)))
    (_, deleted), (_, collected) = steps[2:4]
    say(f"gc.collect() + empty_cache() freed {(deleted.rss_bytes - collected.rss_bytes) / MIB:.1f} MiB RSS, "
        f"{(deleted.cuda_reserved_bytes - collected.cuda_reserved_bytes) / MIB:.1f} MiB CUDA reserved; malloc_trim "
        f"then returned {(collected.rss_bytes - steps[-1][1].rss_bytes) / MIB:.1f} MiB the C allocator had kept")
    return memory.snapshot_rows(steps)


def offload_rows(ctx: cli.Context, s: Settings) -> tuple[list[dict], str]:
    """device_map="auto" with a small max_memory: what lands where, and what it costs per call, round-robin."""
    where = models.checkpoint("distilbert-base-uncased", ctx.source)  # 265 MB, squeezed under a far smaller cap
    batch = sentence_batch(AutoTokenizer.from_pretrained(where.path), 4, ctx.device)
    cap = {"cpu": OFFLOAD_CAP} if ctx.device.type != "cuda" else {  # accelerate names GPUs by index: this run's one
        ctx.device.index if ctx.device.index is not None else torch.cuda.current_device(): OFFLOAD_CAP, "cpu": "64GiB"}
    runs, first = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for label, kwargs in (("whole model in memory", dict(device_map=ctx.device)),
                              (f"auto, max_memory={cap}",
                               dict(device_map="auto", max_memory=cap, offload_folder=folder))):
            model, runs[label], first[label] = load_and_first_forward(ctx, label, lambda: AutoModel.from_pretrained(
                where.path, dtype=torch.float32, **kwargs), batch)
            ctx.record(where.info(model, first[label]["load_s"]))
            placed = memory.placement_bytes(model, getattr(model, "hf_device_map", None), str(ctx.device))
            first[label]["placement"] = ", ".join(f"{device} {size / MIB:.0f} MiB" for device, size in placed.items())
        comparison = ctx.meter().compare(runs, items=4, warmup=1, min_rounds=s.rounds, progress="offloading")
    rows = [{**row, "technique": row["workload"], **first[row["workload"]]}
            for row in comparison.rows(baseline="whole model in memory")]
    print_table(rows, ["technique", "first_inference_s", "after_first_forward_mib", "p50_ms", "speedup"],
                title=f"{where.label}: whole, or device_map='auto' under a {OFFLOAD_CAP} cap; MiB "
                f"above the start ({'CUDA allocated' if ctx.device.type == 'cuda' else 'RSS'})")
    print("\n".join(f"  weights placed, {row['technique']}: {row['placement']}" for row in rows))
    return rows, comparison.print_verdicts("whole model in memory")[0]


def memory_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """Peak memory decides whether a model fits at all: how it is loaded, what is kept alive,
    what cleanup really frees, and what offloading under a memory cap costs per call."""
    loads, where = load_rows(ctx, s), models.checkpoint(s.speed_role, ctx.source)
    print_table(loads, ["technique", "load_s", "first_inference_s", "load_peak_mib", "after_first_forward_mib",
                        "activations_mib", "weights_mib"],
                title=f"loading {where.label}, then one forward of {s.speed_batch} sentences (file already in the page "
                "cache; one load each, so seconds are indicative); first_inference = load + first forward; MiB above "
                f"the start ({'CUDA allocated' if ctx.device.type == 'cuda' else 'RSS'}); activations = a later "
                "forward's peak above the resident weights")
    plain, lean, _, half = loads  # each sentence below is computed from these rows' numbers
    findings = [f"low_cpu_mem_usage=True: load peak {lean['load_peak_mib']:.1f} MiB vs plain "
                f"{plain['load_peak_mib']:.1f} MiB" + (" -- no difference: transformers 5 always loads lean and "
                "ignores the flag" if abs(lean["load_peak_mib"] - plain["load_peak_mib"]) < 2 else "")]
    if ctx.device.type == "cpu" and plain["after_load_mib"] < 0.5 * plain["weights_mib"]:
        findings.append(f"fp32 weights: {plain['after_load_mib']:.0f} MiB resident after loading in "
                        f"{plain['load_s']:.2f} s, {plain['after_first_forward_mib']:.0f} MiB after the first forward "
                        f"(ready after {plain['first_inference_s']:.2f} s), of {plain['weights_mib']:.0f} MiB: the "
                        "safetensors file is memory-mapped, so the load reads little and the first forward pages "
                        "the weights in")
    findings.append(f"{half['technique']}: {half['after_first_forward_mib']:.0f} MiB resident after the first forward "
                    f"vs fp32's {plain['after_first_forward_mib']:.0f} MiB (weights {half['weights_mib']:.0f} vs "
                    f"{plain['weights_mib']:.0f} MiB)")
    findings += load_peak_notes(loads, memory.stored_bytes(where.path))
    print("\n".join(textwrap.fill(line, 118, initial_indent="  ", subsequent_indent="    ") for line in findings))
    streams = streaming_rows(ctx, s)
    print_table(streams, title="a long list through the encoder (same embeddings either way)")
    cleanup = cleanup_rows(ctx, s)
    print_table(cleanup, title="del + gc.collect() + torch.cuda.empty_cache(), step by step")
    offload, offload_line = [], None
    try:
        offload, offload_line = offload_rows(ctx, s)
    except Exception as error:  # accelerate missing or a dispatch this version refuses
        ctx.report.skip("device_map='auto' offloading", first_line(error))
    ctx.report.add_chart(memory_chart(loads, offload, ctx.out_dir))
    ctx.report.add_rows("memory", loads + streams + offload)
    return {"loads": loads, "findings": findings, "streaming": streams, "cleanup": cleanup, "offload": offload,
            "verdicts": [offload_line] if offload_line else []}


# ------------------------------------------------------------------------------------------ 9. peers


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


def candidates(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The recipe's candidates: PyTorch configurations (variant x batch) and the peer runtimes, each built lazily as
    embed(texts); with each one's configuration (for the snippet) and why any cannot run here."""
    where, fp32 = models.checkpoint(ENCODER_ROLE, ctx.source), ctx.load(ENCODER_ROLE)
    mixed, cpu = (results.get("quantization") or {}).get("mixed") or {}, ctx.device.type == "cpu"
    half = torch.bfloat16 if cpu else torch.float16
    builders, config, problems = {}, {}, {}

    def pytorch(name: str, make: Callable[[], Any], batch: int, **settings: Any) -> None:
        def build() -> Callable[[list[str]], torch.Tensor]:
            model = make()
            return lambda corpus: embed_sorted(model, fp32.tokenizer, corpus, batch, s.max_length)
        builders[name], config[name] = build, {"runtime": "PyTorch", "batch": batch, **settings}

    def lead_int8() -> Any:  # the mixed model of section 5 when it ran, plain int8 otherwise
        if mixed:
            return quantize.quantize_mixed(fp32.model, mixed["kept"], getattr(torch, mixed["keep_dtype"]),
                                           mixed["reduce_range"])
        return int8_dynamic(fp32.model)

    short = {"float32": "fp32", "bfloat16": "bf16"}.get(mixed.get("keep_dtype"))
    lead = f"int8, {len(mixed['kept'])} kept {short}" if mixed else "int8"
    pytorch("PyTorch fp32, batch 32", lambda: fp32.model, 32, variant="fp32")
    pytorch(f"PyTorch {str(half)[6:]} weights, batch 32", lambda: copy.deepcopy(fp32.model).to(half), 32,
            variant="half", dtype=str(half))
    if cpu and mixed.get("keep_dtype") != "bfloat16":  # bf16 measured slower than fp32 here (section 5)
        problems[f"PyTorch {str(half)[6:]} weights, batch 32"] = f"bf16 is not faster here: {mixed['bf16_verdict']}" \
            if mixed else "section 5 did not measure whether bf16 is fast here"
    if mixed:
        pytorch("PyTorch int8, batch 32", lambda: int8_dynamic(fp32.model, mixed["reduce_range"]), 32, variant="int8",
                kept=[], keep_dtype="float32", reduce_range=mixed["reduce_range"])
    settings = dict(kept=mixed.get("kept", []), keep_dtype=mixed.get("keep_dtype", "float32"),
                    reduce_range=mixed.get("reduce_range", quantize.choose_activation_range().reduce_range))
    for batch in s.recipe_batches:
        pytorch(f"PyTorch {lead}, batch {batch}", lead_int8, batch, variant="int8", **settings)
    pytorch(f"PyTorch {lead} compiled, batch 32", lambda: torch.compile(lead_int8(), dynamic=True), 32,
            variant="int8", compile=True, **settings)  # dynamic: one graph for every batch shape of the corpus
    calibration = texts.mixed_length_corpus(s.corpus_size, seed=ctx.args.seed, long=LONG_TEXT_WORDS)

    def smoothquant() -> Any:  # activation outliers moved into the weights (1/s folded into the LayerNorms), then int8
        smoothed = quantize.smooth_bert(fp32.model, lambda model: embed_sorted(model, fp32.tokenizer, calibration,
                                                                                 32, s.max_length))
        return quantize.quantize_mixed(smoothed, settings["kept"], getattr(torch, settings["keep_dtype"]),
                                       settings["reduce_range"])

    def torchao_int8() -> Any:  # int8 weights and per-token int8 activations; inductor compiles its int8 matmuls
        return torch.compile(quantize.quantize_torchao_int8(fp32.model, settings["reduce_range"]), dynamic=True)

    def pt2e_int8() -> Any:  # export, annotate for x86 int8, convert: inductor fuses quantise + int8 matmul
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        example = dict(fp32.tokenizer(calibration[:8], padding=True, return_tensors="pt"))
        prepared = prepare_pt2e(quantize.export_encoder(fp32.model, example),  # dynamic batch and sequence dims
                                quantize.x86_dynamic_quantizer(settings["reduce_range"]))
        prepared(*example.values())  # dynamic activations need no statistics: this call only checks the graph runs
        return quantize.ExportedEncoder(torch.compile(convert_pt2e(prepared), dynamic=True), fp32.model.config,
                                        list(example))

    pytorch(f"PyTorch {lead} + SmoothQuant, batch 32", smoothquant, 32, variant="int8", calibration=calibration,
            **settings)
    pytorch("PyTorch torchao int8 compiled, batch 32", torchao_int8, 32, variant="torchao", compile=True,
            reduce_range=settings["reduce_range"])
    pytorch("PyTorch PT2E x86 int8 compiled, batch 32", pt2e_int8, 32, variant="pt2e", compile=True,
            reduce_range=settings["reduce_range"])
    compiling = devices.compile_problem(ctx.device) or (
        None if s.torch_compile else "--quick (compiling takes minutes on a small CPU; the full run has it)")
    problems[f"PyTorch {lead} compiled, batch 32"] = compiling
    quantization = results.get("quantization") or {}
    torchao = next((row for row in quantization.get("encoder", [])
                    if row["key"] == "torchao-int8"), None)  # its int8 matmul (aten::_int_mm) lacks a fast kernel
    too_slow = (quantization.get("too_slow") or {}).get("torchao-int8")
    slow = (too_slow and f"section 5: {too_slow}") or (torchao and torchao["speedup_high"] < 1 and (
        f"section 5 measured torchao int8 at {torchao['speedup']:.2f}x fp32 [{torchao['speedup_low']:.2f}-"
        f"{torchao['speedup_high']:.2f}] on this CPU: too slow to time on the corpus"))
    problems["PyTorch torchao int8 compiled, batch 32"] = quantize.torchao_unavailable() or slow or compiling
    problems["PyTorch PT2E x86 int8 compiled, batch 32"] = (
        None if cpu else "PT2E's x86 quantizer is CPU-only") or quantize.pt2e_unavailable() or compiling
    for name in [name for name in builders if config[name]["variant"] == "int8"]:
        problems[name] = problems.get(name) or variant_unavailable("int8-dynamic", ctx.device)
    size = dict(batch_size=32, max_length=s.max_length)
    reduce_range = quantize.choose_activation_range().reduce_range
    builders.update(runtimes.peer_builders(where.path, fp32.model, fp32.tokenizer, ctx.device, ctx.out_dir / "onnx",
                                           reduce_range, **size))
    config.update({peer: {"runtime": peer, "batch": 32, "reduce_range": reduce_range} for peer in PEERS})
    problems.update(runtimes.peer_problems(where.path, ctx.device))
    return builders, config, problems


def round_robin(ctx: cli.Context, embedders: dict[str, Callable[[list[str]], torch.Tensor]], corpus: list[str],
                rounds: int, warmup: int, progress: str) -> tuple[Comparison, dict[str, torch.Tensor]]:
    """Every embedder over the same texts, round-robin: the comparison and each one's embeddings of them."""
    outputs: dict[str, torch.Tensor] = {}

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = embedders[name](corpus)
        return run

    comparison = ctx.meter().compare({name: timed(name) for name in embedders}, items=len(corpus), warmup=warmup,
                                     min_rounds=rounds, budget_s=0, progress=progress)
    return comparison, outputs


def fidelity_rows(comparison: Comparison, outputs: dict[str, torch.Tensor], varied: dict[str, torch.Tensor],
                  reference: str, config: dict[str, dict]) -> list[dict]:
    """The comparison's rows with each one's cosine against the reference on these texts and on the varied set."""
    rows = []
    for row in comparison.rows(baseline=reference):
        name = row["workload"]
        varied_fidelity = cosine_fidelity(varied[reference], varied[name])
        rows.append({**row, **cosine_fidelity(outputs[reference], outputs[name]),
                     "varied_mean": varied_fidelity["cosine_mean"], "varied_min": varied_fidelity["cosine_min"],
                     "batch": config[name]["batch"]})
        for other, column in ((reference, "vs_encode"), (runtimes.ONNX_INT8, "vs_ort_int8")):
            estimate, low, high = comparison.ratio(name, other) if other in outputs else (None, 0, 0)
            rows[-1][column] = f"{estimate:.2f}x [{low:.2f}-{high:.2f}]" if estimate else "-"
    return rows


def peers_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """What a learner could use instead (sentence-transformers' encode, ONNX Runtime) and our PyTorch configurations:
    all screened on a sample of the same real paragraphs, the fastest few then timed together over all of them."""
    corpus, source = recipe_corpus(ctx, s)
    sample = sorted(corpus, key=len)[::s.screen_every]  # every n-th by length: the corpus's mix of short and long
    builders, config, problems = candidates(ctx, s, results)
    built = ctx.build_each("recipe", builders, problems.get, lambda embedder: embedder(EXAMPLE_TEXTS))  # it runs
    embedders = {name: candidate["model"] for name, candidate in built.items()}
    varied = {name: embed_(FIDELITY_TEXTS) for name, embed_ in embedders.items()}
    reference = PEER_BASELINE if PEER_BASELINE in embedders else next(iter(embedders))
    bar = recipes.FidelityBar(*FIDELITY_BAR)

    screening, outputs = round_robin(ctx, embedders, sample, s.rounds, 1, "screening candidates")
    screened = fidelity_rows(screening, outputs, varied, reference, config)
    # A family is one configuration at every batch size: the sample is 8x sparser in length than the corpus, so a
    # larger batch pads more there than it will on the corpus. Batch size is decided on the corpus itself.
    going, stopped = recipes.finalists(screened, screening.ratio, PEERS, bar,
                                       keep=[name for name in (reference, runtimes.ONNX_INT8) if name in embedders],
                                       family=lambda name: repr({**config[name], "batch": None}))
    print_table([{**row, "cosine_min": f"{row['cosine_min']:.4f}", "varied_min": f"{row['varied_min']:.4f}",
                  "final": "yes" if row["workload"] in going else "no"} for row in screened],
                ["workload", "vs_encode", "cosine_min", "varied_min", "final"],
                title=f"screening: every candidate on {len(sample)} of the {len(corpus)} texts (one in "
                      f"{s.screen_every}, spread over the lengths), one round-robin")
    say(f"the {len(going)} finalists: up to two of ours, the fastest that keep {FIDELITY_TEXT} on both text sets "
        "(each at every batch size tried: the sample pads differently); every peer that keeps it (a sample must not "
        "pick the recipe bar's opponent); and "
        f"{' and '.join(name for name in (reference, runtimes.ONNX_INT8) if name in going)} (the columns' "
        "references). Stopped here:")
    for name, why in stopped.items():
        say(f"{name}: {why}", "  ")

    # the screening passes were every finalist's warm-up
    comparison, outputs = round_robin(ctx, {name: embedders[name] for name in going}, corpus, s.rounds, 0,
                                      "recipe finalists")
    rows = fidelity_rows(comparison, outputs, varied, reference, config)
    reference_speed = next(row["items_per_s"] for row in rows if row["workload"] == reference)
    for row in rows:  # one estimator: texts/s follow the paired ratio, so they rank the rows as the ratios do
        row["items_per_s_own_median"] = row["items_per_s"]
        row["items_per_s"] = reference_speed * comparison.ratio(row["workload"], reference)[0]
    choice = recipes.choose(rows, comparison.ratio, PEERS, bar)
    print_table([{**row, "cosine_min": f"{row['cosine_min']:.4f}", "varied_min": f"{row['varied_min']:.4f}"}
                 for row in rows], ["workload", "vs_encode", "vs_ort_int8", "cosine_min", "varied_min"],
                title=f"the finalists on all {len(corpus)} {source} (max_length {s.max_length}), one round-robin")
    say(f"vs_encode, vs_ort_int8: this row's speed over that row's, the paired ratio of the rounds [interval]. "
        f"cosine_min: worst text vs {reference} on these texts; varied_min: the same on {len(FIDELITY_TEXTS)} varied "
        f"texts. Full rows in results.csv (p50, cosine mean, texts/s = {reference}'s {reference_speed:.1f} x "
        "vs_encode).")
    for name, why in choice.excluded.items():
        say(f"cannot win: {name}: {why}", "  ")
    ours = [row["workload"] for row in rows if row["workload"] not in {*PEERS, *choice.excluded}]
    pytorch = recipes.fastest(ours, comparison.ratio)  # our best, for the line that tells PyTorch and peers apart
    pairs = {(choice.winner, reference), (choice.winner, choice.best_peer), (pytorch, choice.best_peer)}
    lines = [comparison.sentence(a, b) for a, b in sorted(pairs, key=str) if a and b and a != b]
    print(f"fastest at {FIDELITY_TEXT} on both text sets: {choice.winner}")
    for line in lines:
        say(line, "  ")
    result = {"rows": rows, "baseline": reference, "texts": len(corpus), "text_source": source, "verdicts": lines,
              "screening": {"texts": len(sample), "rows": screened, "stopped": stopped}, "winner": choice.winner,
              "best_peer": choice.best_peer, "excluded": {**stopped, **choice.excluded},
              "config": config.get(choice.winner), "pairs": recipes.pairwise(going, comparison.ratio),
              "bars": []}
    if choice.winner:
        result["example_embeddings"] = built[choice.winner]["output"].tolist()
        result["bars"] = [recipe_bar(comparison, choice, rows)]
    ctx.report.add_rows("peers", rows)
    return result


def recipe_corpus(ctx: cli.Context, s: Settings) -> tuple[list[str], str]:
    """The texts every candidate embeds: the learner's --text-file/--text, else real documentation paragraphs."""
    given = cli.read_user_texts(ctx.args)
    return (given, "of your texts") if given else (texts.documentation_paragraphs(s.recipe_texts),
                                                   "paragraphs of Python's documentation")


def recipe_bar(comparison: Comparison, choice: recipes.Choice, rows: list[dict]) -> dict:
    """The recipe against the fastest other peer that keeps the bar, from their direct paired ratio."""
    target = f">= 1.0x the fastest peer runtime, both at {FIDELITY_TEXT}"
    if not choice.best_peer:
        return performance_bar(BAR_NAMES[4], target, f"{choice.winner}: no other peer kept the fidelity bar",
                               None, "REPORTED")
    mine = next(row for row in rows if row["workload"] == choice.winner)
    note = " (a peer runtime won: the snippet is its code)" if choice.winner in PEERS else ""
    measured = (f"{choice.winner}{note} {comparison.ratio_text(choice.winner, choice.best_peer)} {choice.best_peer}"
                f", worst cosine {mine['cosine_min']:.4f}")
    return ratio_bar(BAR_NAMES[4], target, measured, comparison.ratio(choice.winner, choice.best_peer),
                     comparison.rounds, 1.0)


# ----------------------------------------------------------------------------------------- 10. recipe


def recipe_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """The winner of section 9's round-robin as code to paste: it computes what was timed there,
    on example texts, and its embeddings are kept in the report to check a pasted copy against."""
    peers, ran_here = results.get("peers"), not results.get("peers")
    if ran_here:
        print("section 9 did not run in this run, so its round-robin runs here")
        peers = peers_section(ctx, s, results)
    if not peers["winner"]:
        raise RuntimeError("no candidate kept the fidelity bar, so there is no recipe to recommend")
    winner, config = peers["winner"], peers["config"]
    row = next(row for row in peers["rows"] if row["workload"] == winner)
    entry = models.CATALOG.get(ctx.load(ENCODER_ROLE).info.name)
    model_id = entry.hub_id if entry else ctx.load(ENCODER_ROLE).info.name
    measured = (f"{row['vs_encode']} the speed of sentence-transformers' encode on {peers['texts']} "
                f"{peers['text_source']}, "
                f"worst cosine {row['cosine_min']:.4f}")
    say(f"recipe: {winner}\n  measured: {measured}\n  others that could not win: {len(peers['excluded'])} "
        f"(section 9 lists why)")
    snippet = (runtimes.peer_snippet(winner, model_id, EXAMPLE_TEXTS, config["reduce_range"], max_length=s.max_length)
               if winner in PEERS else recipes.pytorch_snippet(config, model_id, EXAMPLE_TEXTS, inspect.getsource(
                   embed_sorted), s.max_length, ctx.device.type))
    measured_comment = textwrap.fill(f"measured here: {measured}", 96, initial_indent="# ", subsequent_indent="#   ")
    print("\nready to paste (" + ("a peer runtime won, so this is its code" if winner in PEERS else "PyTorch") + "):\n"
          + "-" * 78 + f"\n{measured_comment}\n{snippet}\n" + "-" * 78)
    return {"winner": winner, "config": config, "snippet": snippet, "model_id": model_id,
            "example_texts": EXAMPLE_TEXTS, "example_embeddings": peers["example_embeddings"],
            "bars": peers["bars"] if ran_here else []}


# ------------------------------------------------------------------------------------- 11. GPU memory

GPU_MEMORY_PARTS = ("memory per precision", "caching allocator", "largest batch", "KV-cache growth", "pinned copies",
                    "CUDA-event timing", "CUDA graphs")


def footprint(device: torch.device, load: Callable[[], Any], batch: dict, autocast: torch.dtype | None) -> dict:
    """A model's GPU memory above the baseline: the weights it holds after loading, and what a forward adds on top."""
    memory.cleanup()
    base = torch.cuda.memory_allocated(device)
    model = load()
    weights = torch.cuda.memory_allocated(device) - base
    with memory.CudaPeak(device) as peak, torch.inference_mode(), precision_mode(device.type, autocast):
        model(**batch)  # under autocast the fp16/bf16 copies of the fp32 weights live here, beside the activations
    del model
    return {"weights_mib": weights / MIB, "activations_mib": peak.delta_bytes / MIB,
            "peak_above_baseline_mib": (weights + peak.delta_bytes) / MIB}


def gpu_memory_section(ctx: cli.Context, s: Settings, results: dict[str, Any]) -> dict:
    """On a GPU, memory decides which model and batch fit: weights and activations per precision, the caching
    allocator, the largest batch, the KV cache per token, and host versus GPU time."""
    if ctx.device.type != "cuda":
        reason = f"this run is on {ctx.device}; each part measures CUDA's own memory and timing"
        ctx.report.skip_parts("GPU memory", GPU_MEMORY_PARTS, reason)
        return {"skipped": reason}
    device, where = ctx.device, models.checkpoint(ENCODER_ROLE, ctx.source)
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    batch = sentence_batch(tokenizer, s.speed_batch, device)

    def fp32() -> Any:
        return AutoModel.from_pretrained(where.path, dtype=torch.float32, device_map=device)

    half = torch.bfloat16 if devices.native_bf16(device) else torch.float16
    variants = {"fp32": (fp32, None), f"{'bf16' if half == torch.bfloat16 else 'fp16'} autocast": (fp32, half),
                "fp16 weights (.half())": (lambda: fp32().half(), None)}
    bnb = quantization_recipes(where, None, device, torchao=False)
    variants.update({VARIANT_LABELS[key]: (bnb[key], None) for key in ("bnb-8bit", "bnb-4bit")
                     if not variant_unavailable(key, device)})
    precision_rows = [{"variant": name, **footprint(device, load, batch, autocast)}
                      for name, (load, autocast) in variants.items()]
    print_table(precision_rows, title=f"{where.label} on {device}, batch {s.speed_batch}: MiB above the baseline "
                "(autocast keeps the fp32 weights and adds its casts to the activations)")

    model = fp32()
    big = sentence_batch(tokenizer, 64 * s.speed_batch, device)
    allocator = memory.allocator_rows(device, forward(model, big))
    print_table(allocator, title="the caching allocator after a batch of "
                f"{64 * s.speed_batch}: freed blocks stay reserved until torch.cuda.empty_cache()")

    long = tokenizer(texts.repeated_sentences(1), padding="max_length", max_length=512, truncation=True,
                     return_tensors="pt").to(device)
    fits, why = fitting_batches(lambda n: forward(model, {k: v.expand(n, -1) for k, v in long.items()})(),
                                [2**i for i in range(15)], device, memory_fraction=0.9)
    largest = f"largest batch of 512-token texts that ran: {fits[-1] if fits else 'none'} ({why or 'all ran'})"
    print(largest)

    decoder = ctx.load(DECODER_ROLE)
    prompt = decoder.tokenizer(DECODER_PROMPT, return_tensors="pt").to(device)
    kv_rows = []
    for new_tokens in (16, 64, 256):
        with memory.CudaPeak(device) as peak, torch.inference_mode():
            decoder.model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        kv_rows.append({"new_tokens": new_tokens, "peak_above_weights_mib": peak.delta_bytes / MIB})
    per_token = (kv_rows[-1]["peak_above_weights_mib"] - kv_rows[0]["peak_above_weights_mib"]) * MIB / 240
    formula = memory.kv_cache_bytes_per_token(decoder.model.config, next(decoder.model.parameters()).dtype)
    kv_line = (f"KV cache: {per_token / 1024:.1f} KiB more per generated token measured, {formula / 1024:.1f} KiB "
               "by 2 x layers x KV heads x head_dim x bytes")
    print_table(kv_rows, title=f"{decoder.info.label} generating on {device}, batch 1")
    print(kv_line)

    host = torch.randn(64 * MIB // 4)  # 64 MiB of fp32
    pinned = host.pin_memory()  # page-locked: the GPU's DMA engine reads it directly, without a staging copy
    copies = {"pageable .to(device)": lambda: host.to(device), "pinned .to(device)": lambda: pinned.to(device),
              "pinned, non_blocking=True": lambda: pinned.to(device, non_blocking=True)}
    copy_rows = [{"copy": name, "host_ms": host_ms, "gpu_ms": gpu_ms, "gb_per_s": host.nbytes / gpu_ms / 1e6}
                 for name, (host_ms, gpu_ms) in ((name, devices.event_ms(device, fn)) for name, fn in copies.items())]
    encoder_host, encoder_gpu = devices.event_ms(device, forward(model, sentence_batch(tokenizer, 1, device)))
    copy_rows.append({"copy": "encoder forward, batch 1 (not a copy)", "host_ms": encoder_host, "gpu_ms": encoder_gpu,
                      "gb_per_s": None})
    print_table(copy_rows, title="host latency (until the call returns) beside GPU time (CUDA events): "
                "non_blocking returns before the copy ends, so the host can prepare the next batch meanwhile")

    problem, graphs = devices.compile_problem(device), {}
    try:
        if problem:
            raise RuntimeError(problem)
        compiled = torch.compile(model, mode="reduce-overhead")  # CUDA graphs: one launch replays every kernel
        for size in (1, 8):  # small batches, where launching kernels one by one costs more than running them
            small = sentence_batch(tokenizer, size, device)
            comparison = ctx.meter().compare({"eager": forward(model, small), "reduce-overhead": forward(compiled,
                                              small)}, items=size, min_rounds=s.rounds, progress="CUDA graphs")
            graphs[size] = comparison.sentence("reduce-overhead", "eager")
            print(f"  batch {size}: {graphs[size]}")
    except Exception as error:  # a broken toolchain shows up only when inductor builds its first kernel
        ctx.report.skip(f"GPU memory: {GPU_MEMORY_PARTS[-1]}", problem or first_line(error))
    del model
    memory.cleanup()
    rows = precision_rows + allocator + kv_rows + copy_rows
    ctx.report.add_rows("gpu memory", rows)
    return {"precision": precision_rows, "allocator": allocator, "largest_batch": largest, "kv_cache": kv_rows,
            "kv_line": kv_line, "copies": copy_rows, "cuda_graphs": graphs}


# ------------------------------------------------------------------------------------------- bars


def bars_section(ctx: cli.Context, results: dict[str, Any]) -> dict:
    """What this lesson set out to show, target vs measured; a bar whose section did not run says so."""
    bars = collect_bars(results, BAR_NAMES)
    for bar in bars:
        say(bar_line(bar))
    return {"bars": bars, "pass": sum(b["status"] == "PASS" for b in bars),
            "miss": sum(b["status"] == "MISS" for b in bars)}


# ------------------------------------------------------------------------------------------- charts


def threads_chart(rows: list[dict], out_dir: Any) -> Any:
    """Speed-up over 1 thread by thread count, one line per batch size, with the paired-ratio intervals."""
    batched = max((r for r in rows if r["batch"] > 1), key=lambda r: r["speedup"])
    fig, ax = plots.figure(f"Threads: {batched['threads']} is fastest for batch {batched['batch']} "
                           f"({batched['speedup']:.2f}x vs 1 thread)", "torch threads", "speed-up vs 1 thread (x)")
    ax.axvline(os.cpu_count() or 1, color="grey", linestyle=":", label="logical cores")
    plots.lines_by(ax, rows, "threads", "speedup", lambda r: f"batch {r['batch']}", ("speedup_low", "speedup_high"),
                   "bars: the ratio's interval")
    return plots.save(fig, out_dir, "threads")


def precision_chart(rows: list[dict], out_dir: Any) -> Any:
    """Throughput per precision variant, annotated with speed-up and worst cosine; titled with the fastest one."""
    others = [r for r in rows if r["verdict"] != "baseline"]
    if not others:  # fp32 alone: one bar says nothing (the table has its number)
        return None
    best = max(others, key=lambda r: r["speedup"])
    fig, ax = plots.figure(f"{best['variant']}: {best['speedup']:.2f}x fp32 at worst cosine {best['cosine_min']:.4f}"
                           if best["verdict"] == "faster" else f"No lower precision is measurably faster than fp32 "
                           f"here (best: {best['variant']}, {best['speedup']:.2f}x)", "variant", "throughput (texts/s)")
    plots.annotated_bars(ax, [r["variant"] for r in rows], [r["items_per_s"] for r in rows],
                         [f"{r['speedup']:.2f}x ({r['verdict']})\ncos {r['cosine_min']:.4f}" for r in rows])
    return plots.save(fig, out_dir, "precision")


def quantization_chart(encoder_rows: list[dict], decoder_rows: list[dict], out_dir: Any) -> Any:
    """One column per model: speed-up over fp32 with the ratio's interval, then fidelity (the encoder's cosine mean
    and min coloured pass/fail against the bar; the decoder's tokens before the first divergence); titled with the
    encoder's verdict."""
    winners = [r for r in encoder_rows if r["key"] != "fp32" and keeps_fidelity(r) and r["verdict"] == "faster"]
    best = max(winners, key=lambda r: r["speedup"], default=None)
    fig, axes = plots.plt.subplots(2, 2, figsize=(12, 7.5), squeeze=False)
    fig.suptitle(f"Encoder: {best['variant']} is {best['speedup']:.2f}x fp32 and keeps {FIDELITY_TEXT}" if best else
                 f"Encoder: no quantised variant is measurably faster than fp32 at {FIDELITY_TEXT}",
                 fontweight="bold")
    for column, rows in enumerate((encoder_rows, decoder_rows)):
        speed, fidelity = axes[0][column], axes[1][column]
        if not rows:
            speed.set_axis_off(), fidelity.set_axis_off()
            continue
        labels = ["\n".join(textwrap.wrap(r["variant"], 16)) + f"\n{r['size_pct']:.0f}% size" for r in rows]
        plots.ratio_bars(speed, labels, rows)
        speed.set_title(f"{rows[0]['model']}: speed-up vs fp32 (bars: the ratio's interval)", fontsize=10)
        speed.set_ylabel("x fp32")
        speed.tick_params(axis="x", labelsize=7)
        if "cosine_mean" in rows[0]:
            plots.pass_fail_pairs(fidelity, [r["cosine_mean"] for r in rows], [r["cosine_min"] for r in rows],
                                  [keeps_fidelity(r) for r in rows], FIDELITY_BAR)
            fidelity.set_title("cosine vs fp32 (dark: mean, light: worst text; lines: the bar)\n"
                               "green: passes the bar, red: fails it", fontsize=10)
            fidelity.set_ylabel("cosine")
        else:
            fidelity.bar(range(len(rows)), [r["tokens_before_divergence"] for r in rows], 0.5, color="tab:purple")
            fidelity.set_title("greedy tokens identical to fp32's before the first divergence", fontsize=10)
            fidelity.set(ylabel="tokens", ylim=(0, None))
        fidelity.set_xticks(range(len(rows)), labels, fontsize=7)
    return plots.save(fig, out_dir, "quantization")


def batching_chart(rows: list[dict], bar: dict, out_dir: Any) -> Any:
    """Texts/s by batch size for each padding strategy (the waste is in the table: it is the same for every one)."""
    settled = ("" if bar["status"] in ("PASS", "MISS") else
               f", {bar['status'].lower()} [{bar['low']:.2f}-{bar['high']:.2f}]")  # the bar's word when unsettled
    fig, ax = plots.figure(f"Sorted dynamic padding: {bar['value']:.1f}x the texts/s of pad-to-max (each at its best"
                           f"{settled})", "batch size (texts)", "throughput (texts/s)")
    # sorting a batch of one text changes nothing, so the sorted line starts from the dynamic batch-1 point
    one_text = [{**r, "strategy": "dynamic + sorted"} for r in rows if (r["strategy"], r["batch"]) == ("dynamic", 1)]
    order = list(dict.fromkeys(r["strategy"] for r in rows))
    points = sorted(rows + one_text, key=lambda r: (order.index(r["strategy"]), r["batch"]))
    plots.lines_by(ax, points, "batch", "items_per_s", lambda r: r["strategy"])
    return plots.save(fig, out_dir, "batching")


def memory_chart(loads: list[dict], offload: list[dict], out_dir: Any) -> Any:
    """One horizontal bar per load and offload technique, one quantity: MiB resident above the start after the first
    forward (the streamed lists' peaks are a different quantity: their table has them)."""
    bars = [(f"load: {r['technique']}", r["after_first_forward_mib"]) for r in loads]
    bars += [(f"offload: {'cap ' + OFFLOAD_CAP if 'max_memory' in r['technique'] else 'none'}",
              r["after_first_forward_mib"]) for r in offload]
    leanest, heaviest = min(bars, key=lambda bar: bar[1]), max(bars, key=lambda bar: bar[1])
    fig, ax = plots.figure(f"Resident after the first forward: {leanest[1]:.0f} MiB ({leanest[0]}) to "
                           f"{heaviest[1]:.0f} MiB ({heaviest[0]})", "MiB above the start, after the first forward",
                           "", size=(8, 5.2))
    ax.bar_label(ax.barh(*zip(*bars[::-1]), color="tab:purple"), fmt="%.0f", fontsize=8)
    return plots.save(fig, out_dir, "memory")


def roofline_chart(points: list[dict], peak_flops: float, bandwidth: float, out_dir: Any) -> Any:
    """Useful FLOP/s against arithmetic intensity, under this run's matmul roof and memory-bandwidth roof."""
    ridge, first = peak_flops / bandwidth, next(p for p in points if p["label"] == "batch 1")
    roof_there = min(peak_flops, bandwidth * first["intensity"])
    if first["intensity"] < ridge / 1.5:
        title = (f"Batch 1 sits under the memory roof: at {first['intensity']:.0f} FLOP/byte it can reach at most\n"
                 f"{roof_there / 1e9:.0f} of {peak_flops / 1e9:.0f} GFLOP/s; batches reuse each weight they read")
    elif first["intensity"] <= ridge * 1.5:  # within 1.5x of the ridge neither roof alone explains it
        title = (f"Batch 1 ({first['intensity']:.0f} FLOP/byte) sits at the ridge ({ridge:.0f}): memory and compute "
                 "both bound it;\nthe gap below the roof is per-call overhead that batches spread out")
    else:
        title = (f"Batch 1 ({first['intensity']:.0f} FLOP/byte) is past the ridge ({ridge:.0f}):\nits slowness is "
                 "per-call overhead, not memory traffic")
    fig, ax = plots.figure(title, "arithmetic intensity (useful FLOPs per byte moved: weights + activations)",
                           "useful GFLOP/s", size=(8, 6))
    plots.roofline(ax, points, peak_flops, bandwidth, f"roofs: {bandwidth / 1e9:.1f} GB/s memory copy (calibration), "
                   f"{peak_flops / 1e9:.1f} GFLOP/s matmul (best-of)")
    return plots.save(fig, out_dir, "roofline")


# ------------------------------------------------------------------------------------------- main

# --only name -> (title, section). Each section takes the context, the settings and the results so far; its
# docstring is the why.
SECTIONS: dict[str, tuple[str, Callable[[cli.Context, Settings, dict[str, Any]], dict]]] = {
    "device": ("1. Device selection", device_section),
    "threads": ("2. CPU threads", threads_section),
    "grad": ("3. Gradients off", grad_section),
    "precision": ("4. Precision", precision_section),
    "quantization": ("5. Quantization", quantization_section),
    "batching": ("6. Batching and padding", batching_section),
    "attention": ("7. Attention implementation and compilation", attention_section),
    "memory": ("8. Memory-lean inference", memory_section),
    "peers": ("9. What else you could use", peers_section),
    "recipe": ("10. Recipe for this machine", recipe_section),
    "gpu-memory": ("11. GPU memory", gpu_memory_section),
}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    cli.add_only_option(parser, SECTIONS)
    cli.add_text_options(parser)  # the recipe is chosen on the learner's own texts when given
    args = parser.parse_args(argv)
    cli.read_user_texts(args)  # an unreadable --text-file is refused here, before any work
    ctx = cli.start(__file__, args)
    results = cli.run_sections(ctx, SECTIONS, ctx.pick(FULL, QUICK), only=args.only, results={})
    ctx.report.run_section("Performance bars", bars_section.__doc__, bars_section, ctx, results)
    memory.cleanup()
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
