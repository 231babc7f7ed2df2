#!/usr/bin/env python3
"""01 · AutoTokenizer, AutoModel and pipeline(): how text becomes ids, ids become vectors, and what the
pipeline convenience costs. Tokenise and decode, run the encoder by hand, do the same with pipeline(),
check both paths agree and time them, then build custom pipelines on preprocess/_forward/postprocess."""

import os
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import common  # noqa: F401  (first: it quiets torchao's import-time warnings; see common/__init__.py)
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, Pipeline, pipeline, set_seed
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.base import pad_collate_fn

from common import cli, memory, models, pipelines, plots, texts
from common.meter import Comparison, PerformanceMeter, median_ci
from common.report import console_cell, format_value, print_table, say


@dataclass(frozen=True)
class Settings:
    """What a full run and a --quick run do differently; timing budgets come from ctx.meter()."""

    generation_tokens: int    # text-generation demo
    text_to_text_tokens: int  # custom text-to-text pipeline
    warmup: int               # untimed calls per workload first: the first call pays one-off set-up costs


FULL = Settings(generation_tokens=20, text_to_text_tokens=16, warmup=2)
QUICK = Settings(generation_tokens=8, text_to_text_tokens=6, warmup=1)

THROUGHPUT_TEXTS = 1_000            # the same texts go through single calls and one batched call
BATCH_SIZES = (1, 8, 32)            # manual vs pipeline sweep
PIPELINE_BATCH_SIZE = 8             # used where a single batch size is enough (agreement check)
EMBEDDING_TOLERANCE = 1e-4          # float32 sums in a different order differ by ~1e-6; 1e-4 still catches bugs
PADDING_DEMO_MAX_LENGTH = 12        # small on purpose, so truncation is visible in the printed ids
MAX_USER_TEXTS_SHOWN = 8            # more user texts are ignored: tables and the heat-map stay readable

WALKTHROUGH_TEXT = "Hello, Transformers! Tokenizers split words."
PADDING_DEMO_TEXTS = [
    "Short text.",
    "A somewhat longer sentence about tokenizers.",
    "This third sentence is long enough that truncation at twelve tokens cuts it.",
]
OFFSETS_DEMO_TEXT = "Bugün İstanbul'da çay içtik."
EDGE_CASES = [  # (what it shows, text); the over-long one is built from SENTENCES at run time
    ("English", "Tokenizers split words into subwords."),
    ("Turkish", "Bugün İstanbul'da çay içtik, hava çok güzeldi."),
    ("Mixed + accents", "Café naïve résumé: Ünlü şarkıcı geldi."),
    ("Emoji", "Great job 🤗🚀!"),
    ("Empty string", ""),
]
OVERLONG_REPEATS = 40               # 40 x 12 sentences is ~6,000 tokens, far past the encoder's 512
SIMILARITY_TEXTS = [                # two related pairs: (0, 1) and (2, 3); every cross pair is unrelated
    "The cat slept on the warm windowsill all afternoon.",
    "A kitten napped in the sunshine by the window.",
    "The train was delayed by twenty minutes because of the snow.",
    "Heavy snowfall made the railway service run late.",
]
RELATED_PAIRS = [(0, 1), (2, 3)]
UNRELATED_PAIRS = [(0, 2), (0, 3), (1, 2), (1, 3)]
SENTIMENT_CHECKS = [                # clear cases with the label any sentiment model should give
    ("The film was a delight from start to finish.", "POSITIVE"),
    ("Absolutely brilliant service, thank you!", "POSITIVE"),
    ("The update made my phone slow and buggy.", "NEGATIVE"),
    ("Worst purchase I have made this year.", "NEGATIVE"),
]
GENERATION_PROMPT = "The three most useful things about tokenizers are"
TEXT_TO_TEXT_INPUT = "Tokenizers turn text into ids, the model turns ids into vectors, and pooling makes one vector."
SPECIAL_TOKEN_PURPOSE = {
    "cls_token": "starts a text",
    "sep_token": "ends one or splits a pair",
    "pad_token": "fills a batch (mask 0)",
    "unk_token": "stands for unknown characters",
    "mask_token": "hides a word in pre-training",
    "bos_token": "begins a sequence",
    "eos_token": "ends a sequence; generation stops here",
}
VERDICT_TITLE = {"faster": "faster", "slower": "slower", "negligible": "within +-3%",  # chart-title words
                 "same": "no measurable difference", "inconclusive": "inconclusive"}


# --------------------------------------------------------------------------------------- 1. tokenizer


