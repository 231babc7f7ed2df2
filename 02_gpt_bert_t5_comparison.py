#!/usr/bin/env python3
"""02 · GPT vs BERT vs T5: decoder-only, encoder-only and encoder-decoder Transformers, measured side by side.

Each architecture's facts are read from the model itself (attention masking is probed, parameters are counted),
each model answers one input through a one-line pipeline, then forward latency, generation speed with and without
the KV cache, and memory are measured on this machine, one model loaded at a time.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, pipeline
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from common import cli, memory, models, plots
from common import pipelines as custom_pipelines  # registers the "text-to-text" pipeline
from common.errors import UserError
from common.memory import MIB
from common.meter import PerformanceMeter, measure_generation
from common.report import format_value, print_table

# Settings (nanoGPT bench.py style): plain constants, the --quick variant next to each.
SEQ_LENGTHS = [32, 128, 512]
QUICK_SEQ_LENGTHS = [32, 128]
BATCH_SIZES = [1, 8]
QUICK_BATCH_SIZES = [1]
NEW_TOKENS = 32
QUICK_NEW_TOKENS = 8
# A batch > 1 forward whose predicted time per call (scaled from a measured smaller cell) is above this is skipped
# with the reason: BERT-base at batch 8 x 512 tokens takes 10-20 s a call on 2 CPU cores, which alone would break
# the 4-minute budget. Batch 1 always runs: it is the reference line of the latency chart.
MAX_CALL_S = 2.5
BUDGET_S = 0.5  # time per measurement after 1 warm-up and at least MIN_RUNS runs
QUICK_BUDGET_S = 0.1
MIN_RUNS = 3
HUB_MODELS = ["gpt2", "bert-base-uncased", "t5-small"]
OFFLINE_MODELS = ["decoder", "encoder", *HUB_MODELS]  # real bundled weights first, then the exact-size twins
PROMPT = "The best way to learn a new language is"
TEXT_TO_TEXT_INPUT = "translate English to German: The house is wonderful."
FILL_MASK_TEXT = "The capital of France is {mask}."
PROBE_TEXT = "Attention decides which other words each word is allowed to see"
PIPELINE_NEW_TOKENS = 20
QUICK_PIPELINE_NEW_TOKENS = 8
CAUSAL_TOLERANCE = 1e-5  # relative change of earlier positions' hidden states below which they did not see the edit
TWIN_NOTE = "(twin: random weights, text is noise; shown only to prove the plumbing)"

# The seed write-up's table, translated; sections 1-5 check it against measured facts.
SEED_TABLE = [
    {"model": "GPT", "architecture": "decoder-only", "strengths": "long text generation",
     "typical uses": "creative writing, conversational AI"},
    {"model": "BERT", "architecture": "encoder-only", "strengths": "bidirectional understanding",
     "typical uses": "classification, NER, QA"},
    {"model": "T5", "architecture": "encoder-decoder", "strengths": "text-to-text approach",
     "typical uses": "translation, summarisation"},
]
FAMILIES = {"decoder": "decoder-only", "encoder": "encoder-only", "seq2seq": "encoder-decoder"}


# ------------------------------------------------------------------------------------------- which models


def default_models(source: str) -> list[str]:
    """Online the real gpt2 / bert-base-uncased / t5-small; offline the bundled real models plus the three twins."""
    online = all(models.use_hub(models.CATALOG[name].hub_id, source) for name in HUB_MODELS)
    return HUB_MODELS if online else OFFLINE_MODELS


def kind_from_config(config: Any, name: str) -> str:
    """decoder / encoder / seq2seq for a Hub checkpoint outside the catalog, read from its config."""
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise UserError(f"{name} ({model_type}) is not a text encoder, decoder or encoder-decoder, so it has no place "
                    "in this comparison")


def resolve_spec(name: str, source: str) -> dict:
    """What loading `name` will give: display label, architecture family and whether it carries a masked-LM head."""
    _, entry, location, source_label = models.resolve(name, source)
    offline = source_label != "hub" or (source == "auto" and not models.hub_reachable())
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise UserError(f"could not read the config of {name}: {str(error).strip().splitlines()[0]}") from error
    kind = entry.kind if entry else kind_from_config(config, name)
    if kind not in FAMILIES:
        raise UserError(f"{name} is a {kind}, not a language model this comparison can run")
    model_name = entry.name if entry else location
    return {
        "request": name,
        "label": f"{model_name} (twin)" if source_label == "twin" else model_name,
        "kind": kind,
        "family": FAMILIES[kind],
        "meaningful": source_label != "twin",
        "has_mlm_head": any(arch.endswith("ForMaskedLM") for arch in config.architectures or []),
        "architectures": config.architectures or [],
    }


def plan_models(ctx: cli.Context) -> list[dict]:
    """Resolve --models (or the defaults); an unknown or unusable name is skipped with its reason, the rest run."""
    specs: list[dict] = []
    for name in ctx.args.models or default_models(ctx.source):
        try:
            spec = resolve_spec(name, ctx.source)
        except UserError as error:
            ctx.report.skip(f"model {name}", str(error))
            continue
        if all(spec["label"] != other["label"] for other in specs):
            specs.append(spec)
    if not specs:
        raise UserError("none of the requested models can be compared (reasons above); "
                        f"{models.available_names()}")
    print("Comparing: " + ", ".join(f"{spec['label']} [{spec['family']}]" for spec in specs))
    return specs


def load(ctx: cli.Context, spec: dict, kind: str | None = None) -> models.LoadedModel:
    """Load one model through the catalog (which prints its provenance line) and list it once in the report."""
    loaded = models.load_model(spec["request"], source=ctx.source, device=ctx.device, kind=kind or spec["kind"])
    if kind is None:
        ctx.report.add_model(loaded.info.to_dict())
    return loaded


def for_each_model(ctx: cli.Context, specs: list[dict], what: str, work: Callable[..., Any],
                   kind: str | None = None) -> list[Any]:
    """Load each model alone, run work(ctx, loaded, spec), then release it; a model that fails is skipped, not fatal."""
    results = []
    for spec in specs:
        loaded = None
        try:
            loaded = load(ctx, spec, kind)
            results.append(work(ctx, loaded, spec))
        except Exception as error:  # one odd checkpoint must not cost the other models their numbers
            ctx.report.skip(f"{what}: {spec['label']}", f"{type(error).__name__}: {error}")
        finally:
            del loaded  # drop our reference before collecting, or cleanup() frees nothing
            memory.cleanup()
    return results


# ------------------------------------------------------------------------------------------- 1. architectures


def embedding_parameter_ids(model: torch.nn.Module) -> set[int]:
    """Parameters of embedding tables (token, position, token-type) and of modules named `embeddings`.

    The second rule adds BERT's embedding LayerNorm; T5's relative-position bias tables count as embeddings."""
    ids = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) or name.rsplit(".", 1)[-1] == "embeddings":
            ids.update(id(parameter) for parameter in module.parameters())
    return ids


def parameter_split(model: torch.nn.Module) -> tuple[int, int]:
    """(embedding parameters, all other parameters); tied weights such as a shared LM head are counted once."""
    embedding_ids = embedding_parameter_ids(model)
    embeddings = sum(p.numel() for p in model.parameters() if id(p) in embedding_ids)
    return embeddings, sum(p.numel() for p in model.parameters()) - embeddings


def max_positions(config: Any) -> int | None:
    """The longest input the checkpoint was built for (absolute position table or the trained length)."""
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    return None


def layer_count(config: Any, kind: str) -> str:
    """Transformer blocks; encoder + decoder for an encoder-decoder."""
    if kind == "seq2seq":
        encoder = getattr(config, "encoder_layers", None) or config.num_hidden_layers
        decoder = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or encoder
        return f"{encoder} + {decoder}"
    return str(config.num_hidden_layers)


def last_token_probe(hidden: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> float:
    """Edit only the last token and return how much the earlier positions' final hidden states moved (relative)."""
    edited = ids.clone()
    edited[0, -1] = ids[0, 0] if ids[0, 0] != ids[0, -1] else ids[0, 1]
    with torch.inference_mode():
        original, changed = hidden(ids), hidden(edited)
    earlier_change = (original[:, :-1] - changed[:, :-1]).abs().max().item()
    return earlier_change / max(original[:, :-1].abs().max().item(), 1e-12)


