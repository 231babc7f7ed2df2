#!/usr/bin/env python3
"""02 · GPT vs BERT vs T5: decoder-only, encoder-only and encoder-decoder Transformers, measured side by side.

Each architecture is loaded with the Auto class it needs and its facts are read from the model itself (attention
masking is probed, parameters are counted); each model answers one input through a one-line pipeline; then forward
latency, generation with and without the KV cache, and memory are measured on this machine, one model at a time.
"""
from __future__ import annotations

import inspect
import textwrap
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import common  # noqa: F401  (first: it quiets torchao's import-time warnings; see common/__init__.py)
import torch
from matplotlib.patches import Patch
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM,
                          AutoTokenizer, pipeline)

from common import cli, memory, models, plots, texts
from common import pipelines as custom_pipelines  # registers the "text-to-text" pipeline
from common.device import timed_once
from common.errors import UserError
from common.memory import MIB
from common.meter import VERDICT_WORDS, GenerationMeasurement, verdict_of
from common.report import print_table, ratio_cell, say


@dataclass(frozen=True)
class Settings:
    """What one run measures; FULL and QUICK side by side."""

    seq_lengths: tuple[int, ...]  # forward passes: random token ids of exactly these lengths
    batch_sizes: tuple[int, ...]
    prompt_tokens: int  # generation prompt: long enough that re-running it without the KV cache costs something
    new_tokens: int  # greedy tokens per generate() call
    pipeline_new_tokens: int
    budget_s: float  # per forward cell, after the warm-up and the meter's minimum runs
    warmup: int = 1  # the first call pays the one-time costs (allocator growth, lazy init); more only costs time
    # a batch > 1 cell predicted (scaled from a measured one) above this is skipped: BERT-base at 8 x 512 takes 10-20 s
    max_call_s: float = 2.5


FULL = Settings(seq_lengths=(32, 128, 512), batch_sizes=(1, 8), prompt_tokens=256, new_tokens=16,
                pipeline_new_tokens=20, budget_s=0.5)
QUICK = Settings(seq_lengths=(32, 128), batch_sizes=(1,), prompt_tokens=32, new_tokens=4,
                 pipeline_new_tokens=8, budget_s=0.1)
SAME_LENGTH = 128  # the forward length at which every model is timed in turns against the others (both settings)
HUB_MODELS = ["gpt2", "bert-base-uncased", "t5-small"]
OFFLINE_MODELS = ["decoder", "encoder", *HUB_MODELS]  # real bundled weights first, then the exact-size twins
PROMPT = "The best way to learn a new language is"
TEXT_TO_TEXT_INPUT = "translate English to German: The house is wonderful."
FILL_MASK_TEXT = "The capital of France is {mask}."
PROBE_TEXT = "Attention decides which other words each word is allowed to see"
CAUSAL_TOLERANCE = 1e-5  # relative change of earlier positions' hidden states below which they did not see the edit
TWIN_NOTE = "(twin: its text is noise, not shown)"
FAMILIES = {"decoder": "decoder-only", "encoder": "encoder-only", "seq2seq": "encoder-decoder"}
COLOURS = {"decoder-only": "tab:blue", "encoder-only": "tab:orange", "encoder-decoder": "tab:green"}
# The course notes' table, translated; the sentence under it says which of its claims this run can check.
SEED_TABLE = [dict(zip(("model", "architecture", "strengths", "typical uses"), row)) for row in (
    ("GPT", "decoder-only", "long text generation", "creative writing, conversational AI"),
    ("BERT", "encoder-only", "bidirectional understanding", "classification, NER, QA"),
    ("T5", "encoder-decoder", "text-to-text approach", "translation, summarisation"))]
NOTES_CHECKED = ("Checked here: the architecture, and the mechanics behind each strength and use (sections 1-3). "
                 "Not checked: how GOOD a model is at those uses; that is trained quality, not timing.")


# ------------------------------------------------------------------------------------ which models, how loaded


@dataclass(frozen=True)
class Contender:
    """One model in the comparison: where its weights are, and its checkpoint's config."""

    where: models.Checkpoint
    config: Any
    label = property(lambda self: self.where.label)
    kind = property(lambda self: self.where.kind)
    family = property(lambda self: FAMILIES[self.where.kind])
    # (layers, hidden size): an encoder and a decoder alike in both differ in architecture only
    shape = property(lambda self: (self.config.num_hidden_layers, self.config.hidden_size))
    # the classes the checkpoint was saved as tell whether it has a masked-LM head (BERT's pre-training class has one)
    masked_lm = property(lambda self: any(a.endswith(("ForMaskedLM", "ForPreTraining"))
                                          for a in self.config.architectures or ()))