def tokenizer_section(ctx: cli.Context, s: Settings, user_texts: list[str]) -> dict:
    """Models read integer ids, not text: see what the tokenizer keeps, drops and pads,
    and whether one batched call is faster than many single ones."""
    where = models.checkpoint("encoder", ctx.source)
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    say(f"[tokenizer] {where.name}  source={where.source} ({where.origin})\n")

    encoded = tokenizer(WALKTHROUGH_TEXT)
    print(f"text:           {WALKTHROUGH_TEXT!r}")
    print(f"tokens:         {encoded.tokens()}")
    print(f"input_ids:      {encoded['input_ids']}")
    print(f"attention_mask: {encoded['attention_mask']}   (1 = a real token the model attends to)")
    print(f"decode:         {tokenizer.decode(encoded['input_ids'])!r}")
    print(f"decode(skip_special_tokens=True): {tokenizer.decode(encoded['input_ids'], skip_special_tokens=True)!r}")
    special = [{"attribute": name, "token": getattr(tokenizer, name), "id": getattr(tokenizer, f"{name}_id"),
                "purpose": purpose}
               for name, purpose in SPECIAL_TOKEN_PURPOSE.items() if getattr(tokenizer, name, None)]
    say("special tokens: " + ", ".join(f"{row['token']} {row['id']} {row['purpose']}" for row in special))

    batch = tokenizer(PADDING_DEMO_TEXTS, padding=True, truncation=True, max_length=PADDING_DEMO_MAX_LENGTH,
                      return_tensors="pt")
    untruncated = [len(ids) for ids in tokenizer(PADDING_DEMO_TEXTS)["input_ids"]]
    print(f"\n{len(PADDING_DEMO_TEXTS)} texts, padding=True, truncation=True, max_length={PADDING_DEMO_MAX_LENGTH}, "
          f"return_tensors='pt' -> input_ids {tuple(batch['input_ids'].shape)} and attention_mask:")
    for ids, mask, total in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), untruncated):
        cut = f"  ({total} tokens, truncated)" if total > PADDING_DEMO_MAX_LENGTH else ""
        print(f"  {str(ids):<74} {''.join(map(str, mask))}{cut}")

    offsets = tokenizer(OFFSETS_DEMO_TEXT, return_offsets_mapping=True)
    spans = [f"{token}={OFFSETS_DEMO_TEXT[start:end]}"
             for token, (start, end) in zip(offsets.tokens(), offsets["offset_mapping"]) if end > start]
    say(f"\nreturn_offsets_mapping=True: each token's characters in {OFFSETS_DEMO_TEXT!r}: {'  '.join(spans)}")

    cases = EDGE_CASES + [("Over-long", " ".join(texts.SENTENCES * OVERLONG_REPEATS))]
    cases += [(f"--text {i + 1}", text) for i, text in enumerate(user_texts)]
    round_trip = [round_trip_row(tokenizer, label, text) for label, text in cases]
    print_table(round_trip, ["case", "text", "tokens", "kept", "same_after_norm", "lost"],
                title=f"Round trip decode(encode(text, truncation=True)): kept = tokens the model reads (at most "
                      f"{tokenizer.model_max_length}); same_after_norm = equal to the text after the normaliser "
                      "(lower-casing, accent stripping), spaces aside")
    return {"walkthrough": {"text": WALKTHROUGH_TEXT, "tokens": encoded.tokens(), "input_ids": encoded["input_ids"]},
            "special_tokens": special, "padded_batch_shape": list(batch["input_ids"].shape),
            "max_tokens": tokenizer.model_max_length, "round_trip": round_trip,
            **tokenisation_throughput(ctx, s, tokenizer)}


def round_trip_row(tokenizer: Any, label: str, text: str) -> dict:
    """Encode with truncation, decode, and say whether the text came back (exactly, or up to normalisation)."""
    ids = tokenizer(text, truncation=True)["input_ids"]
    total = len(tokenizer(text, verbose=False)["input_ids"])
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    normaliser = tokenizer.backend_tokenizer.normalizer  # lower-casing, accent stripping, ... before splitting
    normalised = normaliser.normalize_str(text) if normaliser else text
    return {"case": label, "text": texts.shorten(text, 18), "chars": len(text), "tokens": total, "kept": len(ids),
            "exact": decoded == text,
            "same_after_norm": "".join(decoded.split()) == "".join(normalised.split()),
            "lost": texts.round_trip_losses(text, decoded, ids.count(tokenizer.unk_token_id), total > len(ids))}