def attention_masking(loaded: models.LoadedModel, kind: str) -> tuple[str, dict[str, float]]:
    """Show causal vs bidirectional attention by experiment: can earlier tokens see a change to a later one?"""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if kind == "seq2seq":
        start = torch.full((1, 1), model.config.decoder_start_token_id, device=device)
        decoder_ids = torch.cat([start, ids], dim=1)
        changes = {
            "encoder": last_token_probe(lambda x: model.get_encoder()(input_ids=x).last_hidden_state, ids),
            "decoder": last_token_probe(lambda x: model(input_ids=ids, decoder_input_ids=x, output_hidden_states=True,
                                                        use_cache=False).decoder_hidden_states[-1], decoder_ids),
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


def checkpoint_folder(model: Any) -> Path | None:
    """The folder the weights were read from: a local folder, or the Hub cache's snapshot of a Hub id."""
    location = Path(model.name_or_path)
    if location.is_dir():
        return location
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.name_or_path, local_files_only=True))
    except Exception:  # not cached as a full snapshot: the disk size is simply unknown
        return None


def weights_on_disk_bytes(folder: Path | None) -> int | None:
    """Bytes of the weight files (safetensors, else PyTorch .bin), following the Hub cache's symlinks."""
    if folder is None:
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(path.stat().st_size for path in files) or None