def plan_models(source: str, values: list[str] | None) -> list[Contender]:
    """--models, space- or comma-separated, resolved before any work (a bad name stops the run); by default the real
    gpt2 / bert-base-uncased / t5-small online, offline the bundled real models plus the three twins."""
    names = [name.strip() for value in values or [] for name in value.split(",") if name.strip()] or (
        HUB_MODELS if all(models.use_hub(models.CATALOG[hub].hub_id, source) for hub in HUB_MODELS) else OFFLINE_MODELS)
    contenders: dict[str, Contender] = {}
    for name in names:
        kind = models.kind_of(name, source)
        if kind not in FAMILIES:
            raise UserError(f"{name} is a {kind}, not a language model to compare here; {models.available_names()}")
        where = models.checkpoint(name, source, kind)
        contenders.setdefault(where.label, Contender(where, AutoConfig.from_pretrained(where.path)))
    return list(contenders.values())


def introduce(contenders: list[Contender]) -> str:
    """Which models are real and which are twins, said before anything uses the word."""
    real = [c.label for c in contenders if c.where.meaningful]
    twins = [c.label for c in contenders if not c.where.meaningful]
    text = f"Real (trained) models: {', '.join(real)}. Only a real model's outputs mean anything." if real else ""
    if twins:
        text += (f"\nTwins: {', '.join(twins)}: the real model's exact config with random weights (same speed "
                 "and memory per token); their outputs are noise, never shown; their tokenizer is borrowed.")
    return text.strip()


def load_by_architecture(ctx: cli.Context, contender: Contender, masked_lm: bool = False, fresh: bool = False,
                         quiet: bool = False) -> models.LoadedModel:
    """Each architecture needs the Auto class that puts its own head on the Transformer; the tokenizer comes alongside.

    The catalog only says WHERE the weights are (Hub, bundled or twin); `ctx.record` prints the provenance line.
    A model is loaded once per run and reused by later sections; `fresh` loads it again (memory measures a load)."""
    where = replace(contender.where, kind="masked-lm") if masked_lm else contender.where
    if not fresh:
        return ctx.once(("architecture", where.path, where.kind),
                        lambda: load_by_architecture(ctx, contender, masked_lm, fresh=True))
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    if where.kind == "decoder":  # decoder-only: a causal LM head predicts the next token
        model = AutoModelForCausalLM.from_pretrained(where.path, dtype=torch.float32, device_map=ctx.device)
        if tokenizer.pad_token is None:  # decoders ship without a pad token; generate() and batching need one
            tokenizer.pad_token = tokenizer.eos_token
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    elif where.kind == "seq2seq":  # encoder-decoder: the encoder reads the input, a decoder with an LM head writes
        model = AutoModelForSeq2SeqLM.from_pretrained(where.path, dtype=torch.float32, device_map=ctx.device)
    elif where.kind == "masked-lm":  # encoder-only with its masked-LM head: predicts a blanked-out token
        model = AutoModelForMaskedLM.from_pretrained(where.path, dtype=torch.float32, device_map=ctx.device)
    else:  # encoder-only, bare: one vector per token, no head
        model = AutoModel.from_pretrained(where.path, dtype=torch.float32, device_map=ctx.device)
    info = ctx.record(where.info(model, time.perf_counter() - started, verbose=not quiet))
    return models.LoadedModel(model, tokenizer, info)


def for_each_model(ctx: cli.Context, contenders: list[Contender], what: str, work: Callable[..., Any]) -> list[Any]:
    """work(ctx, contender) one model at a time; one that fails is skipped with its reason."""
    results = []
    for contender in contenders:
        result = ctx.report.attempt(f"{what}: {contender.label}", lambda: work(ctx, contender))
        memory.cleanup()  # what work built for itself (and a failure's traceback) is gone by now
        if result is not None:
            results.append(result)
    return results


# ------------------------------------------------------------------------------------------- 1. architectures


def architectures_section(ctx: cli.Context, contenders: list[Contender]) -> dict:
    """The course notes' table below says GPT is decoder-only, BERT encoder-only, T5 encoder-decoder. Here each
    model shows it: the class its Auto class built, a masking experiment, and where its parameters sit."""
    print_table(SEED_TABLE, title="What the course notes say:")
    say(NOTES_CHECKED)
    facts = for_each_model(ctx, contenders, "architecture facts", architecture_facts)
    print_table(facts, ["model", "class", "layers", "hidden", "heads", "kv_heads", "vocab"],
                title="Read from each model (kv_heads < heads: grouped-query attention, query heads share K/V):")
    say(f"\nMasking probe: change only the last of {len(PROBE_TEXT.split())} words; if the earlier words' final "
        f"hidden states move less than {CAUSAL_TOLERANCE:g} (relative change), they cannot see later words: causal.")
    print_table(facts, ["model", "masking", "change", "params", "embedding_pct", "disk_mib"])
    if facts:
        parameters_chart(ctx, facts)
    return {"notes_table": SEED_TABLE, "notes_checked": NOTES_CHECKED, "facts": facts}