def tokenisation_throughput(ctx: cli.Context, s: Settings, tokenizer: Any) -> dict:
    """The same texts as single calls, one batched call, and one batched call padded into a tensor, round-robin."""
    corpus = texts.mixed_length_corpus(THROUGHPUT_TEXTS, seed=ctx.args.seed)
    lengths = [len(ids) for ids in tokenizer(corpus, truncation=True)["input_ids"]]
    single, batched = f"{THROUGHPUT_TEXTS:,} single calls", "one batched call"
    comparison = ctx.meter(warmup=s.warmup).compare({
        single: lambda: [tokenizer(text, truncation=True) for text in corpus],
        batched: lambda: tokenizer(corpus, truncation=True),
        "one batched call, padded tensor": lambda: tokenizer(corpus, padding=True, truncation=True,
                                                             return_tensors="pt"),
    }, items=THROUGHPUT_TEXTS, tokens=sum(lengths), progress="tokenisation")
    rows = ctx.show(comparison, single, f"Tokenising the same {THROUGHPUT_TEXTS:,} texts ({sum(lengths):,} tokens)")

    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset, so on")
    verdict = comparison.verdict(batched, single)
    if verdict == "faster":
        say(f"Why: one call into Rust instead of {THROUGHPUT_TEXTS:,}, split over threads (TOKENIZERS_PARALLELISM: "
            f"{parallelism}).")
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))
    say(f"The padded tensor is {max(lengths)} tokens wide for every text, {padding:.0%} of it padding: dynamic "
        "padding (lesson 03) pads each small batch only to its own longest text.")
    plot_tokenisation_throughput(ctx, rows)
    return {"throughput": rows, "tokenizers_parallelism": parallelism, "batched_verdict": verdict}


# --------------------------------------------------------------------------------------- 2. AutoModel


def automodel_section(ctx: cli.Context, s: Settings, user_texts: list[str]) -> dict:
    """tokenizer -> model -> vectors, step by step: the shape of the output
    and how pooling turns token vectors into one sentence vector."""
    where = models.checkpoint("encoder", ctx.source)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    model = AutoModel.from_pretrained(where.path, dtype=torch.float32, device_map=ctx.device)
    ctx.record(where.info(model, time.perf_counter() - started))
    sentences = SIMILARITY_TEXTS + user_texts
    texts.report_truncation(tokenizer, sentences)

    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():  # no autograd graph is recorded: inference needs no gradients
        hidden = model(**batch).last_hidden_state
    say(f"last_hidden_state {tuple(hidden.shape)}: texts x token positions (longest text; others padded) x hidden_size")

    # Mean pooling: average only the real tokens; the mask zeroes the padding rows before summing.
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    naive = hidden.mean(dim=1)  # what you get if you forget the mask
    padded_rows = int((batch["attention_mask"] == 0).any(dim=1).sum())
    mask_effect = float((pooled - naive).abs().max())
    say(f"mean pooling (average over a text's real tokens) -> {tuple(pooled.shape)}; averaging padding too moves "
        f"the {padded_rows} padded texts' vectors by up to {mask_effect:.3f}")

    unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
    similarity = (unit @ unit.T).cpu()
    labels = [f"S{i + 1}" for i in range(len(sentences))]
    print_table([{"": label, "text": texts.shorten(text, 40), **{other: float(similarity[i, j])
                                                                  for j, other in enumerate(labels)}}
                 for i, (label, text) in enumerate(zip(labels, sentences))],
                title="Cosine similarity of the pooled vectors (1 = same direction, 0 = unrelated)")
    related = [float(similarity[i, j]) for i, j in RELATED_PAIRS]
    unrelated = [float(similarity[i, j]) for i, j in UNRELATED_PAIRS]
    ordering_ok = min(related) > max(unrelated)
    pairs = ", ".join(f"{labels[i]}-{labels[j]}" for i, j in RELATED_PAIRS)
    say(f"every related pair ({pairs}) beats every unrelated one by at least {min(related) - max(unrelated):.3f}"
        if ordering_ok else "WARNING: an unrelated pair scores as high as a related one")
    plot_similarity_heatmap(ctx, similarity, labels, sentences)
    return {"hidden_shape": list(hidden.shape), "sentences": [texts.shorten(text, 60) for text in sentences],
            "similarity": similarity.numpy(), "related": related, "unrelated": unrelated,
            "related_min": min(related), "unrelated_max": max(unrelated), "ordering_ok": ordering_ok,
            "mask_effect_max_abs": mask_effect}


# ---------------------------------------------------------------------------------------- 3. pipeline()