def architecture_facts(ctx: cli.Context, loaded: models.LoadedModel, spec: dict) -> dict:
    """One row of facts read from the loaded model: structure, masking probe, parameter split, sizes."""
    model, config = loaded.model, loaded.model.config
    embeddings, rest = parameter_split(model)
    params = embeddings + rest
    masking, changes = attention_masking(loaded, spec["kind"])
    disk = weights_on_disk_bytes(checkpoint_folder(model))
    return {
        "model": spec["label"], "architecture": spec["family"], "class": type(model).__name__,
        "layers": layer_count(config, spec["kind"]), "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "vocab": config.vocab_size, "max_positions": max_positions(config), "masking": masking,
        "earlier_change": changes.get("model", changes.get("encoder")),
        "decoder_earlier_change": changes.get("decoder"),
        "params": params, "embedding_params": embeddings, "other_params": rest,
        "embedding_pct": 100.0 * embeddings / params,
        "fp32_mib": params * 4 / MIB, "fp16_mib": params * 2 / MIB, "int8_mib": params / MIB,
        "disk_mib": disk / MIB if disk else None,
    }


def parameters_chart(ctx: cli.Context, facts: list[dict]) -> None:
    """Stacked bars: how much of each model is its embedding tables."""
    fig, ax = plots.figure("Where the parameters are: embeddings vs transformer blocks", "model",
                           "parameters (millions)")
    labels = [row["model"] for row in facts]
    embeddings = [row["embedding_params"] / 1e6 for row in facts]
    rest = [row["other_params"] / 1e6 for row in facts]
    ax.bar(labels, embeddings, label="embeddings (token/position tables)", color="#f28e2b")
    ax.bar(labels, rest, bottom=embeddings, label="everything else (attention, MLP, norms, heads)", color="#4e79a7")
    for x, (low, high, row) in enumerate(zip(embeddings, rest, facts)):
        ax.annotate(f"{row['embedding_pct']:.0f}% emb.", (x, low + high), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.35 * max(low + high for low, high in zip(embeddings, rest)))
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(loc="upper right", fontsize=8)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "params_stacked"))


def architectures_section(ctx: cli.Context, specs: list[dict]) -> dict:
    """The seed's table, then the same claims checked against facts read from each loaded model."""
    print_table(SEED_TABLE, title="What the seed write-up says (claims, checked below):")
    facts = for_each_model(ctx, specs, "architecture facts", architecture_facts)
    print_table(facts, ["model", "architecture", "class", "layers", "hidden", "heads", "kv_heads", "vocab",
                        "max_positions", "masking"], title="Read from each model:")
    print(f"\nMasking probe: edit only the LAST token of a {len(PROBE_TEXT.split())}-word input and compare the "
          "earlier tokens' final hidden states. Unchanged (relative change < "
          f"{CAUSAL_TOLERANCE:g}) = they cannot see later tokens = causal; changed = bidirectional.")
    print_table(facts, ["model", "earlier_change", "decoder_earlier_change", "masking"])
    print_table(facts, ["model", "params", "embedding_params", "other_params", "embedding_pct", "fp32_mib",
                        "fp16_mib", "int8_mib", "disk_mib"],
                title="Parameters and size (fp32/fp16/int8 = params x 4/2/1 bytes; disk = weight files loaded):")
    if facts:
        parameters_chart(ctx, facts)
    return {"seed_table": SEED_TABLE, "facts": facts}


# ------------------------------------------------------------------------------------- 2. one-line pipelines


def show(spec: dict, text: str) -> str:
    """Real outputs verbatim; a twin's output is never presented as language."""
    return text if spec["meaningful"] else TWIN_NOTE


def pipeline_demo(ctx: cli.Context, loaded: models.LoadedModel, spec: dict) -> dict:
    """The one line each architecture is made for: features (encoder), continuation (decoder), text-to-text."""
    model, tokenizer = loaded.model, loaded.tokenizer
    new_tokens = QUICK_PIPELINE_NEW_TOKENS if ctx.quick else PIPELINE_NEW_TOKENS
    if spec["kind"] == "encoder":
        features = pipeline("feature-extraction", model=model, tokenizer=tokenizer)(PROMPT, return_tensors=True)
        task, given = "feature-extraction", PROMPT
        output = f"one {features.shape[-1]}-number vector per token, shape {tuple(features.shape)}"
    elif spec["kind"] == "decoder":
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        result = generator(PROMPT, max_new_tokens=new_tokens, do_sample=False, return_full_text=False)
        task, given, output = "text-generation", PROMPT, show(spec, result[0]["generated_text"].strip())
    else:
        text_to_text = pipeline(custom_pipelines.TEXT_TO_TEXT, model=model, tokenizer=tokenizer)
        result = text_to_text(TEXT_TO_TEXT_INPUT, max_new_tokens=new_tokens, do_sample=False)
        task, given, output = custom_pipelines.TEXT_TO_TEXT, TEXT_TO_TEXT_INPUT, show(spec, result["generated_text"])
    print(f"{spec['label']:<32} {task:<18} {given!r}\n{'':<32} -> {output}")
    return {"model": spec["label"], "architecture": spec["family"], "pipeline": task, "input": given,
            "output": output, "meaningful": spec["meaningful"]}