def architecture_facts(ctx: cli.Context, contender: Contender) -> dict:
    """One row of facts read from the loaded model: structure, masking probe, parameter split, sizes."""
    loaded = load_by_architecture(ctx, contender)
    model, config = loaded.model, loaded.model.config
    embeddings, rest = models.parameter_split(model)
    params = embeddings + rest
    masking, changes = attention_masking(loaded, contender.kind)
    disk = models.weights_on_disk_bytes(model.name_or_path)
    return {
        "model": contender.label, "architecture": contender.family, "class": type(model).__name__,
        "layers": models.layer_count(config), "hidden": config.hidden_size, "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "vocab": config.vocab_size, "max_positions": models.max_positions(config), "masking": masking,
        "change": " / ".join(f"{change:.2g}" for change in changes.values()),
        "earlier_change": changes.get("model", changes.get("encoder")),
        "decoder_earlier_change": changes.get("decoder"),
        "params": params, "embedding_params": embeddings, "other_params": rest,
        "embedding_pct": 100.0 * embeddings / params, "weights_mib": memory.weights_bytes(model) / MIB,
        "fp32_mib": params * 4 / MIB, "fp16_mib": params * 2 / MIB, "int8_mib": params / MIB,
        "disk_mib": disk / MIB if disk else None,
    }


def attention_masking(loaded: models.LoadedModel, kind: str) -> tuple[str, dict[str, float]]:
    """Show causal vs bidirectional attention by experiment: can earlier tokens see a change to a later one?"""
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    if kind == "seq2seq":
        start = torch.full((1, 1), model.config.decoder_start_token_id, device=model.device)
        changes = {
            "encoder": last_token_probe(lambda x: model.get_encoder()(input_ids=x).last_hidden_state, ids),
            "decoder": last_token_probe(lambda x: model(input_ids=ids, decoder_input_ids=x, output_hidden_states=True,
                                                        use_cache=False).decoder_hidden_states[-1],
                                        torch.cat([start, ids], dim=1)),
        }
    elif kind == "decoder":
        changes = {"model": last_token_probe(
            lambda x: model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states[-1], ids)}
    else:
        changes = {"model": last_token_probe(lambda x: model(input_ids=x).last_hidden_state, ids)}
    verdicts = {part: "causal" if change < CAUSAL_TOLERANCE else "bidirectional" for part, change in changes.items()}
    if kind == "seq2seq":
        return f"encoder {verdicts['encoder']}, decoder {verdicts['decoder']}", changes
    return verdicts["model"], changes


