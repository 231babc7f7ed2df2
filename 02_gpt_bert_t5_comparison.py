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
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM,
                          AutoTokenizer, pipeline)

from common import cli, memory, models, plots, texts
from common import pipelines as custom_pipelines  # registers the "text-to-text" pipeline
from common.device import timed_once
from common.errors import UserError
from common.memory import MIB
from common.meter import VERDICT_WORDS, GenerationMeasurement, PerformanceMeter, verdict_of
from common.report import format_value, print_table, ratio_cell, say


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
    # A batch > 1 forward whose time per call, scaled from a measured smaller cell, is predicted above this is skipped
    # with the reason: BERT-base at batch 8 x 512 takes 10-20 s a call on 2 CPU cores. Batch 1 always runs.
    max_call_s: float = 2.5


FULL = Settings(seq_lengths=(32, 128, 512), batch_sizes=(1, 8), prompt_tokens=256, new_tokens=16,
                pipeline_new_tokens=20, budget_s=0.5)
QUICK = Settings(seq_lengths=(32, 128), batch_sizes=(1,), prompt_tokens=32, new_tokens=4,
                 pipeline_new_tokens=8, budget_s=0.1)
SUMMARY_LENGTH = 128  # the forward length of the summary and the same-shape comparison (in both settings)
HUB_MODELS = ["gpt2", "bert-base-uncased", "t5-small"]
OFFLINE_MODELS = ["decoder", "encoder", *HUB_MODELS]  # real bundled weights first, then the exact-size twins
PROMPT = "The best way to learn a new language is"
TEXT_TO_TEXT_INPUT = "translate English to German: The house is wonderful."
FILL_MASK_TEXT = "The capital of France is {mask}."
PROBE_TEXT = "Attention decides which other words each word is allowed to see"
CAUSAL_TOLERANCE = 1e-5  # relative change of earlier positions' hidden states below which they did not see the edit
TWIN_NOTE = "(twin: random weights, text is noise; shown only to prove the plumbing)"
FAMILIES = {"decoder": "decoder-only", "encoder": "encoder-only", "seq2seq": "encoder-decoder"}
# The course notes' table, translated; sections 1-5 check it against measured facts.
SEED_TABLE = [dict(zip(("model", "architecture", "strengths", "typical uses"), row)) for row in (
    ("GPT", "decoder-only", "long text generation", "creative writing, conversational AI"),
    ("BERT", "encoder-only", "bidirectional understanding", "classification, NER, QA"),
    ("T5", "encoder-decoder", "text-to-text approach", "translation, summarisation"))]


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


def load_by_architecture(ctx: cli.Context, contender: Contender, masked_lm: bool = False,
                         fresh: bool = False) -> models.LoadedModel:
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
    info = ctx.record(where.info(model, time.perf_counter() - started))
    return models.LoadedModel(model, tokenizer, info)


def for_each_model(ctx: cli.Context, groups: list[Contender] | list[tuple[Contender, ...]], what: str,
                   work: Callable[..., Any]) -> list[Any]:
    """work(ctx, *group) one model (or pair of models) at a time; one that fails is skipped with its reason."""
    results = []
    for group in groups:
        group = group if isinstance(group, tuple) else (group,)
        result = ctx.report.attempt(f"{what}: {' vs '.join(c.label for c in group)}", lambda: work(ctx, *group))
        memory.cleanup()  # what work built for itself (and a failure's traceback) is gone by now
        if result is not None:
            results.append(result)
    return results


# ------------------------------------------------------------------------------------------- 1. architectures


def architectures_section(ctx: cli.Context, contenders: list[Contender]) -> dict:
    """The course notes' table says GPT is decoder-only, BERT encoder-only, T5 encoder-decoder. Here each model
    shows it: its structure, a masking experiment, and where its parameters sit."""
    print_table(SEED_TABLE, title="What the course notes say (claims, checked below):")
    facts = for_each_model(ctx, contenders, "architecture facts", architecture_facts)
    print_table(facts, ["model", "architecture", "class", "layers", "hidden", "heads", "kv_heads", "vocab"],
                title="Read from each model (its masking: the probe below; max positions in results.csv):")
    say("kv_heads: the key/value heads; fewer than heads means grouped-query attention (several query heads share "
        "one key/value head, so the KV cache of generation is smaller).")
    say(f"\nMasking probe: edit only the LAST token of a {len(PROBE_TEXT.split())}-word input and compare the "
          "earlier tokens' final hidden states. Unchanged (relative change < "
          f"{CAUSAL_TOLERANCE:g}) = they cannot see later tokens = causal; changed = bidirectional.")
    print_table(facts, ["model", "earlier_change", "decoder_earlier_change", "masking"])
    print_table(facts, ["model", "params", "embedding_params", "embedding_pct", "fp32_mib", "fp16_mib", "int8_mib",
                        "disk_mib"],
                title="Parameters and size (fp32/fp16/int8 = params x 4/2/1 bytes; disk = weight files loaded; "
                      "the rest in results.csv):")
    if facts:
        parameters_chart(ctx, facts)
    return {"notes_table": SEED_TABLE, "facts": facts}


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
    rows = for_each_model(ctx, contenders, "pipeline", pipeline_demo)
    for contender in (c for c in contenders if c.kind == "encoder" and not c.masked_lm):
        ctx.report.skip(f"fill-mask: {contender.label}", "its checkpoint has no masked-LM head (saved as "
                        f"{', '.join(contender.config.architectures or ()) or 'a bare encoder'}), so it cannot fill "
                        "a [MASK]")
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
    print(f"{contender.label:<32} {task:<18} {given!r} ({tokens} tokens)\n{'':<32} -> "
          + textwrap.shorten(output, 84, placeholder="..."))
    return {"model": contender.label, "architecture": contender.family, "pipeline": task, "input": given,
            "input_tokens": tokens, "output": output, "meaningful": contender.where.meaningful}