def fill_mask_demo(ctx: cli.Context, loaded: models.LoadedModel, spec: dict) -> dict:
    """An encoder with its masked-LM head fills a blank using words on BOTH sides of it."""
    text = FILL_MASK_TEXT.format(mask=loaded.tokenizer.mask_token)
    guesses = pipeline("fill-mask", model=loaded.model, tokenizer=loaded.tokenizer)(text, top_k=3)
    output = show(spec, ", ".join(f"{guess['token_str']} ({guess['score']:.2f})" for guess in guesses))
    print(f"{spec['label']:<32} {'fill-mask':<18} {text!r}\n{'':<32} -> {output}")
    return {"model": spec["label"], "architecture": spec["family"], "pipeline": "fill-mask", "input": text,
            "output": output, "meaningful": spec["meaningful"]}


def pipelines_section(ctx: cli.Context, specs: list[dict]) -> list[dict]:
    """Each architecture's natural one-liner on the same kind of input."""
    rows = for_each_model(ctx, specs, "pipeline", pipeline_demo)
    encoders = [spec for spec in specs if spec["kind"] == "encoder"]
    for spec in encoders:
        if not spec["has_mlm_head"]:
            ctx.report.skip(f"fill-mask: {spec['label']}", "its checkpoint has no masked-LM head (saved as "
                            f"{', '.join(spec['architectures']) or 'a bare encoder'}), so it cannot fill a [MASK]")
    rows += for_each_model(ctx, [spec for spec in encoders if spec["has_mlm_head"]], "fill-mask", fill_mask_demo,
                           kind="masked-lm")
    return rows


# ------------------------------------------------------------------------------------------------ 3. speed


def forward_inputs(loaded: models.LoadedModel, kind: str, batch: int, length: int, seed: int) -> dict:
    """Random token ids of an exact shape (latency depends on the shape, not the words) plus what each family needs.

    Every family does the work that precedes its first output: the encoder encodes everything; the decoder runs
    its prompt and computes logits for the last position only (as generate's prefill does); the encoder-decoder
    encodes the input and runs one decoder step."""
    model = loaded.model
    device = next(model.parameters()).device
    vocab = min(model.config.vocab_size, len(loaded.tokenizer))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, length), generator=generator).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.full((batch, 1), model.config.decoder_start_token_id, device=device)
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


def forward_latency(ctx: cli.Context, meter: PerformanceMeter, loaded: models.LoadedModel, spec: dict) -> list[dict]:
    """Median forward latency over the batch x length grid, smallest first so the cost of the next cell is known."""
    settings = speed_settings(ctx)
    limit = max_positions(loaded.model.config)
    cells = [(batch, length) for batch in settings["batch_sizes"] for length in settings["seq_lengths"]]
    rows, largest = [], None  # largest: (tokens, median seconds) of the biggest cell measured so far
    for batch, length in tqdm(cells, desc=spec["label"], disable=None, leave=False):
        reason = forward_skip_reason(length, batch, limit, largest, settings["max_call_s"])
        if reason:
            ctx.report.skip(f"forward {spec['label']} batch {batch} x {length}", reason)
            continue
        inputs = forward_inputs(loaded, spec["kind"], batch, length, ctx.args.seed)

        def forward() -> None:
            with torch.inference_mode():
                loaded.model(**inputs)

        measured = meter.measure(f"{spec['label']} b{batch} L{length}", forward, items=batch, tokens=batch * length)
        if largest is None or batch * length >= largest[0]:
            largest = (batch * length, measured.stats.median)
        rows.append({"model": spec["label"], "architecture": spec["family"], "batch": batch, "seq_len": length,
                     "p50_ms": measured.median_ms, "iqr_ms": measured.stats.iqr * 1e3, "runs": measured.stats.count,
                     "tokens_per_s": measured.tokens_per_s, "noisy": measured.noisy})
    return rows