def last_token_probe(hidden: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> float:
    """Edit only the last token and return how much the earlier positions' final hidden states moved (relative)."""
    edited = ids.clone()
    edited[0, -1] = ids[0, 0] if ids[0, 0] != ids[0, -1] else ids[0, 1]
    with torch.inference_mode():
        original, changed = hidden(ids), hidden(edited)
    earlier_change = (original[:, :-1] - changed[:, :-1]).abs().max().item()
    return earlier_change / max(original[:, :-1].abs().max().item(), 1e-12)


# ------------------------------------------------------------------------------------- 2. one-line pipelines


def pipelines_section(ctx: cli.Context, contenders: list[Contender]) -> list[dict]:
    """Each architecture's natural pipeline: an encoder turns text into vectors (or fills a blank), a decoder
    continues a prompt, an encoder-decoder rewrites text into new text."""
    say(f"Inputs: {PROMPT!r} (text-generation, feature-extraction), {TEXT_TO_TEXT_INPUT!r} (text-to-text), "
        f"{FILL_MASK_TEXT.format(mask='[MASK]')!r} (fill-mask); tokens = how many each model's tokenizer made.")
    rows = for_each_model(ctx, contenders, "pipeline", pipeline_demo)
    for contender in (c for c in contenders if c.kind == "encoder" and not c.masked_lm):
        ctx.report.skip(f"fill-mask: {contender.label}", "no masked-LM head (saved as "
                        f"{', '.join(contender.config.architectures or ()) or 'a bare encoder'})")
    fill_mask = [c for c in contenders if c.kind == "encoder" and c.masked_lm]
    return rows + for_each_model(ctx, fill_mask, "fill-mask", lambda ctx, c: pipeline_demo(ctx, c, fill_mask=True))


def pipeline_demo(ctx: cli.Context, contender: Contender, fill_mask: bool = False) -> dict:
    """The one line each architecture is made for: features (encoder), continuation (decoder), text-to-text; and
    an encoder with its masked-LM head filling a blank from the words on BOTH sides of it."""
    loaded = load_by_architecture(ctx, contender, masked_lm=fill_mask)
    model, tokenizer = loaded.model, loaded.tokenizer
    new_tokens = ctx.pick(FULL, QUICK).pipeline_new_tokens
    if fill_mask:
        task, given = "fill-mask", FILL_MASK_TEXT.format(mask=tokenizer.mask_token)
        guesses = pipeline(task, model=model, tokenizer=tokenizer, device=model.device)(given, top_k=3)
        output = ", ".join(f"{guess['token_str']} ({guess['score']:.2f})" for guess in guesses)
    elif contender.kind == "encoder":
        task, given = "feature-extraction", PROMPT
        features = pipeline(task, model=model, tokenizer=tokenizer, device=model.device)(given, return_tensors=True)
        output = f"one {features.shape[-1]}-number vector per token, shape {tuple(features.shape)}"
    elif contender.kind == "decoder":
        task, given = "text-generation", PROMPT
        generator = pipeline(task, model=model, tokenizer=tokenizer, device=model.device)
        output = generator(given, max_new_tokens=new_tokens, do_sample=False,
                           return_full_text=False)[0]["generated_text"].strip()
    else:
        task, given = custom_pipelines.TEXT_TO_TEXT, TEXT_TO_TEXT_INPUT
        text_to_text = pipeline(task, model=model, tokenizer=tokenizer, device=model.device)
        output = text_to_text(given, max_new_tokens=new_tokens, do_sample=False)["generated_text"]
    if not contender.where.meaningful and task != "feature-extraction":  # a twin's words are noise, its shapes real
        output = TWIN_NOTE
    tokens = texts.count_tokens(tokenizer, [given])  # how many tokens this model's tokenizer made of the input
    print(f"{contender.label:<24} {task:<18} {tokens:>2} tokens -> " + textwrap.shorten(output, 62, placeholder="..."))
    return {"model": contender.label, "architecture": contender.family, "pipeline": task, "input": given,
            "input_tokens": tokens, "output": output, "meaningful": contender.where.meaningful}


# ------------------------------------------------------------------------------------------------ 3. speed


def speed_section(ctx: cli.Context, contenders: list[Contender]) -> dict:
    """Forward cost grows with sequence length and batch; generation pays once for the prompt, then per new token,
    and the KV cache decides how much. Random token ids of exact lengths: time depends on the shape, not the words."""
    s = ctx.pick(FULL, QUICK)
    loaded = dict(for_each_model(ctx, contenders, "speed", lambda ctx, c: (c.label, load_by_architecture(ctx, c))))
    ready = [c for c in contenders if c.label in loaded]
    if not ready:
        return {}
    same_length, same_shape = forward_in_turns(ctx, ready, loaded)
    forward = [row for c in ready for row in forward_grid(ctx, c, loaded[c.label], same_length)]
    pivot: dict[tuple, dict] = {}
    for row in forward:
        cell = pivot.setdefault((row["model"], row["batch"]), {"model": row["model"], "batch": row["batch"]})
        cell[f"L{row['seq_len']}"] = row["tokens_per_s"] / 1e3
    print_table(list(pivot.values()), ["model", "batch", *[f"L{n}" for n in s.seq_lengths]],
                title=f"Forward throughput, thousand tokens/s by sequence length L (batch 1 x L{SAME_LENGTH}: above):")
    if any(key.startswith("forward ") for key in ctx.report.skipped):  # each cell and its reason: report.md
        say(f"'-' or no row: skipped, past the model's positions or predicted above {s.max_call_s:g} s a call.")
    ctx.report.add_rows("forward grid", forward)
    latency_chart(ctx, forward)
    generators = [c for c in ready if c.kind != "encoder"]
    if encoders := tuple(c.label for c in ready if c.kind == "encoder"):
        ctx.report.skip_parts("generation", encoders, "encoder-only, no LM head")
    if generators:
        say(f"\nGeneration: {s.prompt_tokens} prompt tokens, then {s.new_tokens} greedy ones. Prefill = the forward "
            "over the prompt; ttft (time to first token) = the `first token` row. items/s = new tokens/s end to end; "
            "decode_tok_s = (N - 1) / (t(N) - t(1)) per round; per_token = the KV cache's speedup on it.")
    generation = for_each_model(ctx, generators, "generation", generation_speed)
    if generation:
        say("End to end counts the first token, decode does not, so decode_tok_s is above items/s exactly when a "
            "later token costs less than the first; with the cache on, the first one carries the whole prefill.")
        print_table(generation, ["model", "kv_bytes_per_token", "formula_bytes", "layers", "kv_heads", "heads",
                                 "head_dim", "dtype_bytes"],
                    title="KV cache per token: measured in output.cache vs layers x 2 x kv_heads x head_dim x bytes")
        say(kv_cache_sentence(generation))
        generation_chart(ctx, generation)
    return {"settings": s, "forward": forward, "same_shape": same_shape, "generation": generation}


def forward_in_turns(ctx: cli.Context, ready: list[Contender], loaded: dict) -> tuple[Any, dict | None]:
    """Every model's batch-1 forward at SAME_LENGTH tokens, timed in the same rounds; the baseline is the decoder
    of an encoder/decoder pair with the same depth and width, where one exists (that row is architecture alone)."""
    calls = {}
    for c in ready:
        inputs = forward_inputs(loaded[c.label], c.kind, 1, SAME_LENGTH, ctx.args.seed)
        calls[c.label] = lambda model=loaded[c.label].model, inputs=inputs: model(**inputs)
    pairs = [(e, d) for e in ready if e.kind == "encoder" for d in ready if d.kind == "decoder" and d.shape == e.shape]
    baseline = pairs[0][1].label if pairs else ready[0].label
    with torch.inference_mode():  # no autograd bookkeeping: what inference should cost
        comparison = ctx.meter(warmup=ctx.pick(FULL, QUICK).warmup).compare(calls, tokens=SAME_LENGTH,
                                                                            progress="forward in turns")
    ctx.show(comparison, baseline, f"Forward, batch 1 x {SAME_LENGTH} tokens, all models in the same rounds",
             extra={c.label: {"architecture": c.family} for c in ready}, columns=("architecture",))
    if not pairs:
        say("Model size confounds architecture here: no two models share depth and width, so no row separates them.")
        return comparison, None
    encoder, decoder = pairs[0]
    say(f"Model size confounds architecture: the models differ in depth, width and parameters too. Only {encoder.label}"
        f" vs {decoder.label} (both {encoder.shape[0]} layers x {encoder.shape[1]}) is architecture alone.")
    return comparison, {"encoder": encoder.label, "decoder": decoder.label, "layers": encoder.shape[0],
                        "hidden": encoder.shape[1], "seq_len": SAME_LENGTH,
                        **comparison.verdict_row(encoder.label, decoder.label)}


def forward_inputs(loaded: models.LoadedModel, kind: str, batch: int, length: int, seed: int) -> dict:
    """Random token ids of an exact shape plus what each family needs to do the work before its first output: the
    encoder encodes everything; the decoder runs its prompt and computes logits for the last position only (as
    generate's prefill does); the encoder-decoder encodes the input and runs one decoder step."""
    model = loaded.model
    vocab = min(model.config.vocab_size, len(loaded.tokenizer))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, length), generator=generator).to(model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.full((batch, 1), model.config.decoder_start_token_id, device=model.device)
    if kind != "encoder":
        inputs["use_cache"] = False
    if kind == "decoder" and "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return inputs


def forward_skip_reason(length: int, batch: int, limit: int | None, measured: tuple[int, float] | None,
                        max_call_s: float) -> str | None:
    """Why a (batch, length) cell cannot or should not run: over the model's positions, or predicted too slow."""
    if limit is not None and length > limit:
        return f"length {length} is above the model's {limit} positions"
    if batch > 1 and measured is not None and measured[1] * batch * length / measured[0] > max_call_s:
        return f"predicted above {max_call_s:g} s a call"  # scaled from the largest cell measured
    return None


def forward_grid(ctx: cli.Context, contender: Contender, loaded: models.LoadedModel, same_length: Any) -> list[dict]:
    """Median forward latency over the batch x length grid, smallest first so the cost of the next cell is known;
    the batch-1 x SAME_LENGTH cell is the round-robin's measurement of this model, not a second one."""
    s = ctx.pick(FULL, QUICK)
    meter = ctx.meter(warmup=s.warmup)
    rows: list[dict] = []
    for batch, length in tqdm([(b, n) for b in s.batch_sizes for n in s.seq_lengths], desc=contender.label,
                              disable=None, leave=False):
        largest = max(((row["batch"] * row["seq_len"], row["p50_ms"] / 1e3) for row in rows), default=None)
        reason = forward_skip_reason(length, batch, models.max_positions(loaded.model.config), largest, s.max_call_s)
        if reason:
            ctx.report.skipped[f"forward {contender.label}: batch {batch} x {length}"] = reason  # said once below
            continue
        labels = {"model": contender.label, "architecture": contender.family, "batch": batch, "seq_len": length}
        if (batch, length) == (1, SAME_LENGTH):
            rows.append(same_length.measurements[contender.label].row(**labels))
            continue
        inputs = forward_inputs(loaded, contender.kind, batch, length, ctx.args.seed)
        with torch.inference_mode():
            rows.append(meter.measure(f"{contender.label} b{batch} L{length}", lambda: loaded.model(**inputs),
                                      items=batch, tokens=batch * length, budget_s=s.budget_s).row(**labels))
    return rows


def generation_speed(ctx: cli.Context, contender: Contender) -> dict:
    """One new token (ttft), and N new tokens with the KV cache on and off, timed in the same rounds."""
    loaded, s = load_by_architecture(ctx, contender), ctx.pick(FULL, QUICK)
    model, n = loaded.model, s.new_tokens
    # A fixed token count, not a fixed text: a twin borrows a tokenizer, and its timing must compare with its real
    # model's. Each sentence is several tokens, so prompt_tokens / 4 sentences are enough text to cut from.
    text = " ".join(texts.repeated_sentences(s.prompt_tokens // 4 + 1))
    ids = loaded.tokenizer(text, add_special_tokens=False, truncation=True, max_length=s.prompt_tokens,
                           return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] != s.prompt_tokens:
        raise RuntimeError(f"the prompt text gave {ids.shape[1]} tokens, fewer than the {s.prompt_tokens} needed")

    def generate(new_tokens: int, use_cache: bool) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache)

    last: dict[str, torch.Tensor] = {}  # the timed calls' own outputs, to check them after timing
    comparison = ctx.meter(warmup=s.warmup).compare(
        {"first token": lambda: generate(1, True), "cache on": lambda: last.update(on=generate(n, True)),
         "cache off": lambda: last.update(off=generate(n, False))},
        items={"first token": 1, "cache on": n, "cache off": n}, progress=f"{contender.label} generate")
    produced = last["on"].shape[1] - (s.prompt_tokens if contender.kind == "decoder" else 1)  # seq2seq: start token
    if produced != n:
        raise RuntimeError(f"generate made {produced} tokens instead of {n}; timings would not compare")
    timed = comparison.measurements
    # both share the first-token workload: for one new token, generate runs the same prefill with or without a cache
    on, off = (GenerationMeasurement(name, n, 1, timed["first token"], timed[name])
               for name in ("cache on", "cache off"))
    decode = {name: 1 / g.per_token_s if g.per_token_s > 0 else None for name, g in (("on", on), ("off", off))}
    per_token = on.decode_speedup(off)
    ctx.show(comparison, "cache off", f"{contender.label}: {n} greedy tokens after a {s.prompt_tokens}-token prompt",
             extra={"cache on": {"decode_tok_s": decode["on"], "per_token": ratio_cell(*per_token) if per_token
                                 else "not measurable"}, "cache off": {"decode_tok_s": decode["off"]}},
             columns=("decode_tok_s", "per_token"), unranked=("first token",))
    written = {"decoder_input_ids": last["on"]} if contender.kind == "seq2seq" else {}  # its decoder's tokens
    with torch.inference_mode():  # the cache itself, after one prefill (and the encoder-decoder's new tokens)
        stored, cached_tokens = kv_cache_bytes(model(input_ids=ids, use_cache=True, **written).cache)
    per_token = per_token or (None, None, None)
    return {"model": contender.label, "architecture": contender.family, "prompt_tokens": s.prompt_tokens,
            "new_tokens": n, "ttft_ms": on.time_to_first_token_s * 1e3, "decode_tokens_per_s": decode["on"],
            "decode_tokens_per_s_cache_off": decode["off"], "e2e_tokens_per_s": timed["cache on"].items_per_s,
            "e2e_tokens_per_s_cache_off": timed["cache off"].items_per_s,
            **comparison.verdict_row("cache on", "cache off"),
            "per_token_speedup": per_token[0], "per_token_low": per_token[1], "per_token_high": per_token[2],
            "per_token_verdict": None if per_token[0] is None else verdict_of(*per_token[1:]),
            "same_greedy_tokens": torch.equal(last["on"], last["off"]), "kv_bytes_per_token": stored // cached_tokens,
            "cached_tokens": cached_tokens, **memory.kv_cache_factors(model.config, model.dtype.itemsize)}


def kv_cache_bytes(cache: Any) -> tuple[int, int]:
    """Bytes of every stored key and value tensor in a cache, and how many tokens it holds.

    An encoder-decoder's cache also holds cross-attention keys of the input, fixed in size; only its decoder's own
    (self-attention) cache grows with each generated token, so that is the part counted."""
    cache = getattr(cache, "self_attention_cache", cache)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), cache.get_seq_length()


def kv_cache_sentence(rows: list[dict]) -> str:
    """Why caching is allowed at all, grouped-query attention where a model has it, and the formula check."""
    text = ("Caching is exact because these decoders are causal (section 1's probe): a token's keys and values never "
            "change once computed.")
    text += "".join(f" {r['model']}: {r['heads']} query heads share {r['kv_heads']} K/V heads, a "
                    f"{r['heads'] // r['kv_heads']}x smaller cache." for r in rows if r["kv_heads"] < r["heads"])
    wrong = [r["model"] for r in rows if r["kv_bytes_per_token"] != r["formula_bytes"]]
    differ = [r["model"] for r in rows if not r["same_greedy_tokens"]]
    text += f" Measured DIFFERS from the formula for {', '.join(wrong)}." if wrong else ""
    return text + (f" Greedy tokens DIFFER with and without the cache for {', '.join(differ)}." if differ else
                   " Greedy tokens: the same with or without it.")


# ----------------------------------------------------------------------------------------------- 4. memory


def memory_section(ctx: cli.Context, contenders: list[Contender]) -> list[dict]:
    """RSS (resident set size) is the memory a process has in RAM. Loading memory-maps the safetensors weights: their
    pages enter RAM only when the first forward reads them, so ttfi (time to first inference: load + first batch-1
    forward) and the RSS after that forward give the real start-up cost. Each model is loaded fresh, alone."""
    ctx.forget_loaded()  # the models kept for sections 1-3 go, so each load below is measured from a lean process
    rows = for_each_model(ctx, contenders, "memory", model_memory)
    columns = ["model", "weights_mib", "load_s", "ttfi_s", "after_load_mib", "resident_mib", "activation_mib",
               "after_free_mib"]  # the activation peak per length: results.csv
    title = "MiB of RSS above the pre-load level (resident: after 1st forward; activation: peak above it)"
    if ctx.device.type == "cuda":  # host RSS there is mostly the CUDA context and libraries, not the weights
        columns = columns[:4] + ["cuda_load_mib", "cuda_fwd_mib", "cuda_left_mib", "cuda_reserved_mib"]
        title = (f"MiB of {ctx.device} memory: the load's peak, a forward's peak above the weights, and what stays "
                 "allocated (left) and reserved after del, gc.collect() and empty_cache()")
    print_table(rows, columns, title=title)
    short = [row["model"] for row in rows if row["resident_mib"] < row["weights_mib"]]
    if short and ctx.device.type == "cpu":
        say(f"{', '.join(short)}: resident below the weights, as mapped pages a forward never read (embedding rows "
            "of unseen tokens) stay on disk.")
    ctx.report.add_rows("memory", rows)
    if rows:
        memory_chart(ctx, rows)
    return rows


def model_memory(ctx: cli.Context, contender: Contender) -> dict:
    """RSS after the load and after the first forward, then each length's activation peak above the now-resident
    weights, then RSS after release."""
    cuda = ctx.device.type == "cuda"
    memory.cleanup()
    before, gpu_before = memory.rss_bytes(), memory.snapshot(ctx.device)
    with memory.PeakRSSSampler() as rss, memory.CudaPeak(ctx.device) as cuda_peak:
        loaded = load_by_architecture(ctx, contender, fresh=True, quiet=True)  # load_s goes in the table
    row = {"model": contender.label, "architecture": contender.family, "rss_before_mib": before / MIB,
           "load_s": loaded.info.load_s, "weights_mib": memory.weights_bytes(loaded.model) / MIB,
           "load_peak_mib": (rss.peak_bytes - before) / MIB, "after_load_mib": (memory.rss_bytes() - before) / MIB,
           "cuda_load_mib": cuda_peak.delta_bytes / MIB if cuda else None}
    limit = models.max_positions(loaded.model.config)
    lengths = [n for n in ctx.pick(FULL, QUICK).seq_lengths if limit is None or n <= limit]
    first = forward_inputs(loaded, contender.kind, 1, lengths[0], ctx.args.seed)
    with torch.inference_mode():
        row["first_forward_s"] = timed_once(lambda model=loaded.model: model(**first), ctx.device)
    row["ttfi_s"] = row["load_s"] + row["first_forward_s"]
    row["resident_mib"] = (memory.rss_bytes() - before) / MIB
    for length in lengths:
        inputs = forward_inputs(loaded, contender.kind, 1, length, ctx.args.seed)
        with memory.PeakRSSSampler() as rss, memory.CudaPeak(ctx.device) as cuda_peak, torch.inference_mode():
            loaded.model(**inputs)
        row[f"activation_mib@{length}"] = rss.peak_delta_bytes / MIB
        row[f"cuda_fwd_mib@{length}"] = cuda_peak.delta_bytes / MIB if cuda else None  # activations, not weights
    row["activation_mib"] = max(row[f"activation_mib@{n}"] for n in lengths)
    row["cuda_fwd_mib"] = max(row[f"cuda_fwd_mib@{n}"] for n in lengths) if cuda else None
    del loaded  # drop the only reference, or cleanup() frees nothing
    released = memory.cleanup()  # gc.collect(), and on CUDA torch.cuda.empty_cache()
    row["after_free_mib"] = (released["rss_after_bytes"] - before) / MIB
    if cuda:
        row["cuda_left_mib"] = (memory.snapshot(ctx.device).cuda_allocated_bytes
                                - gpu_before.cuda_allocated_bytes) / MIB
        row["cuda_reserved_mib"] = released["cuda_reserved_after_bytes"] / MIB
    return row


# ------------------------------------------------------------------------------------- 5. when to use which


def summary_section(contenders: list[Contender], facts: dict | None, speed: dict | None) -> list[str]:
    """What each architecture showed in this run, and the course notes' use it supports."""
    masking = {row["model"]: row["masking"] for row in (facts or {}).get("facts", [])}
    cache: dict[str, dict[str, list[str]]] = {}  # family -> the KV cache's verdict -> models
    for row in (speed or {}).get("generation", []):
        cache.setdefault(row["architecture"], {}).setdefault(VERDICT_WORDS[row["verdict"]], []).append(row["model"])
    uses = {"encoder-only": "one forward sees both sides of each token, no LM head: the notes' classification, NER, QA",
            "decoder-only": "writes one token at a time: the notes' long generation and chat",
            "encoder-decoder": "reads the input once, then writes: the notes' translation and summarisation"}
    found = []
    for family in dict.fromkeys(c.family for c in contenders):
        members = [c.label for c in contenders if c.family == family]
        probes = " / ".join(dict.fromkeys(masking[m] for m in members if m in masking)) or "probe not run"
        kv = "; ".join(f"KV cache {words} for {', '.join(names)}" for words, names in cache.get(family, {}).items())
        found.append(f"{family.capitalize()} ({probes}): {uses[family]}{f'; {kv}' if kv else ''}.")
    pair = (speed or {}).get("same_shape")
    if pair:
        found.append(f"Same depth and width, {pair['encoder']} vs {pair['decoder']}: {VERDICT_WORDS[pair['verdict']]}.")
    for line in found:
        say(f"- {line}")
    return found


# ------------------------------------------------------------------------------------------------- charts


def tick_label(label: str) -> str:
    """A model name broken over lines at spaces and hyphens, so neighbouring x labels never collide."""
    return textwrap.fill(label, 13, break_on_hyphens=True)


def parameters_chart(ctx: cli.Context, facts: list[dict]) -> None:
    """Stacked bars coloured by architecture: the embedding tables (hatched) under everything else."""
    shares = [row["embedding_pct"] for row in facts]
    fig, ax = plots.figure(f"Embedding tables hold {min(shares):.0f}-{max(shares):.0f}% of the parameters", "model",
                           "parameters (millions)")
    labels, colours = [tick_label(row["model"]) for row in facts], [COLOURS[row["architecture"]] for row in facts]
    embeddings = [row["embedding_params"] / 1e6 for row in facts]
    ax.bar(labels, embeddings, color=colours, alpha=0.45, hatch="//", edgecolor="white")
    tops = ax.bar(labels, [row["other_params"] / 1e6 for row in facts], bottom=embeddings, color=colours)
    ax.bar_label(tops, labels=[f"{share:.0f}% emb." for share in shares], fontsize=8)
    ax.set_ylim(0, 1.2 * max(row["params"] / 1e6 for row in facts))
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(handles=[Patch(color=COLOURS[family], label=family) for family in dict.fromkeys(
        row["architecture"] for row in facts)] + [
        Patch(facecolor="grey", alpha=0.45, hatch="//", edgecolor="white", label="embedding tables"),
        Patch(color="grey", label="everything else (attention, MLP, heads)")],
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "params_stacked"))