# ------------------------------------------------------------------------------------------------ 3. speed


def speed_section(ctx: cli.Context, contenders: list[Contender], facts: dict | None) -> dict:
    """Forward cost grows with sequence length and batch; generation pays per new token, and the KV cache
    decides how much. Every number is a median from this run; every A-vs-B is timed round-robin."""
    s = ctx.pick(FULL, QUICK)
    say(f"Forward: batch {list(s.batch_sizes)} x length {list(s.seq_lengths)} (random token ids). Generation: a "
          f"{s.prompt_tokens}-token prompt (common.texts sentences cut to exactly {s.prompt_tokens} ids by each "
          f"model's own tokenizer), then {s.new_tokens} new greedy tokens. {s.warmup} warm-up call each.")
    pairs = [(encoder, decoder) for encoder in contenders if encoder.kind == "encoder"
             for decoder in contenders if decoder.kind == "decoder" and decoder.shape == encoder.shape]
    same_shape = for_each_model(ctx, pairs, "same shape", same_shape_comparison)
    measured = {label: row for pair in same_shape for label, row in pair.pop("rows").items()}
    results = for_each_model(ctx, contenders, "speed", lambda ctx, c: model_speed(ctx, c, measured.get(c.label)))
    forward = [row for rows, _, _ in results for row in rows]
    generation = [row for _, rows, _ in results for row in rows]
    kv_rows = [kv for _, _, kv in results if kv]
    print_table(forward, ["model", "batch", "seq_len", "p50_ms", "tokens_per_s"],
                title="Forward latency (median per call)" + (
                    f"; the same-shape pair's batch 1 x {SUMMARY_LENGTH} cells come from their round-robin, the "
                    "decoder's as the encoder's median at the paired ratio:" if same_shape else ":"))
    print_table(generation, ["model", "kv_cache", "ttft_ms", "per_token_ms", "decode_tokens_per_s", "e2e_tokens_per_s"],
                title="Generation, three figures: ttft = time to first token (prefill + 1 token); decode = 1 / "
                      "per-token cost, the median over rounds of (t(N) - t(1)) / (N - 1); e2e = N / t(N), prefill "
                      "included:")
    print_table([{"model": row["model"], "end_to_end": ratio_cell(row["speedup"], row["speedup_low"],
                                                                  row["speedup_high"]), "verdict": row["verdict"],
                  "per_decoded_token": "-" if row["per_token_speedup"] is None else
                  ratio_cell(row["per_token_speedup"], row["per_token_low"], row["per_token_high"]),
                  "per_token_verdict": row["per_token_verdict"], "same_greedy_tokens": row["same_greedy_tokens"]}
                 for row in kv_rows],
                title="KV cache on vs off (same run, same prompt, timed round-robin): speedup = whole generate() "
                      "call; per_token = each decoded token after the first:")
    for row in kv_rows:
        say(f"{row['model']}: {row['sentence']}; per decoded token {per_token_text(row)}; greedy tokens "
              f"{'identical' if row['same_greedy_tokens'] else 'DIFFER'} with and without it")
    faster = [row["model"] for row in kv_rows if row["verdict"] == "faster"]
    if faster:  # the mechanism, said only for the models whose verdict shows it
        say(f"Why the cache won for {', '.join(faster)}: without it every step re-runs the whole sequence so far "
              f"(for a decoder-only model, the {s.prompt_tokens}-token prompt too); with it each step runs only the "
              "newest token against the stored keys and values.")
    if kv_rows:
        print_table(kv_rows, ["model", "kv_bytes_per_token", "formula_bytes", "layers", "kv_heads", "heads",
                              "head_dim", "dtype_bytes"],
                    title="KV cache size per token: measured from the cache the model returns (output.cache, "
                          "formerly past_key_values), checked against layers x 2 (K and V) x kv_heads x head_dim "
                          "x bytes:")
        for row in kv_rows:
            print(textwrap.fill(kv_cache_note(row, facts), 118, initial_indent="  ", subsequent_indent="    "))
    for pair in same_shape:
        say(f"\nSame depth and width, different architecture (forward, batch 1 x {SUMMARY_LENGTH} tokens, "
              f"{pair['layers']} layers x {pair['hidden']}): {pair['sentence']}")
    ctx.report.add_rows("forward", forward)
    ctx.report.add_rows("generation", generation)
    if forward:
        latency_chart(ctx, forward)
    if generation:
        generation_chart(ctx, generation, kv_rows)
    return {"settings": s, "forward": forward, "generation": generation, "kv_cache": kv_rows, "same_shape": same_shape}