def pipeline_section(ctx: cli.Context, s: Settings, user_texts: list[str]) -> dict:
    """The same jobs in one line each: the pipeline hides tokenising,
    batching and decoding."""
    encoder = ctx.load("encoder")
    extractor = pipeline("feature-extraction", model=encoder.model, tokenizer=encoder.tokenizer,
                         device=encoder.model.device)
    features = extractor(SIMILARITY_TEXTS[0], return_tensors=True)
    padded = extractor(PADDING_DEMO_TEXTS[:2], batch_size=2, return_tensors=True)
    own = [len(ids) for ids in encoder.tokenizer(PADDING_DEMO_TEXTS[:2])["input_ids"]]
    say(f'pipeline("feature-extraction") returns token vectors: {tuple(features.shape)} for one text. With '
        f"batch_size=2, texts of {own[0]} and {own[1]} tokens both get {padded[0].shape[1]} rows: pool a text's own "
        "only.")

    clf, info = sentiment_classifier(ctx)
    inputs = [text for text, _ in SENTIMENT_CHECKS] + user_texts
    texts.report_truncation(clf.tokenizer, inputs)
    predictions = clf(inputs, truncation=True)
    expected = [label for _, label in SENTIMENT_CHECKS] + [None] * (len(inputs) - len(SENTIMENT_CHECKS))
    rows = [{"text": texts.shorten(text, 44), "label": p["label"], "score": p["score"], "expected": want or "-"}
            for text, p, want in zip(inputs, predictions, expected)]
    correct = sum(p["label"] == want for p, want in zip(predictions, expected) if want)
    stand_in = "" if info.source == "hub" else " (stand-in: nearest examples, not fine-tuned)"
    print_table(rows, title=f'pipeline("text-classification"), {info.label}{stand_in}: '
                            f"{correct}/{len(SENTIMENT_CHECKS)} clear-cut ones right")

    generation = generation_demo(ctx, s)
    return {"feature_shape": list(features.shape), "padded_rows": [f.shape[1] for f in padded], "own_tokens": own,
            "classifier_source": info.source, "classifier": info.name, "sentiment": rows,
            "sentiment_correct": correct, "sentiment_checked": len(SENTIMENT_CHECKS), **generation}


def sentiment_classifier(ctx: cli.Context) -> tuple[Any, models.ModelInfo]:
    """pipeline("text-classification") with the SST-2 DistilBERT when the Hub has it, built once per run; offline
    the bundled stand-in (MiniLM plus the nearest example sentences: common.models.load_classifier)."""
    if not models.use_hub(models.CATALOG["distilbert-sst2"].hub_id, ctx.source):
        return ctx.classifier()
    loaded = ctx.load("classifier")
    classifier = ctx.once(("text-classification", str(ctx.device)), lambda: pipeline(
        "text-classification", model=loaded.model, tokenizer=loaded.tokenizer, device=loaded.model.device))
    return classifier, loaded.info


def generation_demo(ctx: cli.Context, s: Settings) -> dict:
    """pipeline("text-generation") loads the decoder by itself; greedy once, then sampling twice with one seed."""
    where = models.checkpoint("decoder", ctx.source)
    generator = ctx.record_load(where, lambda: pipeline("text-generation", model=where.path, dtype=torch.float32,
                                                        device_map=ctx.device))
    models.prepare_tokenizer(generator.tokenizer, generator.model)  # GPT-2 ships without a pad token
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    generations = []
    for mode, kwargs in [("greedy", {"do_sample": False}), (f"sampled, seed {ctx.args.seed}", sampling),
                         (f"sampled, seed {ctx.args.seed} again", sampling)]:
        set_seed(ctx.args.seed)  # sampling draws from torch's RNG: the same seed gives the same text
        text = generator(GENERATION_PROMPT, max_new_tokens=s.generation_tokens, return_full_text=False,
                         **kwargs)[0]["generated_text"]
        generations.append({"mode": mode, "continuation": text})
    reproducible = generations[1]["continuation"] == generations[2]["continuation"]
    say(f'\npipeline("text-generation") with {where.label}, max_new_tokens={s.generation_tokens}, prompt '
        f"{GENERATION_PROMPT!r}; same seed, same text: {'yes' if reproducible else 'NO'} (02 times generation)")
    for row in generations:
        if not where.meaningful:  # a twin's text is noise: kept out of the output and the report
            row["continuation"] = None
        text = repr(row["continuation"]) if where.meaningful else "(twin: random weights, text not shown)"
        print(f"  {row['mode']:<22} {textwrap.shorten(text, 94, placeholder='...')}")
    return {"generation": generations, "generation_meaningful": where.meaningful,
            "sampling_reproducible": reproducible, "new_tokens": s.generation_tokens}


# ---------------------------------------------------------------------------------- 4. manual vs pipeline