def generation_speed(ctx: cli.Context, meter: PerformanceMeter, loaded: models.LoadedModel, spec: dict) -> list[dict]:
    """TTFT, per-token latency and tokens/s for exactly N greedy new tokens, with the KV cache (and without it too,
    for decoders)."""
    model, new_tokens = loaded.model, speed_settings(ctx)["new_tokens"]
    encoded = loaded.tokenizer(PROMPT, return_tensors="pt").to(next(model.parameters()).device)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}  # no token_type_ids
    prompt_tokens = inputs["input_ids"].shape[1] if spec["kind"] == "decoder" else 1  # seq2seq: decoder start token

    def generate(n: int, use_cache: bool) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache)

    cache_modes = [True, False] if spec["kind"] == "decoder" else [True]
    outputs = {use_cache: generate(new_tokens, use_cache) for use_cache in cache_modes}
    produced = outputs[True].shape[1] - prompt_tokens
    if produced != new_tokens:
        raise RuntimeError(f"generate made {produced} tokens instead of {new_tokens}; timings would not compare")
    same_tokens = torch.equal(outputs[True], outputs[False]) if False in outputs else None
    rows = []
    for use_cache in cache_modes:
        # warmup=0: the exactness check above already ran both code paths once
        measured = measure_generation(meter, f"{spec['label']} cache {'on' if use_cache else 'off'}",
                                      lambda n, use_cache=use_cache: generate(n, use_cache), new_tokens, warmup=0)
        rows.append({"model": spec["label"], "architecture": spec["family"], "kv_cache": use_cache,
                     "new_tokens": new_tokens, "prompt_tokens": inputs["input_ids"].shape[1],
                     "ttft_ms": measured.time_to_first_token_s * 1e3, "per_token_ms": measured.per_token_s * 1e3,
                     "tokens_per_s": measured.tokens_per_s, "p50_total_ms": measured.full.median_ms,
                     "noisy": measured.first_token.noisy or measured.full.noisy,
                     "same_tokens_as_cache_off": same_tokens})
    return rows


def speed_settings(ctx: cli.Context) -> dict:
    """The sweep this run does (--quick trims it)."""
    return {"seq_lengths": QUICK_SEQ_LENGTHS if ctx.quick else SEQ_LENGTHS,
            "batch_sizes": QUICK_BATCH_SIZES if ctx.quick else BATCH_SIZES,
            "new_tokens": QUICK_NEW_TOKENS if ctx.quick else NEW_TOKENS,
            "max_call_s": MAX_CALL_S,
            "budget_s": QUICK_BUDGET_S if ctx.quick else BUDGET_S, "min_runs": MIN_RUNS, "warmup": 1}


def model_speed(ctx: cli.Context, loaded: models.LoadedModel, spec: dict) -> dict:
    """Forward grid for every model; generation only for the families that can generate."""
    settings = speed_settings(ctx)
    meter = PerformanceMeter(ctx.device, warmup=settings["warmup"], min_runs=settings["min_runs"],
                             budget_s=settings["budget_s"])
    forward = forward_latency(ctx, meter, loaded, spec)
    if spec["kind"] == "encoder":
        ctx.report.skip(f"generation: {spec['label']}", "encoder-only: it has no decoder or LM head, so it cannot "
                        "generate tokens (it encodes its whole input in one forward)")
        return {"forward": forward, "generation": []}
    return {"forward": forward, "generation": generation_speed(ctx, meter, loaded, spec)}


def latency_chart(ctx: cli.Context, forward: list[dict]) -> None:
    """One colour per model, one line style per batch size: how cost grows with sequence length."""
    from matplotlib.lines import Line2D

    fig, ax = plots.figure("Forward latency vs sequence length", "sequence length (tokens)",
                           "median forward latency (ms)")
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(row["model"] for row in forward))}
    styles = {batch: style for batch, style in zip(sorted({row["batch"] for row in forward}), ["-", "--", ":"])}
    for label, batch in dict.fromkeys((row["model"], row["batch"]) for row in forward):
        points = sorted((row["seq_len"], row["p50_ms"]) for row in forward
                        if row["model"] == label and row["batch"] == batch)
        ax.plot(*zip(*points), marker="o", color=colours[label], linestyle=styles[batch])
    lengths = sorted({row["seq_len"] for row in forward})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, labels=lengths)
    values = [row["p50_ms"] for row in forward]
    if max(values) / min(values) > 20:
        ax.set_yscale("log")
    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in colours.items()]
    handles += [Line2D([], [], color="black", linestyle=style, label=f"batch {batch}")
                for batch, style in styles.items()]
    ax.legend(handles=handles, fontsize=8)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "latency_vs_seq_length"))


def generation_chart(ctx: cli.Context, generation: list[dict]) -> None:
    """Tokens/s with and without the KV cache, side by side per model."""
    fig, ax = plots.figure(f"Greedy generation speed ({generation[0]['new_tokens']} new tokens, batch 1)", "model",
                           "tokens per second")
    labels = list(dict.fromkeys(row["model"] for row in generation))
    for offset, use_cache in ((-0.2, True), (0.2, False)):
        bars = {row["model"]: row["tokens_per_s"] for row in generation if row["kv_cache"] is use_cache}
        xs = [i + offset for i, label in enumerate(labels) if label in bars]
        heights = [bars[label] for label in labels if label in bars]
        drawn = ax.bar(xs, heights, width=0.4, label=f"KV cache {'on' if use_cache else 'off'}",
                       color="#59a14f" if use_cache else "#e15759")
        ax.bar_label(drawn, fmt="%.3g", fontsize=8)
    for i, label in enumerate(labels):
        if not any(row["model"] == label and not row["kv_cache"] for row in generation):
            ax.annotate("cache off:\nnot measured", (i + 0.2, 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=15)
    ax.legend()
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "generation_tokens_per_s"))