def latency_chart(ctx: cli.Context, forward: list[dict]) -> None:
    """One line per model and batch size: how cost grows with sequence length (the title: by how much)."""
    batch, lengths = min(row["batch"] for row in forward), sorted({row["seq_len"] for row in forward})
    at = {(row["model"], row["seq_len"]): row["p50_ms"] for row in forward if row["batch"] == batch}
    growth = [at[m, lengths[-1]] / at[m, n] for m, n in at if n == lengths[0] and (m, lengths[-1]) in at]
    title = (f"From {lengths[0]} to {lengths[-1]} tokens, forward latency grows {min(growth):.1f}-{max(growth):.1f}x "
             f"(batch {batch})" if growth else "Forward latency vs sequence length")
    fig, ax = plots.figure(title, "sequence length (tokens)", "median forward latency (ms)")
    plots.lines_by(ax, forward, "seq_len", "p50_ms", lambda row: f"{row['model']}, batch {row['batch']}")
    if max(row["p50_ms"] for row in forward) / min(row["p50_ms"] for row in forward) > 20:
        plots.log_y(ax)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "latency_vs_seq_length"))


def generation_chart(ctx: cli.Context, generation: list[dict]) -> None:
    """Decode-only and end-to-end tokens/s, with and without the KV cache, side by side per model."""
    gains = [row["per_token_speedup"] for row in generation if row["per_token_speedup"] is not None]
    fig, ax = plots.figure((f"Per decoded token, the KV cache gives {min(gains):.1f}-{max(gains):.1f}x the tokens/s"
                            if gains else "Greedy generation speed") + f" ({generation[0]['prompt_tokens']}-token "
                           f"prompt, {generation[0]['new_tokens']} new tokens, batch 1)", "model", "tokens per second")
    plots.grouped_bars(ax, [tick_label(row["model"]) for row in generation], [
        (f"{what}, KV cache {on}", [row[key + suffix] for row in generation])
        for key, what in (("decode_tokens_per_s", "decode only"), ("e2e_tokens_per_s", "end to end"))
        for on, suffix in (("on", ""), ("off", "_cache_off"))], value_format="%.3g")
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "generation_tokens_per_s"))