def manual_vs_pipeline_section(ctx: cli.Context, s: Settings, user_texts: list[str]) -> dict:
    """Convenience should not change answers; it may cost time.
    Both are checked here, on the same inputs."""
    encoder = ctx.load("encoder")
    extractor = pipeline("feature-extraction", model=encoder.model, tokenizer=encoder.tokenizer,
                         device=encoder.model.device)
    agreement = check_agreement(ctx, encoder, extractor, user_texts)

    meter = ctx.meter(warmup=s.warmup)
    comparisons: dict[int, Comparison] = {}
    timings = []
    for batch_size in tqdm(BATCH_SIZES, desc="manual vs pipeline", disable=None):
        batch_texts = texts.repeated_sentences(batch_size)
        counts = [len(ids) for ids in encoder.tokenizer(batch_texts)["input_ids"]]
        comparisons[batch_size] = meter.compare({
            "manual": lambda: manual_embeddings(encoder, batch_texts),
            "pipeline": lambda: pipeline_embeddings(extractor, batch_texts, counts, batch_size),
        }, items=batch_size, tokens=sum(counts))
        timings += ctx.show(comparisons[batch_size], "manual",
                            f"Embedding {batch_size} text{'s' * (batch_size > 1)}: manual (one batched call) vs "
                            f"pipeline(batch_size={batch_size})", extra=dict.fromkeys(
                                ("manual", "pipeline"), {"batch": batch_size}))
    ratios = {batch: comparison.ratio("pipeline", "manual") for batch, comparison in comparisons.items()}
    small, large = min(BATCH_SIZES), max(BATCH_SIZES)
    # the pipeline's speed as a share of manual's: a fixed per-call cost shows as a lower share at small batches
    shrinks = (comparisons[small].verdict("pipeline", "manual") == "slower"
               and ratios[small][2] < ratios[large][1])
    if shrinks:
        say(f"The pipeline's relative cost is larger at batch {small} than at {large} (intervals apart): a fixed "
            "per-call cost weighs most when the forward pass is short.")

    breakdown = overhead_breakdown(ctx, s, encoder, extractor, comparisons[large])
    plot_manual_vs_pipeline(ctx, timings, comparisons)
    return {**agreement, "timings": timings, "cost_shrinks": shrinks, **breakdown,
            "pipeline_ratio": {str(batch): ratio[0] for batch, ratio in ratios.items()}}


def check_agreement(ctx: cli.Context, encoder: models.LoadedModel, extractor: Any,
                    user_texts: list[str]) -> dict:
    """Embeddings and classifier labels, by hand and by pipeline, must agree number for number (else raise)."""
    sentences = texts.SENTENCES + user_texts
    texts.report_truncation(encoder.tokenizer, sentences)
    token_counts = [len(ids) for ids in encoder.tokenizer(sentences, truncation=True)["input_ids"]]
    manual = manual_embeddings(encoder, sentences)
    piped = pipeline_embeddings(extractor, sentences, token_counts, PIPELINE_BATCH_SIZE)
    max_diff = float((manual - piped).abs().max())
    if not max_diff <= EMBEDDING_TOLERANCE:
        raise AssertionError(f"manual and pipeline embeddings differ by {max_diff:.2e} > {EMBEDDING_TOLERANCE:.0e}")

    clf, info = sentiment_classifier(ctx)
    by_hand = manual_labels(clf, sentences)
    by_pipeline = [p["label"] for p in clf(sentences, batch_size=PIPELINE_BATCH_SIZE, truncation=True)]
    mismatches = [(texts.shorten(t), a, b) for t, a, b in zip(sentences, by_hand, by_pipeline) if a != b]
    say(f"{len(sentences)} texts, manual vs pipeline(batch_size={PIPELINE_BATCH_SIZE}): embedding gap {max_diff:.1e} "
        f"(limit {EMBEDDING_TOLERANCE:.0e}), labels {len(sentences) - len(mismatches)}/{len(sentences)} equal")
    if mismatches:
        raise AssertionError(f"labels differ between manual and pipeline paths: {mismatches}")
    return {"texts_compared": len(sentences), "embedding_max_abs_diff": max_diff, "tolerance": EMBEDDING_TOLERANCE,
            "embeddings_agree": True, "labels_agree": True, "labels": by_pipeline}


def manual_embeddings(encoder: models.LoadedModel, sentences: list[str]) -> torch.Tensor:
    """One batched call: tokenise all texts together, one forward pass, masked mean pooling."""
    batch = encoder.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(encoder.model.device)
    with torch.inference_mode():
        hidden = encoder.model(**batch).last_hidden_state
    return pipelines.mean_pool(hidden, batch["attention_mask"]).cpu()


def pipeline_embeddings(extractor: Any, sentences: list[str], token_counts: list[int], batch_size: int) -> torch.Tensor:
    """feature-extraction with batch_size=, then each text pooled over its own tokens (not its batch's padding)."""
    features = extractor(sentences, batch_size=batch_size, return_tensors=True, truncation=True)
    return torch.cat([f[0, :n].mean(dim=0, keepdim=True) for f, n in zip(features, token_counts)])