def kv_cache_table(generation: list[dict]) -> list[dict]:
    """Cache on vs off for each decoder: the speed-up as one ratio from this run, and whether the tokens match."""
    rows = []
    for label in dict.fromkeys(row["model"] for row in generation):
        modes = {row["kv_cache"]: row for row in generation if row["model"] == label}
        if False in modes:
            rows.append({"model": label, "tokens_per_s_cache_on": modes[True]["tokens_per_s"],
                         "tokens_per_s_cache_off": modes[False]["tokens_per_s"],
                         "speedup": modes[True]["tokens_per_s"] / modes[False]["tokens_per_s"],
                         "same_greedy_tokens": modes[True]["same_tokens_as_cache_off"]})
    return rows


def speed_section(ctx: cli.Context, specs: list[dict]) -> dict:
    """Forward latency grid for all, generation for decoders and encoder-decoders, KV cache on/off for decoders."""
    settings = speed_settings(ctx)
    print(f"Forward: batch {settings['batch_sizes']} x length {settings['seq_lengths']}, median of >= "
          f"{settings['min_runs']} runs after 1 warm-up. Generation: {settings['new_tokens']} new greedy tokens.")
    results = for_each_model(ctx, specs, "speed", model_speed)
    forward = [row for result in results for row in result["forward"]]
    generation = [row for result in results for row in result["generation"]]
    kv_rows = kv_cache_table(generation)
    print_table(forward, ["model", "batch", "seq_len", "p50_ms", "iqr_ms", "runs", "tokens_per_s", "noisy"],
                title="Forward latency (median and IQR per call):")
    print_table(generation, ["model", "kv_cache", "new_tokens", "ttft_ms", "per_token_ms", "tokens_per_s", "noisy"],
                title="Generation (TTFT = prefill + 1 token; per-token = (t(N) - t(1)) / (N - 1)):")
    print_table(kv_rows, title="KV cache on vs off (same run, same prompt):")
    for row in kv_rows:
        effect = ("the cache avoids recomputing every earlier token at each step" if row["speedup"] > 1 else
                  "no gain here: re-running this short context costs about as much as one token on this device")
        print(f"  {row['model']}: tokens/s cache on / off = {row['speedup']:.2f}x ({effect}); greedy tokens "
              f"{'identical' if row['same_greedy_tokens'] else 'DIFFER'} with and without it")
    ctx.report.add_rows("forward", forward)
    ctx.report.add_rows("generation", generation)
    if forward:
        latency_chart(ctx, forward)
    if generation:
        generation_chart(ctx, generation)
    return {"settings": settings, "forward": forward, "generation": generation, "kv_cache": kv_rows}


# ----------------------------------------------------------------------------------------------- 4. memory


def cuda_peak_reset(device: torch.device) -> None:
    """Start a fresh CUDA peak counter (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, or None off CUDA."""
    return torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None


def model_memory(ctx: cli.Context, spec: dict) -> tuple[dict, list[dict]]:
    """Peak RSS for the load and for one batch-1 forward at each length, then RSS after release (all vs before load)."""
    meter = PerformanceMeter(ctx.device)
    memory.cleanup()
    before = memory.rss_bytes()
    cuda_peak_reset(ctx.device)
    loaded, load_measure = meter.time_load(spec["label"], lambda: load(ctx, spec))
    row = {"model": spec["label"], "architecture": spec["family"], "rss_before_mib": before / MIB,
           "load_s": load_measure.seconds, "load_peak_mib": (load_measure.peak_rss_bytes - before) / MIB,
           "after_load_mib": (load_measure.rss_after_bytes - before) / MIB,
           "load_cuda_peak_mib": cuda_peak_mib(ctx.device)}
    tidy = [{"model": spec["label"], "phase": "load", "peak_rss_delta_mib": row["load_peak_mib"],
             "peak_cuda_mib": row["load_cuda_peak_mib"]}]
    limit = max_positions(loaded.model.config)
    for length in speed_settings(ctx)["seq_lengths"]:
        if limit is not None and length > limit:
            ctx.report.skip(f"memory {spec['label']} length {length}", f"above the model's {limit} positions")
            continue
        inputs = forward_inputs(loaded, spec["kind"], 1, length, ctx.args.seed)
        cuda_peak_reset(ctx.device)
        with memory.PeakRSSSampler() as sampler, torch.inference_mode():
            loaded.model(**inputs)
        row[f"peak_mib@{length}"] = (sampler.peak_bytes - before) / MIB
        row[f"cuda_peak_mib@{length}"] = cuda_peak_mib(ctx.device)
        tidy.append({"model": spec["label"], "phase": f"forward batch 1 x {length}",
                     "peak_rss_delta_mib": row[f"peak_mib@{length}"], "peak_cuda_mib": row[f"cuda_peak_mib@{length}"]})
    del loaded, inputs
    released = memory.cleanup()
    row["after_release_mib"] = (released["rss_after_bytes"] - before) / MIB
    row["rss_after_release_mib"] = released["rss_after_bytes"] / MIB
    return row, tidy