def per_token_text(row: dict) -> str:
    """The per-decoded-token KV-cache speed-up in words, or why it could not be measured."""
    if row["per_token_speedup"] is None:
        return "not measurable (a round's decode cost was not above its first token's)"
    return (f"{row['per_token_speedup']:.2f}x, {VERDICT_WORDS[row['per_token_verdict']]} (interval "
            f"{row['per_token_low']:.2f}-{row['per_token_high']:.2f})")


def kv_cache_note(row: dict, facts: dict | None) -> str:
    """The measured cache size checked against the formula, tied to grouped-query attention and to the masking probe."""
    fact = next((f for f in (facts or {}).get("facts", []) if f["model"] == row["model"]), {})
    agrees = "= the formula" if row["kv_bytes_per_token"] == row["formula_bytes"] else "DIFFERS from the formula"
    if row["kv_heads"] < row["heads"]:
        heads = (f"grouped-query attention: kv_heads is how many key/value heads the {row['heads']} query heads "
                 f"share ({row['kv_heads']} here), so the cache is {row['heads'] / row['kv_heads']:.0f}x smaller than "
                 "one key/value head per query head would make it")
    else:
        heads = f"kv_heads = heads = {row['heads']}: every query head keeps its own keys and values (no grouping)"
    probe = fact.get("decoder_earlier_change") if fact.get("decoder_earlier_change") is not None else \
        fact.get("earlier_change")
    valid = ("" if probe is None else f"; the cache is valid because section 1's probe found this decoder causal "
             f"(earlier positions moved {probe:.1e} when a later token changed): a token's keys and values never "
             "change once computed, so they can be stored instead of recomputed")
    return (f"{row['model']}: {row['kv_bytes_per_token'] / 1024:.1f} KiB per token {agrees}; {heads}{valid}")


def kv_cache_bytes(cache: Any) -> tuple[int, int]:
    """Bytes of every stored key and value tensor in a cache, and how many tokens it holds.

    An encoder-decoder's cache also holds cross-attention keys of the input, fixed in size; only its decoder's own
    (self-attention) cache grows with each generated token, so that is the part counted."""
    cache = getattr(cache, "self_attention_cache", cache)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), cache.get_seq_length()


def model_speed(ctx: cli.Context, contender: Contender, measured: dict | None) -> tuple[list[dict], list[dict], dict]:
    """Forward grid for every model; generation (KV cache on and off) for the families that can generate."""
    loaded = load_by_architecture(ctx, contender)
    meter = ctx.meter(warmup=ctx.pick(FULL, QUICK).warmup)
    forward = forward_latency(ctx, meter, loaded, contender, measured)
    if contender.kind != "encoder":
        return forward, *generation_speed(meter, loaded, contender, ctx.pick(FULL, QUICK))
    ctx.report.skip(f"generation: {contender.label}", "encoder-only: it has no decoder or LM head, so it cannot "
                    "generate tokens (it encodes its whole input in one forward)")
    return forward, [], {}


def forward_inputs(loaded: models.LoadedModel, kind: str, batch: int, length: int, seed: int) -> dict:
    """Random token ids of an exact shape (latency depends on the shape, not the words) plus what each family needs.

    Every family does the work that precedes its first output: the encoder encodes everything; the decoder runs
    its prompt and computes logits for the last position only (as generate's prefill does); the encoder-decoder
    encodes the input and runs one decoder step."""
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
    if batch > 1 and measured is not None:
        tokens, seconds = measured
        predicted = seconds * batch * length / tokens
        if predicted > max_call_s:
            return (f"predicted {predicted:.1f} s per call (measured {seconds * 1e3:.0f} ms for {tokens} tokens, "
                    f"scaled to {batch * length}) is above the {max_call_s:g} s per-call budget")
    return None