def manual_labels(clf: Any, sentences: list[str]) -> list[str]:
    """The classifier's decision computed by hand from its model: prototypes for the stand-in, logits for SST-2."""
    batch = clf.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(clf.model.device)
    with torch.inference_mode():
        output = clf.model(**batch)
    if isinstance(clf, pipelines.EmbeddingClassificationPipeline):  # offline stand-in: nearest label prototype
        pooled = torch.nn.functional.normalize(pipelines.mean_pool(output.last_hidden_state,
                                                                   batch["attention_mask"]).float(), dim=-1)
        return [clf.labels[i] for i in (pooled @ clf.prototypes.to(pooled.device).T).argmax(dim=-1).tolist()]
    return [clf.model.config.id2label[i] for i in output.logits.argmax(dim=-1).tolist()]


def overhead_breakdown(ctx: cli.Context, s: Settings, encoder: models.LoadedModel, extractor: Any,
                       whole: Comparison) -> dict:
    """What the pipeline does differently before the model, on the largest batch: it tokenises each text on its own
    and pads the items into a batch (collate); manual tokenises all texts in one call."""
    largest, tokenizer = max(BATCH_SIZES), encoder.tokenizer
    batch_texts = texts.repeated_sentences(largest)
    collate = pad_collate_fn(tokenizer, None)  # what the pipeline's DataLoader uses to stack items into a batch
    items = [extractor.preprocess(text, truncation=True) for text in batch_texts]
    if not torch.equal(collate(items)["input_ids"],
                       tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt")["input_ids"]):
        raise AssertionError("the pipeline's collated batch differs from the manual batch")
    per_text, batched = "per text + collate", "one batched call"
    parts = ctx.meter(warmup=s.warmup).compare({
        batched: lambda: tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt"),
        per_text: lambda: collate([extractor.preprocess(text, truncation=True) for text in batch_texts]),
    }, items=largest)
    ctx.show(parts, batched, f"Tokenising {largest} texts before the model: the pipeline's way (one tokenizer call "
                             "per text, then collate pads them into a batch) vs manual's, the same input_ids")
    # The whole-call difference, paired by round, has an interval; what tokenising explains is subtracted from
    # both ends, and the rest counts as noise only if that interval still includes zero.
    _, low, high = (1e3 * seconds for seconds in whole.difference("pipeline", "manual"))
    explained = parts.measurements[per_text].median_ms - parts.measurements[batched].median_ms
    rest = (low - explained, high - explained)
    say(f"What the pipeline's whole call adds at batch {largest} beyond its tokenising ({explained:+.1f} ms): "
        f"{rest[0]:+.1f} to {rest[1]:+.1f} ms (paired interval), " + (
            "within this run's noise." if rest[0] <= 0 <= rest[1] else
            "the rest of the call: forward, DataLoader loop, unbatching, postprocess."))
    return {"tokenising_parts": parts.rows(baseline=batched), "tokenising_explains_ms": explained,
            "rest_interval_ms": rest}


# -------------------------------------------------------------------------------------- 5. custom pipelines


class SentenceSimilarityPipeline(Pipeline):
    """{"text": a, "text_pair": b} -> {"score": cosine similarity of their mean-pooled embeddings}.

    A pipeline call runs _sanitize_parameters (which call kwargs go to which stage), then preprocess (Python, CPU),
    _forward (the model, on its device, under no_grad) and postprocess (tensors back to Python values).
    """

    _load_tokenizer = True  # pipeline() then loads the tokenizer with the model when given only a path

    def _sanitize_parameters(self, **kwargs: Any):
        return {}, {}, {}  # kwargs for preprocess, _forward, postprocess: this task takes none

    def preprocess(self, inputs: dict[str, str]) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, dict) or not {"text", "text_pair"} <= inputs.keys():
            raise ValueError('sentence-similarity takes {"text": ..., "text_pair": ...}')
        return self.tokenizer([inputs["text"], inputs["text_pair"]], padding=True, truncation=True, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = self.model(**model_inputs).last_hidden_state
        return {"embeddings": pipelines.mean_pool(hidden, model_inputs["attention_mask"])}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        first, second = model_outputs["embeddings"].float()
        return {"score": torch.nn.functional.cosine_similarity(first, second, dim=0).item()}


def custom_pipelines_section(ctx: cli.Context, s: Settings) -> dict:
    """A new task plugs into pipeline() as preprocess (Python, CPU) -> _forward (the model, on its device) ->
    postprocess; the split lets a pipeline batch the model step on its own. Each stage is timed."""
    # Registering gives the pipeline function a new task name; pt_model: the Auto class it loads a model path with.
    PIPELINE_REGISTRY.register_pipeline("sentence-similarity", pipeline_class=SentenceSimilarityPipeline,
                                        pt_model=AutoModel, type="text")
    encoder = ctx.load("encoder")
    similarity = pipeline(task="sentence-similarity", model=encoder.model, tokenizer=encoder.tokenizer,
                          device=encoder.model.device)
    reference = pipelines.embed(encoder.model, encoder.tokenizer, SIMILARITY_TEXTS)
    scores = [{"pair": f"S{i + 1}-S{j + 1}", "kind": kind,
               "score": similarity({"text": SIMILARITY_TEXTS[i], "text_pair": SIMILARITY_TEXTS[j]})["score"],
               "by_hand": float(reference[i] @ reference[j])}
              for kind, pairs in [("related", RELATED_PAIRS), ("unrelated", UNRELATED_PAIRS)] for i, j in pairs]
    ordering_ok = (min(row["score"] for row in scores if row["kind"] == "related")
                   > max(row["score"] for row in scores if row["kind"] == "unrelated"))
    agreement = max(abs(row["score"] - row["by_hand"]) for row in scores)
    say(f"sentence-similarity, {len(scores)} pairs of section 2: related > unrelated: "
        f"{'yes' if ordering_ok else 'NO'}; gap to by-hand cosine {agreement:.1e}")

    where = models.checkpoint("seq2seq", ctx.source)
    text_to_text = ctx.record_load(where, lambda: pipeline(task=pipelines.TEXT_TO_TEXT, model=where.path,
                                                           dtype=torch.float32, device_map=ctx.device))
    t2t_kwargs = {"prefix": "summarize: ", "max_new_tokens": s.text_to_text_tokens}
    output = text_to_text(TEXT_TO_TEXT_INPUT, **t2t_kwargs)
    new_tokens = output["output_tokens"] - 1  # generate's output ids start with the decoder start token
    say(f'pipeline(task="text-to-text") with {where.label}: {new_tokens} new tokens (max_new_tokens='
        f"{s.text_to_text_tokens}) after the decoder start token" + (
            f"; summary: {output['generated_text']!r}" if where.meaningful else
            "; a twin has random weights: its text is noise and is not shown"))

    meter = ctx.meter(warmup=s.warmup)
    similarity_stages, similarity_glue = time_stages(meter, similarity, "sentence-similarity",
                                                     {"text": SIMILARITY_TEXTS[0], "text_pair": SIMILARITY_TEXTS[1]})
    t2t_stages, t2t_glue = time_stages(meter, text_to_text, "text-to-text", TEXT_TO_TEXT_INPUT, **t2t_kwargs)
    stages = similarity_stages + t2t_stages
    ctx.report.add_rows(ctx.report.current, stages)
    print_table([{"pipeline": name, **{row["stage"]: console_cell(row, "p50_ms") for row in rows},
                  "forward_pct": next(row["share_pct"] for row in rows if row["stage"] == "_forward")}
                 for name, rows in [("sentence-similarity", similarity_stages), ("text-to-text", t2t_stages)]],
                title="Median ms per stage, round-robin; forward_pct = _forward / the three stages' sum")
    say(f"glue = whole call minus its three stages, per round: {similarity_glue}; {t2t_glue}")
    return {"similarity_scores": scores, "ordering_ok": ordering_ok, "max_diff_vs_manual": agreement,
            "text_to_text": {"model": where.label, "source": where.source, "meaningful": where.meaningful,
                             "output_tokens": output["output_tokens"], "new_tokens": new_tokens},
            "stages": stages, "glue": [similarity_glue, t2t_glue]}


def time_stages(meter: PerformanceMeter, pipe: Any, name: str, item: Any, **call_kwargs: Any) -> tuple[list[dict], str]:
    """Time preprocess, forward (_forward with device moves and no_grad), postprocess and the whole call round-robin;
    the rows, and what the call adds around its stages (the glue), judged round by round."""
    pre_params, forward_params, post_params = pipe._sanitize_parameters(**call_kwargs)  # routes each kwarg
    model_inputs = pipe.preprocess(item, **pre_params)
    model_outputs = pipe.forward(model_inputs, **forward_params)
    stages = meter.compare({
        "preprocess": lambda: pipe.preprocess(item, **pre_params),
        "_forward": lambda: pipe.forward(model_inputs, **forward_params),
        "postprocess": lambda: pipe.postprocess(model_outputs, **post_params),
        "whole call": lambda: pipe(item, **call_kwargs),
    }, progress=f"{name} stages").measurements
    # shares of a total they fit in: the whole call, timed in its own turn, can come out below the sum of its stages
    total = sum(m.stats.median for stage, m in stages.items() if stage != "whole call")
    rows = [{**m.row(pipeline=name, stage=stage),
             "share_pct": None if stage == "whole call" else 100 * m.stats.median / total}
            for stage, m in stages.items()]
    seconds = {stage: np.asarray(m.samples_s) for stage, m in stages.items()}  # one sample per round each
    glue = np.sort(seconds.pop("whole call") - sum(seconds.values())) * 1e3
    low, high, coverage = median_ci(glue)
    interval = f"[{format_value(low)} to {format_value(high)} ms" + (
        f", {coverage:.0%} interval]" if coverage < 0.95 else "]")
    return rows, f"{name} " + (f"{format_value(float(np.median(glue)))} ms" if low > 0 else "none measurable") + \
        f" {interval}"


# ------------------------------------------------------------------------------------------------ charts


def plot_tokenisation_throughput(ctx: cli.Context, rows: list[dict]) -> None:
    """Texts per second of each way to tokenise, labelled with its speed-up over single calls and its interval."""
    batched = next(row for row in rows if row["workload"] == "one batched call")
    fig, ax = plots.figure(f"One batched call: {batched['speedup']:.2f}x [{batched['speedup_low']:.2f}-"
                           f"{batched['speedup_high']:.2f}] the texts/s of {THROUGHPUT_TEXTS:,} single calls "
                           f"({batched['verdict']})", "texts per second (median)", "")
    speeds = [row["items_per_s"] for row in rows]
    ax.barh([row["workload"] for row in rows], speeds, color=["#b0b0b0", "#1f77b4", "#2ca02c"])
    for y, row in enumerate(rows):
        note = "baseline" if row["verdict"] == "baseline" else (
            f"{row['speedup']:.2f}x [{row['speedup_low']:.2f}-{row['speedup_high']:.2f}] {row['verdict']}")
        ax.text(row["items_per_s"], y, f"  {note}", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(speeds) * 1.6)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "tokenisation_throughput"))