def memory_chart(ctx: cli.Context, rows: list[dict], lengths: list[int]) -> None:
    """Per model: peak during load, peak during the longest forward, and what is left after release."""
    fig, ax = plots.figure("Peak memory per model (process RSS above the level before loading)", "model", "MiB")
    labels = [row["model"] for row in rows]

    def forward_peak(row: dict) -> float:
        return max((row[f"peak_mib@{n}"] for n in lengths if f"peak_mib@{n}" in row), default=0.0)

    series = [("load peak (weights memory-mapped, not read yet)", [row["load_peak_mib"] for row in rows], "#4e79a7"),
              (f"forward peak (highest over {'/'.join(map(str, lengths))} tokens, batch 1)",
               [forward_peak(row) for row in rows], "#f28e2b"),
              ("after release + cleanup()", [row["after_release_mib"] for row in rows], "#76b7b2")]
    for index, (name, values, colour) in enumerate(series):
        drawn = ax.bar([i + (index - 1) * 0.27 for i in range(len(rows))], values, width=0.27, label=name, color=colour)
        ax.bar_label(drawn, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=15)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "peak_memory"))


def memory_section(ctx: cli.Context, specs: list[dict]) -> list[dict]:
    """One model at a time: load, forward at each length, release; the RSS after release shows cleanup works."""
    rows, tidy = [], []
    for spec in specs:
        try:
            row, phases = model_memory(ctx, spec)
        except Exception as error:  # keep the other models' numbers
            ctx.report.skip(f"memory: {spec['label']}", f"{type(error).__name__}: {error}")
            row = None
        if row is None:
            memory.cleanup()  # outside the except block, whose traceback still holds the model
            continue
        rows.append(row)
        tidy += phases
        print(f"  released {spec['label']}: RSS {row['rss_after_release_mib']:.0f} MiB, "
              f"{row['after_release_mib']:+.0f} MiB vs before its load")
    lengths = speed_settings(ctx)["seq_lengths"]
    columns = ["model", "rss_before_mib", "load_s", "load_peak_mib", "after_load_mib",
               *[f"peak_mib@{n}" for n in lengths], "after_release_mib"]
    if ctx.device.type == "cuda":
        columns += ["load_cuda_peak_mib", *[f"cuda_peak_mib@{n}" for n in lengths]]
    print_table(rows, columns, title="Memory (MiB above the RSS just before each load; forward = batch 1):")
    print("safetensors memory-maps the weight file, so a load adds little RSS: the pages come in when the first "
          "forward touches them, which is why the forward peak, not the load, shows the model's size.")
    ctx.report.add_rows("memory", tidy)
    if rows:
        memory_chart(ctx, rows, lengths)
    return rows


# ---------------------------------------------------------------------------------------------- 5. summary


def summary_rows(specs: list[dict], facts: dict | None, speed: dict | None,
                 memory_rows: list[dict] | None) -> list[dict]:
    """One row per model from the sections' measured numbers ('-' where a section or cell did not run)."""
    rows = []
    for spec in specs:
        label = spec["label"]
        fact = next((row for row in (facts or {}).get("facts", []) if row["model"] == label), {})
        forward = next((row for row in (speed or {}).get("forward", [])
                        if row["model"] == label and row["batch"] == 1 and row["seq_len"] == 128), {})
        generated = next((row for row in (speed or {}).get("generation", [])
                          if row["model"] == label and row["kv_cache"]), {})
        used = next((row for row in memory_rows or [] if row["model"] == label), {})
        peaks = [value for key, value in used.items() if key == "load_peak_mib" or key.startswith("peak_mib@")]
        rows.append({"model": label, "architecture": spec["family"],
                     "params_m": fact["params"] / 1e6 if fact else None, "disk_mib": fact.get("disk_mib"),
                     "load_s": used.get("load_s"), "fwd_ms@128": forward.get("p50_ms"),
                     "tokens_per_s": generated.get("tokens_per_s"), "peak_mib": max(peaks) if peaks else None})
    return rows