def forward_latency(ctx: cli.Context, meter: PerformanceMeter, loaded: models.LoadedModel, contender: Contender,
                    measured: dict | None) -> list[dict]:
    """Median forward latency over the batch x length grid, smallest first so the cost of the next cell is known.

    `measured` is this model's batch-1 x SUMMARY_LENGTH row when the same-shape comparison already timed it."""
    s = ctx.pick(FULL, QUICK)
    cells = [(batch, length) for batch in s.batch_sizes for length in s.seq_lengths]
    rows: list[dict] = []
    for batch, length in tqdm(cells, desc=contender.label, disable=None, leave=False):
        largest = max(((row["batch"] * row["seq_len"], row["p50_ms"] / 1e3) for row in rows), default=None)
        reason = forward_skip_reason(length, batch, models.max_positions(loaded.model.config), largest, s.max_call_s)
        if reason:
            ctx.report.skip(f"forward {contender.label} batch {batch} x {length}", reason)
            continue
        if measured is not None and (batch, length) == (1, SUMMARY_LENGTH):
            row = measured  # the same inputs, already timed round-robin against its same-shape partner
        else:
            inputs = forward_inputs(loaded, contender.kind, batch, length, ctx.args.seed)
            with torch.inference_mode():  # no autograd bookkeeping: what inference should cost
                row = meter.measure(f"{contender.label} b{batch} L{length}", lambda: loaded.model(**inputs),
                                    items=batch, tokens=batch * length, budget_s=s.budget_s).row(
                    model=contender.label, architecture=contender.family, batch=batch, seq_len=length)
        rows.append(row)
    return rows


def generation_speed(meter: PerformanceMeter, loaded: models.LoadedModel, contender: Contender,
                     s: Settings) -> tuple[list[dict], dict]:
    """TTFT, per-token latency and tokens/s for exactly N greedy new tokens, KV cache on vs off timed round-robin."""
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
    comparison = meter.compare({"first token": lambda: generate(1, True),
                                "cache on": lambda: last.update(on=generate(n, True)),
                                "cache off": lambda: last.update(off=generate(n, False))},
                               tokens={"first token": 1, "cache on": n, "cache off": n},
                               progress=f"{contender.label} generate")
    produced = last["on"].shape[1] - (s.prompt_tokens if contender.kind == "decoder" else 1)  # seq2seq: start token
    if produced != n:
        raise RuntimeError(f"generate made {produced} tokens instead of {n}; timings would not compare")
    same_tokens = torch.equal(last["on"], last["off"])
    timed = comparison.measurements
    # both share the first-token workload: for one new token, generate runs the same prefill with or without a cache
    on, off = (GenerationMeasurement(name, n, 1, timed["first token"], timed[name])
               for name in ("cache on", "cache off"))
    labels = {"model": contender.label, "architecture": contender.family}
    rows = []
    for g in (on, off):
        row = g.full.row(**labels, kv_cache=g is on, prompt_tokens=s.prompt_tokens, new_tokens=n)
        rows.append({**row, "ttft_ms": g.time_to_first_token_s * 1e3, "per_token_ms": g.per_token_s * 1e3,
                     "decode_tokens_per_s": 1 / g.per_token_s if g.per_token_s > 0 else None,
                     "e2e_tokens_per_s": row.pop("tokens_per_s"), "same_tokens_as_cache_off": same_tokens})
    per_token = on.decode_speedup(off) or (None, None, None)
    # The cache itself, after one prefill (decoder) or after the generated tokens (encoder-decoder's decoder)
    with torch.inference_mode():
        if contender.kind == "seq2seq":
            cache = model(input_ids=ids, decoder_input_ids=last["on"], use_cache=True).cache
        else:
            cache = model(input_ids=ids, use_cache=True).cache
    stored, cached_tokens = kv_cache_bytes(cache)
    dtype_bytes = next(model.parameters()).element_size()
    return rows, {**labels, "prompt_tokens": s.prompt_tokens, "new_tokens": n,
                  **comparison.verdict_row("cache on", "cache off"),
                  "per_token_speedup": per_token[0], "per_token_low": per_token[1], "per_token_high": per_token[2],
                  "per_token_verdict": None if per_token[0] is None else verdict_of(*per_token[1:]),
                  "same_greedy_tokens": same_tokens, "kv_bytes_per_token": stored // cached_tokens,
                  "cached_tokens": cached_tokens, **memory.kv_cache_factors(model.config, dtype_bytes)}