def plot_similarity_heatmap(ctx: cli.Context, similarity: torch.Tensor, labels: list[str],
                            sentences: list[str]) -> None:
    """The cosine-similarity matrix as a heat-map with the values written in."""
    fig, ax = plots.figure("Related sentences score higher (cosine similarity)", "sentence", "sentence",
                           size=(6.5 + 0.4 * len(sentences), 5 + 0.3 * len(sentences)))
    plots.annotated_heatmap(fig, ax, similarity.numpy(), labels,
                            [f"{label}: {texts.shorten(text, 22)}" for label, text in zip(labels, sentences)],
                            "cosine similarity")
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "similarity_heatmap"))


def pipeline_finding(verdicts: dict[int, str]) -> str:
    """The pipeline's verdict against manual per batch size, sizes with one verdict grouped: a chart title."""
    grouped: dict[str, list[str]] = {}
    for batch, verdict in verdicts.items():
        grouped.setdefault(verdict, []).append(str(batch))
    return "; ".join(f"{VERDICT_TITLE[verdict]} at batch {', '.join(sizes)}" for verdict, sizes in grouped.items())


def plot_manual_vs_pipeline(ctx: cli.Context, timings: list[dict], comparisons: dict[int, Comparison]) -> None:
    """Median time per text against batch size for both paths; the title is the pipeline's verdict per batch size."""
    finding = pipeline_finding({batch: c.verdict("pipeline", "manual") for batch, c in comparisons.items()})
    fig, ax = plots.figure(f"pipeline() vs manual, time per text: {finding}", "batch size (texts per call)",
                           "median time per text (ms)")
    for path, colour in [("manual", "#1f77b4"), ("pipeline", "#ff7f0e")]:
        rows = [row for row in timings if row["workload"] == path]
        ax.errorbar([r["batch"] for r in rows], [r["p50_ms"] / r["batch"] for r in rows],
                    yerr=[[(r["p50_ms"] - r["ci95_low_ms"]) / r["batch"] for r in rows],
                          [(r["ci95_high_ms"] - r["p50_ms"]) / r["batch"] for r in rows]],
                    marker="o", capsize=4, color=colour, label=path)
    plots.log2_x(ax, BATCH_SIZES)
    ax.set_ylim(bottom=0)
    plots.legend_outside(ax, "bars: the median's interval")
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "manual_vs_pipeline_latency"))


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    cli.add_text_options(parser)
    args = parser.parse_args(argv)
    given = cli.read_user_texts(args) or []
    ctx = cli.start(__file__, args)
    s = ctx.pick(FULL, QUICK)
    if given:
        print(f"your texts: {len(given)}" + (f" (the lesson uses the first {MAX_USER_TEXTS_SHOWN})"
                                             if len(given) > MAX_USER_TEXTS_SHOWN else ""))
    for title, section in [("1. Tokenizer encode/decode", tokenizer_section),
                           ("2. AutoModel by hand", automodel_section), ("3. pipeline()", pipeline_section),
                           ("4. Manual vs pipeline", manual_vs_pipeline_section)]:
        ctx.report.run_section(title, section.__doc__, section, ctx, s, given[:MAX_USER_TEXTS_SHOWN])
    ctx.report.run_section("5. Custom pipelines", custom_pipelines_section.__doc__, custom_pipelines_section, ctx, s)
    memory.cleanup()
    return ctx.finish()


if __name__ == "__main__":
    cli.run(main)