def memory_chart(ctx: cli.Context, rows: list[dict]) -> None:
    """Per model: RSS after the load, after the first forward, the largest activation peak above that, and what is
    left after release."""
    arrives = all(row["after_load_mib"] < 0.5 * row["weights_mib"] <= row["resident_mib"] for row in rows)
    fig, ax = plots.figure("Most of the weights' RSS arrives at the first forward, not at the load" if arrives
                           else "RSS after each step of a model's life", "model", "MiB of RSS above the pre-load level")
    plots.grouped_bars(ax, [tick_label(row["model"]) for row in rows], [(name, [row[key] for row in rows])
                                                                        for name, key in (
        ("after load", "after_load_mib"), ("after first forward", "resident_mib"),
        ("activation peak above that (batch 1, longest)", "activation_mib"),
        ("after del + cleanup() (after_free)", "after_free_mib"))], value_format="%.0f")
    ax.axhline(0, color="black", linewidth=0.8)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "peak_memory"))


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="roles, catalog names or Hub ids to compare, space- or comma-separated (default: gpt2 "
                             "bert-base-uncased t5-small online; offline also the bundled decoder and encoder)")
    args = parser.parse_args(argv)
    contenders = plan_models(args.source, args.models)  # a bad name stops here, before any output or measurement
    ctx = cli.start(__file__, args)
    say(introduce(contenders))
    run = ctx.report.run_section  # each section's docstring is the why it prints under the title
    facts = run("1. Architectures", architectures_section.__doc__, architectures_section, ctx, contenders)
    run("2. One input, one line each", pipelines_section.__doc__, pipelines_section, ctx, contenders)
    speed = run("3. Speed", speed_section.__doc__, speed_section, ctx, contenders)
    run("4. Memory", memory_section.__doc__, memory_section, ctx, contenders)
    run("5. When to use which", summary_section.__doc__, summary_section, contenders, facts, speed)
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