def same_shape_comparison(ctx: cli.Context, encoder: Contender, decoder: Contender) -> dict:
    """An encoder vs a decoder of the same depth and width: forward at batch 1 x SUMMARY_LENGTH, both loaded and
    timed round-robin, so only the architecture (bidirectional encoder vs causal decoder) differs."""
    calls = {}
    for contender in (encoder, decoder):
        loaded = load_by_architecture(ctx, contender)
        inputs = forward_inputs(loaded, contender.kind, 1, SUMMARY_LENGTH, ctx.args.seed)
        calls[contender.label] = lambda model=loaded.model, inputs=inputs: model(**inputs)
    with torch.inference_mode():
        comparison = ctx.meter(warmup=ctx.pick(FULL, QUICK).warmup).compare(calls, tokens=SUMMARY_LENGTH,
                                                                            progress="same shape")
    rows = {c.label: comparison.measurements[c.label].row(model=c.label, architecture=c.family, batch=1,
                                                          seq_len=SUMMARY_LENGTH) for c in (encoder, decoder)}
    # One estimator per pair: the decoder's time is the encoder's median at the paired ratio (its own median stays
    # beside it), so on a noisy run the two cells cannot tell another story than the verdict does.
    speedup, low, high = comparison.ratio(encoder.label, decoder.label)
    base, partner = rows[encoder.label]["p50_ms"], rows[decoder.label]
    partner.update(p50_ms_own_median=partner["p50_ms"], p50_ms=base * speedup, ci95_low_ms=base * low,
                   ci95_high_ms=base * high, items_per_s=1e3 / (base * speedup),
                   tokens_per_s=SUMMARY_LENGTH * 1e3 / (base * speedup))
    return {"encoder": encoder.label, "decoder": decoder.label, "layers": encoder.shape[0], "hidden": encoder.shape[1],
            "seq_len": SUMMARY_LENGTH, **comparison.verdict_row(encoder.label, decoder.label),
            "encoder_p50_ms": base, "decoder_p50_ms": partner["p50_ms"],
            "rows": rows}  # the grid's batch-1 x SUMMARY_LENGTH cells of both models: these round-robin timings


# ----------------------------------------------------------------------------------------------- 4. memory


def memory_section(ctx: cli.Context, contenders: list[Contender]) -> list[dict]:
    """The course notes say memory use differs by architecture: here it is measured, one model at a time.
    safetensors weights are memory-mapped, not read, at load: their pages come in when the first forward touches
    them. So the load time and RSS after it understate both; time to first inference and RSS after the first forward
    do not."""
    ctx.forget_loaded()  # the models kept for sections 1-3 go, so each load below is measured from a lean process
    rows = for_each_model(ctx, contenders, "memory", model_memory)
    lengths = ctx.pick(FULL, QUICK).seq_lengths
    columns = ["model", "weights_mib", "ttfi_s", "after_load_mib", "resident_mib", "activation_peak_mib",
               "after_release_mib"]  # load_s and the activation peak per length: results.csv
    title = ("Memory (MiB of RSS above the level just before each load; ttfi = time to first inference: load + first "
             "batch-1 forward; resident = after that forward; activation = a forward's peak above the RSS just "
             "before it):")
    if ctx.device.type == "cuda":
        columns += ["load_cuda_peak_mib", *[f"cuda_peak_mib@{n}" for n in lengths], "cuda_after_release_mib",
                    "cuda_reserved_after_release_mib"]
        title += (f"\n{ctx.device} columns: the load's peak above what was allocated before it; @N = a forward's "
                  "peak above the loaded weights; after release = still allocated, and reserved, after cleanup()")
    print_table(rows, columns, title=title)
    for row in rows:
        say(memory_note(row, ctx.device), "  ")
    ctx.report.add_rows("memory", [phase for row in rows for phase in memory_phases(row)])
    if rows:
        memory_chart(ctx, rows)
    return rows


def model_memory(ctx: cli.Context, contender: Contender) -> dict:
    """RSS after the load and after the first forward (time to first inference), then each length's activation
    peak above the now-resident weights, then RSS after release."""
    cuda = ctx.device.type == "cuda"
    memory.cleanup()
    before, gpu_before = memory.rss_bytes(), memory.snapshot(ctx.device)
    with memory.PeakRSSSampler() as rss, memory.CudaPeak(ctx.device) as cuda_peak:
        loaded = load_by_architecture(ctx, contender, fresh=True)
    row = {"model": contender.label, "architecture": contender.family, "rss_before_mib": before / MIB,
           "load_s": loaded.info.load_s, "weights_mib": memory.weights_bytes(loaded.model) / MIB,
           "load_peak_mib": (rss.peak_bytes - before) / MIB, "after_load_mib": (memory.rss_bytes() - before) / MIB,
           "load_cuda_peak_mib": cuda_peak.delta_bytes / MIB if cuda else None}
    limit = models.max_positions(loaded.model.config)
    lengths = [n for n in ctx.pick(FULL, QUICK).seq_lengths if limit is None or n <= limit]
    for length in sorted(set(ctx.pick(FULL, QUICK).seq_lengths) - set(lengths)):
        ctx.report.skip(f"memory {contender.label} length {length}", f"above the model's {limit} positions")
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
        row[f"cuda_peak_mib@{length}"] = cuda_peak.delta_bytes / MIB if cuda else None  # activations, not weights
    row["activation_peak_mib"] = max(row[f"activation_mib@{n}"] for n in lengths)
    del loaded  # drop the only reference, or cleanup() frees nothing
    released = memory.cleanup()
    row["after_release_mib"] = (released["rss_after_bytes"] - before) / MIB
    row["rss_after_release_mib"] = released["rss_after_bytes"] / MIB
    if cuda:  # what the GPU got back: cleanup() ran gc.collect() and torch.cuda.empty_cache()
        row["cuda_after_release_mib"] = (memory.snapshot(ctx.device).cuda_allocated_bytes
                                         - gpu_before.cuda_allocated_bytes) / MIB
        row["cuda_reserved_after_release_mib"] = released["cuda_reserved_after_bytes"] / MIB
    print(f"  released {contender.label}: RSS {row['rss_after_release_mib']:.0f} MiB, "
          f"{row['after_release_mib']:+.0f} MiB vs before its load")
    return row