def same_size_comparison(rows: list[dict]) -> str:
    """Encoder vs the decoder closest in size, forward @128: does the architecture itself change the cost?"""
    timed = [row for row in rows if row["fwd_ms@128"] is not None and row["params_m"] is not None]
    pairs = [(encoder, min((row for row in timed if row["architecture"] == "decoder-only"),
                           key=lambda decoder: abs(decoder["params_m"] - encoder["params_m"]), default=None))
             for encoder in timed if encoder["architecture"] == "encoder-only"]
    pairs = [(encoder, decoder) for encoder, decoder in pairs
             if decoder is not None and abs(decoder["params_m"] - encoder["params_m"]) < 0.25 * encoder["params_m"]]
    def verdict(ratio: float) -> str:
        if 0.8 <= ratio <= 1.25:
            return "at equal size the cost is alike; what differs is what the model can do"
        return f"the encoder is {'faster' if ratio < 1 else 'slower'} at equal size"

    return "".join(f" ({encoder['model']} takes {encoder['fwd_ms@128'] / decoder['fwd_ms@128']:.2f}x the time of "
                   f"the similar-size {decoder['model']}: {verdict(encoder['fwd_ms@128'] / decoder['fwd_ms@128'])})"
                   for encoder, decoder in pairs)


def family_advice(rows: list[dict], kv_rows: list[dict]) -> list[str]:
    """One line per architecture on when to use it, built from this run's numbers."""
    def numbers(family: str, key: str, unit: str) -> str:
        return ", ".join(f"{row['model']} {format_value(row[key])} {unit}" for row in rows
                         if row["architecture"] == family and row[key] is not None) or "not measured"

    speedups = ", ".join(f"{row['speedup']:.1f}x for {row['model']}" for row in kv_rows) or "not measured"
    advice = {
        "encoder-only": "Encoder-only: one pass gives every token a vector that has seen the whole input "
                        f"(bidirectional); forward @128 tokens: {numbers('encoder-only', 'fwd_ms@128', 'ms')}"
                        f"{same_size_comparison(rows)}; it cannot generate. Use it to classify, tag (NER), extract "
                        "answers or embed for search.",
        "decoder-only": "Decoder-only: causal, so it can write one token after another: "
                        f"{numbers('decoder-only', 'tokens_per_s', 'tokens/s')} with the KV cache "
                        f"(cache speed-up {speedups}). Use it for open-ended generation and chat; "
                        f"memory: {numbers('decoder-only', 'peak_mib', 'MiB')}.",
        "encoder-decoder": "Encoder-decoder: reads the input once bidirectionally, then writes causally: "
                           f"{numbers('encoder-decoder', 'tokens_per_s', 'tokens/s')} with the KV cache, "
                           f"memory {numbers('encoder-decoder', 'peak_mib', 'MiB')}. Use it when an input maps to "
                           "a new text: translation, summarisation, any task phrased as text-to-text.",
    }
    return [advice[family] for family in dict.fromkeys(row["architecture"] for row in rows)]


def summary_section(ctx: cli.Context, specs: list[dict], facts: dict | None, speed: dict | None,
                    memory_rows: list[dict] | None) -> dict:
    """The whole comparison in one table, and what the numbers say about when to use each architecture."""
    rows = summary_rows(specs, facts, speed, memory_rows)
    print_table(rows, title="Summary (fwd = batch 1; tokens/s = with KV cache; peak = MiB above pre-load RSS):")
    advice = family_advice(rows, (speed or {}).get("kv_cache", []))
    print()
    for line in advice:
        print(f"- {line}")
    if any(not spec["meaningful"] for spec in specs):
        print("\nTwins have the real architecture and parameter count, so their speed and memory are the real "
              "model's; their outputs are noise.")
    return {"models": rows, "when_to_use": advice}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="roles, catalog names or Hub ids to compare (default: gpt2 bert-base-uncased t5-small "
                             "online; offline also the bundled decoder and encoder)")
    args = parser.parse_args(argv)
    ctx = cli.start(__file__, args)
    specs = plan_models(ctx)
    facts = ctx.report.run_section(
        "1. Architectures", "The seed's table says GPT is decoder-only, BERT encoder-only, T5 encoder-decoder. "
        "Here each model shows it: its structure, a masking experiment, and where its parameters sit.",
        architectures_section, ctx, specs)
    ctx.report.run_section(
        "2. One input, one line each", "Each architecture's natural pipeline: an encoder turns text into vectors "
        "(or fills a blank), a decoder continues a prompt, an encoder-decoder rewrites text into new text.",
        pipelines_section, ctx, specs)
    speed = ctx.report.run_section(
        "3. Speed", "Forward cost grows with sequence length and batch; generation pays per new token, and the KV "
        "cache decides how much. Every number is a median from this run.", speed_section, ctx, specs)
    memory_rows = ctx.report.run_section(
        "4. Memory", "The seed says memory use differs by architecture: here it is measured, one model at a time, "
        "with the RSS after each release to show cleanup() gives the memory back.", memory_section, ctx, specs)
    ctx.report.run_section(
        "5. Summary", "Everything above in one row per model, and when to reach for each architecture.",
        summary_section, ctx, specs, facts, speed, memory_rows)
    return ctx.report.finish()


if __name__ == "__main__":
    cli.run(main)