def memory_phases(row: dict) -> list[dict]:
    """Tidy rows for results.csv: the load, the first forward, then each length's activation peak."""
    phases = [{"phase": "load", "rss_mib": row["after_load_mib"], "peak_rss_delta_mib": row["load_peak_mib"],
               "peak_cuda_mib": row["load_cuda_peak_mib"], "seconds": row["load_s"]},
              {"phase": "first forward (resident weights)", "rss_mib": row["resident_mib"],
               "seconds": row["first_forward_s"]}]
    phases += [{"phase": f"forward batch 1 x {key.split('@')[1]} (activation peak)", "peak_rss_delta_mib": row[key],
                "peak_cuda_mib": row[f"cuda_peak_mib@{key.split('@')[1]}"]}
               for key in row if key.startswith("activation_mib@")]
    return [{"model": row["model"], **phase} for phase in phases]


def memory_note(row: dict, device: torch.device) -> str:
    """Where the weights' memory showed up, explained only as far as this model's numbers show it."""
    weights, loaded, resident = row["weights_mib"], row["after_load_mib"], row["resident_mib"]
    head = (f"{row['model']}: {weights:.0f} MiB of weights; RSS +{loaded:.0f} MiB after a {row['load_s']:.2f} s load, "
            f"+{resident:.0f} MiB after the first forward ({row['ttfi_s']:.2f} s to first inference)")
    if device.type == "cuda":
        activations = max((row[key] or 0 for key in row if key.startswith("cuda_peak_mib@")), default=0.0)
        return (f"{row['model']}: {weights:.0f} MiB of weights; the load allocated {row['load_cuda_peak_mib']:.0f} "
                f"MiB of {device} memory at its peak and a forward up to {activations:.0f} MiB more; after release "
                f"{row['cuda_after_release_mib']:.0f} MiB stayed allocated and "
                f"{row['cuda_reserved_after_release_mib']:.0f} MiB reserved. Host RSS (+{loaded:.0f} MiB) is mostly "
                "the CUDA context and libraries, not the weights")
    if loaded < 0.5 * weights <= resident:
        return (f"{head}: the weight file was memory-mapped, and its pages came in when the first forward read "
                "them, so the load time hides part of the start-up cost")
    return f"{head}: the weights were read into memory during the load"


# ---------------------------------------------------------------------------------------------- 5. summary


def summary_section(ctx: cli.Context, contenders: list[Contender], facts: dict | None, speed: dict | None,
                    memory_rows: list[dict] | None) -> dict:
    """Everything above in one row per model, and when to reach for each architecture, said only as far as
    this run's measurements and verdicts back it."""
    s = ctx.pick(FULL, QUICK)
    rows = summary_rows(contenders, facts, speed, memory_rows)
    print_table(rows, [key for key in rows[0] if key not in ("architecture", "masking", "disk_mib")] if rows else None,
                title="Summary (fwd = batch 1; ttft and decode tokens/s with the KV cache; resident = RSS "
                            "above pre-load after the first forward; activation = peak above that):")
    advice = family_advice(rows, speed or {}, s.prompt_tokens)
    print()
    for line in advice:
        say(f"- {line}")
    twins = None
    if any(not contender.where.meaningful for contender in contenders):
        twins = (f"Twins have the real model's layer shapes and parameter count (section 1); speed was measured at "
                 f"fixed token counts ({'/'.join(map(str, s.seq_lengths))} ids per forward, a {s.prompt_tokens}-token "
                 f"prompt plus {s.new_tokens} new tokens per generation), which a twin and its real model process "
                 "alike. A twin's borrowed tokenizer makes a different number of tokens of the same text (section 2 "
                 "prints each count), so its time per text is not the real model's; its outputs are noise.")
        say(f"\n{twins}")
    return {"models": rows, "when_to_use": advice, "twins": twins}


def summary_rows(contenders: list[Contender], facts: dict | None, speed: dict | None,
                 memory_rows: list[dict] | None) -> list[dict]:
    """One row per model from the sections' measured numbers ('-' where a section or cell did not run)."""
    def find(rows: list[dict], label: str, **match: Any) -> dict:
        return next((row for row in rows if row["model"] == label and match.items() <= row.items()), {})

    rows = []
    for contender in contenders:
        fact = find((facts or {}).get("facts", []), contender.label)
        used = find(memory_rows or [], contender.label)
        cached = find((speed or {}).get("generation", []), contender.label, kv_cache=True)
        rows.append({"model": contender.label, "architecture": contender.family,
                     "params_m": fact["params"] / 1e6 if fact else None, "masking": fact.get("masking"),
                     "disk_mib": fact.get("disk_mib"),
                     f"fwd_ms@{SUMMARY_LENGTH}": find((speed or {}).get("forward", []), contender.label, batch=1,
                                                      seq_len=SUMMARY_LENGTH).get("p50_ms"),
                     **{key: cached.get(key) for key in ("ttft_ms", "decode_tokens_per_s")},
                     "ttfi_s": used.get("ttfi_s"), "resident_mib": used.get("resident_mib"),
                     "activation_mib": used.get("activation_peak_mib")})
    return rows


def family_advice(rows: list[dict], speed: dict, prompt: int) -> list[str]:
    """One line per architecture on when to use it, built from this run's numbers and verdicts."""
    def numbers(family: str, key: str, unit: str) -> str:
        return ", ".join(f"{row['model']} {format_value(row[key])} {unit}" for row in rows
                         if row["architecture"] == family and row[key] is not None) or "not measured"

    def probe(family: str) -> str:
        found = dict.fromkeys(row["masking"] for row in rows if row["architecture"] == family and row["masking"])
        return f"masking probe: {' / '.join(found) or 'not run'}"

    def generates(family: str, given: str) -> str:
        cache = "; ".join(f"KV cache on vs off for {row['model']}: {row['speedup']:.2f}x, "
                          f"{VERDICT_WORDS[row['verdict']]} end to end, per decoded token {per_token_text(row)}"
                          for row in speed.get("kv_cache", []) if row["architecture"] == family)
        return (f"after a {prompt}-token {given}, first token in {numbers(family, 'ttft_ms', 'ms')}, then "
                f"{numbers(family, 'decode_tokens_per_s', 'tokens/s')} decoding with the KV cache "
                f"({cache or 'KV cache on vs off not measured'}), resident memory "
                f"{numbers(family, 'resident_mib', 'MiB')}")

    same_shape = "".join(f" (same depth and width: {row['sentence']}"
                         f"{'; what differs is what the model can do' if row['verdict'] == 'same' else ''})"
                         for row in speed.get("same_shape", []))
    advice = {
        "encoder-only": f"Encoder-only ({probe('encoder-only')}): one pass gives every token a vector; forward "
                        f"@{SUMMARY_LENGTH} tokens: {numbers('encoder-only', f'fwd_ms@{SUMMARY_LENGTH}', 'ms')}"
                        f"{same_shape}; it has no LM head to generate with. Use it to classify, tag (NER), extract "
                        "answers or embed for search.",
        "decoder-only": f"Decoder-only ({probe('decoder-only')}), so it can write one token after another: "
                        f"{generates('decoder-only', 'prompt')}. Use it for open-ended generation and chat.",
        "encoder-decoder": f"Encoder-decoder ({probe('encoder-decoder')}): reads the input once, then writes: "
                           f"{generates('encoder-decoder', 'input')}. Use it when an input maps to a new text: "
                           "translation, summarisation, any task phrased as text-to-text.",
    }
    return [advice[family] for family in dict.fromkeys(row["architecture"] for row in rows)]


# ------------------------------------------------------------------------------------------------- charts


def parameters_chart(ctx: cli.Context, facts: list[dict]) -> None:
    """Stacked bars: how much of each model is its embedding tables."""
    shares = [row["embedding_pct"] for row in facts]
    fig, ax = plots.figure(f"Embedding tables hold {min(shares):.0f}-{max(shares):.0f}% of the parameters", "model",
                           "parameters (millions)")
    labels = [row["model"] for row in facts]
    embeddings = [row["embedding_params"] / 1e6 for row in facts]
    rest = [row["other_params"] / 1e6 for row in facts]
    ax.bar(labels, embeddings, label="embeddings (token/position tables)", color="#f28e2b")
    tops = ax.bar(labels, rest, bottom=embeddings, label="everything else (attention, MLP, norms, heads)",
                  color="#4e79a7")
    ax.bar_label(tops, labels=[f"{row['embedding_pct']:.0f}% emb." for row in facts], fontsize=8)
    ax.set_ylim(0, 1.35 * max(row["params"] / 1e6 for row in facts))
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")  # long names must not overlap
    plots.legend_outside(ax)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "params_stacked"))


def latency_chart(ctx: cli.Context, forward: list[dict]) -> None:
    """One colour per model, one line style per batch size: how cost grows with sequence length (the title: by how
    much, at the smallest batch)."""
    batch, lengths = min(row["batch"] for row in forward), sorted({row["seq_len"] for row in forward})
    ends = {}
    for row in forward:
        if row["batch"] == batch and row["seq_len"] in (lengths[0], lengths[-1]):
            ends.setdefault(row["model"], {})[row["seq_len"]] = row["p50_ms"]
    growth = [end[lengths[-1]] / end[lengths[0]] for end in ends.values() if len(end) == 2]
    title = (f"From {lengths[0]} to {lengths[-1]} tokens, forward latency grows {min(growth):.1f}-{max(growth):.1f}x "
             f"(batch {batch})" if growth else "Forward latency vs sequence length")
    fig, ax = plots.figure(title, "sequence length (tokens)", "median forward latency (ms)")
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(row["model"] for row in forward))}
    styles = dict(zip(sorted({row["batch"] for row in forward}), ["-", "--", ":"]))
    for label, batch in dict.fromkeys((row["model"], row["batch"]) for row in forward):
        points = sorted((row["seq_len"], row["p50_ms"]) for row in forward
                        if row["model"] == label and row["batch"] == batch)
        ax.plot(*zip(*points), marker="o", color=colours[label], linestyle=styles[batch],
                label=f"{label}, batch {batch}")
    plots.log2_x(ax, [row["seq_len"] for row in forward])
    values = [row["p50_ms"] for row in forward]
    if max(values) / min(values) > 20:
        plots.log_y(ax)
    plots.legend_outside(ax)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "latency_vs_seq_length"))


def generation_chart(ctx: cli.Context, generation: list[dict], kv_rows: list[dict]) -> None:
    """Decode-only and end-to-end tokens/s, with and without the KV cache, side by side per model."""
    first = generation[0]
    labels = list(dict.fromkeys(row["model"] for row in generation))
    gains = [row["per_token_speedup"] for row in kv_rows if row["per_token_speedup"] is not None]  # the table's ratio
    fig, ax = plots.figure((f"Per decoded token, the KV cache gives {min(gains):.1f}-{max(gains):.1f}x the tokens/s"
                            if gains else "Greedy generation speed") + f" ({first['prompt_tokens']}-token prompt, "
                           f"{first['new_tokens']} new tokens, batch 1)", "model", "tokens per second")
    speed = {(row["model"], row["kv_cache"], key): row[key] for row in generation
             for key in ("decode_tokens_per_s", "e2e_tokens_per_s")}
    plots.grouped_bars(ax, labels, [(f"{what}, KV cache {'on' if on else 'off'}",
                                     [speed.get((label, on, key)) for label in labels])
                                    for key, what in (("decode_tokens_per_s", "decode only: 1 / per-token cost"),
                                                      ("e2e_tokens_per_s", "end to end: N / t(N)"))
                                    for on in (True, False)], value_format="%.3g")
    ax.tick_params(axis="x", labelrotation=15)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "generation_tokens_per_s"))


def memory_chart(ctx: cli.Context, rows: list[dict]) -> None:
    """Per model: RSS after the load, after the first forward (weights paged in), the largest activation peak above
    that, and what is left after release."""
    fig, ax = plots.figure("The weights arrive at the first forward, not at the load (memory-mapped safetensors)",
                           "model", "MiB of RSS above the level before loading")
    plots.grouped_bars(ax, [row["model"] for row in rows], [(name, [row[key] for row in rows]) for name, key in (
        ("after load (weights mapped)", "after_load_mib"), ("after first forward (weights resident)", "resident_mib"),
        ("activation peak above resident (batch 1, longest)", "activation_peak_mib"),
        ("after release + cleanup()", "after_release_mib"))], value_format="%.0f")
    ax.tick_params(axis="x", labelrotation=15)
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
    say("Comparing: " + ", ".join(f"{c.label} [{c.family}]" for c in contenders))
    run = ctx.report.run_section  # each section's docstring is the why it prints under the title
    facts = run("1. Architectures", architectures_section.__doc__, architectures_section, ctx, contenders)
    run("2. One input, one line each", pipelines_section.__doc__, pipelines_section, ctx, contenders)
    speed = run("3. Speed", speed_section.__doc__, speed_section, ctx, contenders, facts)
    memory_rows = run("4. Memory", memory_section.__doc__, memory_section, ctx, contenders)
    run("5. Summary", summary_section.__doc__, summary_section, ctx, contenders, facts, speed, memory_rows)
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
