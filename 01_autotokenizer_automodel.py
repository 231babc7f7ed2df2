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
from common.report import print_table, say


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
PADDING_DEMO_MAX_LENGTH = 12        # small on purpose, so truncation is visible in the printed tensor
MAX_USER_TEXTS_SHOWN = 8            # more user texts are ignored: tables and the heat-map stay readable

WALKTHROUGH_TEXT = "Hello, Transformers! Tokenizers split words into subwords."
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
    "cls_token": "starts every text; classifiers read its vector",
    "sep_token": "ends a text, or separates the two texts of a pair",
    "pad_token": "filler that makes a batch rectangular (mask = 0)",
    "unk_token": "stands for anything the vocabulary cannot spell",
    "mask_token": "the hidden word in masked-LM pre-training",
    "bos_token": "marks the beginning of a sequence",
    "eos_token": "marks the end of a sequence; generation stops here",
}


# --------------------------------------------------------------------------------------- 1. tokenizer


def tokenizer_section(ctx: cli.Context, s: Settings, user_texts: list[str]) -> dict:
    """Models read integer ids, not text: see what the tokenizer keeps, drops and pads,
    and whether one batched call is faster than many single ones."""
    where = models.checkpoint("encoder", ctx.source)
    tokenizer = AutoTokenizer.from_pretrained(where.path)
    say(f"[tokenizer] {where.name}  source={where.source} ({where.origin})  "
          f"model_max_length={tokenizer.model_max_length}\n")

    encoded = tokenizer(WALKTHROUGH_TEXT)
    print(f"text:           {WALKTHROUGH_TEXT!r}")
    say(f"tokens:         {encoded.tokens()}")
    say(f"input_ids:      {encoded['input_ids']}")
    print(f"attention_mask: {encoded['attention_mask']}   (1 = a real token the model attends to)")
    print(f"decode:         {tokenizer.decode(encoded['input_ids'])!r}")
    print(f"decode(skip_special_tokens=True): {tokenizer.decode(encoded['input_ids'], skip_special_tokens=True)!r}")
    special = [{"attribute": name, "token": getattr(tokenizer, name), "id": getattr(tokenizer, f"{name}_id"),
                "purpose": purpose}
               for name, purpose in SPECIAL_TOKEN_PURPOSE.items() if getattr(tokenizer, name, None)]
    print_table(special, title="Special tokens of this tokenizer")

    batch = tokenizer(PADDING_DEMO_TEXTS, padding=True, truncation=True, max_length=PADDING_DEMO_MAX_LENGTH,
                      return_tensors="pt")
    say(f"\nA batch of {len(PADDING_DEMO_TEXTS)} texts, padding=True, truncation=True, "
          f"max_length={PADDING_DEMO_MAX_LENGTH}: every row has the same length, padding carries mask 0")
    print(f"input_ids {tuple(batch['input_ids'].shape)}:\n{batch['input_ids']}")
    print(f"attention_mask:\n{batch['attention_mask']}")
    untruncated = [len(ids) for ids in tokenizer(PADDING_DEMO_TEXTS)["input_ids"]]
    for text, total in zip(PADDING_DEMO_TEXTS, untruncated):
        if total > PADDING_DEMO_MAX_LENGTH:
            say(f"[truncated] {texts.shorten(text)!r}: {total} tokens cut to {PADDING_DEMO_MAX_LENGTH}")

    offsets = tokenizer(OFFSETS_DEMO_TEXT, return_offsets_mapping=True)
    offset_rows = [{"token": token, "span": f"{start}-{end}",
                    "source text": OFFSETS_DEMO_TEXT[start:end] if end > start else "(special token)"}
                   for token, (start, end) in zip(offsets.tokens(), offsets["offset_mapping"])]
    print_table(offset_rows, title=f"Offsets mapping: each token points back at characters of {OFFSETS_DEMO_TEXT!r}")

    cases = EDGE_CASES + [("Over-long", " ".join(texts.SENTENCES * OVERLONG_REPEATS))]
    cases += [(f"--text {i + 1}", text) for i, text in enumerate(user_texts)]
    round_trip = [round_trip_row(tokenizer, label, text) for label, text in cases]
    print_table(round_trip, ["case", "text", "tokens", "exact", "lossless_after_norm", "lost"],
                title="Round trip decode(encode(text)): exact, lossless after normalisation, what is lost")
    truncated = texts.report_truncation(tokenizer, [text for _, text in cases])

    throughput = tokenisation_throughput(ctx, s, tokenizer)
    return {"walkthrough": {"text": WALKTHROUGH_TEXT, "tokens": encoded.tokens(), "input_ids": encoded["input_ids"]},
            "special_tokens": special, "padded_batch_shape": list(batch["input_ids"].shape),
            "max_tokens": tokenizer.model_max_length, "round_trip": round_trip, "truncated": truncated, **throughput}


def round_trip_row(tokenizer: Any, label: str, text: str) -> dict:
    """Encode with truncation, decode, and say whether the text came back (exactly, or up to normalisation)."""
    ids = tokenizer(text, truncation=True)["input_ids"]
    total = len(tokenizer(text, verbose=False)["input_ids"])
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    normaliser = tokenizer.backend_tokenizer.normalizer  # lower-casing, accent stripping, ... before splitting
    normalised = normaliser.normalize_str(text) if normaliser else text
    return {"case": label, "text": texts.shorten(text, 22), "chars": len(text), "tokens": total, "kept": len(ids),
            "exact": decoded == text,
            # lossless up to normalisation: same characters as the normaliser's output, ignoring spaces
            "lossless_after_norm": "".join(decoded.split()) == "".join(normalised.split()),
            "lost": texts.round_trip_losses(text, decoded, ids.count(tokenizer.unk_token_id), total > len(ids))}


def tokenisation_throughput(ctx: cli.Context, s: Settings, tokenizer: Any) -> dict:
    """The same texts as single calls, one batched call, and one batched call padded into a tensor, round-robin."""
    corpus = texts.mixed_length_corpus(THROUGHPUT_TEXTS, seed=ctx.args.seed)
    lengths = [len(ids) for ids in tokenizer(corpus, truncation=True)["input_ids"]]
    single, batched = f"{THROUGHPUT_TEXTS:,} single calls", "one batched call"
    padded = "one batched call, padded tensor"
    comparison = ctx.meter(warmup=s.warmup).compare({
        single: lambda: [tokenizer(text, truncation=True) for text in corpus],
        batched: lambda: tokenizer(corpus, truncation=True),
        padded: lambda: tokenizer(corpus, padding=True, truncation=True, return_tensors="pt"),
    }, items=THROUGHPUT_TEXTS, tokens=sum(lengths), progress="tokenisation")
    rows = comparison.rows(baseline=single)
    print_table(rows, ["workload", "p50_ms", "iqr_ms", "runs", "items_per_s", "noisy", "speedup", "speedup_low",
                       "speedup_high", "verdict"],
                title=f"Tokenisation throughput over the same {THROUGHPUT_TEXTS:,} texts ({sum(lengths):,} tokens)")
    ctx.report.add_rows("tokenisation", rows)

    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset (Rust threads on)")
    sentence, verdict = comparison.sentence(batched, single), comparison.verdict(batched, single)
    say(sentence)
    if verdict == "faster":
        say(f"  why: it crosses from Python into the Rust tokenizer once instead of {THROUGHPUT_TEXTS:,} times and "
              f"can split the work over threads (TOKENIZERS_PARALLELISM={parallelism})")
    say(comparison.sentence(padded, batched))
    say(f"Padding to one tensor pads every text to the longest ({max(lengths)} tokens): "
          f"{1 - sum(lengths) / (len(lengths) * max(lengths)):.0%} of that tensor is padding, the waste that padding "
          "each small batch on its own (dynamic padding, lesson 03) reduces.")
    plot_tokenisation_throughput(ctx, rows)
    return {"throughput": rows, "tokenizers_parallelism": parallelism, "batched_verdict": verdict,
            "batched_speedup": comparison.ratio(batched, single)[0], "batched_sentence": sentence}


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
    texts_n, positions, width = hidden.shape
    say(f"last_hidden_state shape {tuple(hidden.shape)} = {texts_n} texts x {positions} token positions "
          f"(the longest text; shorter ones are padded) x {width} numbers per token (config.hidden_size)")

    # Mean pooling: average only the real tokens; the mask zeroes the padding rows before summing.
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    naive = hidden.mean(dim=1)  # what you get if you forget the mask
    padded_rows = int((batch["attention_mask"] == 0).any(dim=1).sum())
    mask_effect = float((pooled - naive).abs().max())
    say(f"pooled embeddings {tuple(pooled.shape)}; forgetting the mask changes the {padded_rows} padded texts' "
          f"embeddings by up to {mask_effect:.3f} (max abs)")

    unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
    similarity = (unit @ unit.T).cpu()
    labels = [f"S{i + 1}" for i in range(len(sentences))]
    print_table([{"": label, **{other: float(similarity[i, j]) for j, other in enumerate(labels)}}
                 for i, label in enumerate(labels)], title="Cosine similarity (1 = same direction, 0 = unrelated)")
    for label, text in zip(labels, sentences):
        print(f"  {label}: {texts.shorten(text, 70)}")
    related = [float(similarity[i, j]) for i, j in RELATED_PAIRS]
    unrelated = [float(similarity[i, j]) for i, j in UNRELATED_PAIRS]
    ordering_ok = min(related) > max(unrelated)
    say(f"related pairs {[round(v, 3) for v in related]} vs unrelated pairs {[round(v, 3) for v in unrelated]}: "
          + (f"every related pair beats every unrelated one by at least {min(related) - max(unrelated):.3f}"
             if ordering_ok else "WARNING: an unrelated pair scores as high as a related one"))
    plot_similarity_heatmap(ctx, similarity, labels, sentences)
    return {"hidden_shape": [texts_n, positions, width], "sentences": [texts.shorten(text, 60) for text in sentences],
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
    say(f'pipeline("feature-extraction") on one text -> tensor {tuple(features.shape)}: the token vectors, '
          "no pooling; mean over the tokens gives the sentence embedding")
    padded = extractor(PADDING_DEMO_TEXTS[:2], batch_size=2, return_tensors=True)
    own = [len(ids) for ids in encoder.tokenizer(PADDING_DEMO_TEXTS[:2])["input_ids"]]
    say(f"with batch_size=2 the two texts come back with {[f.shape[1] for f in padded]} token rows although they "
          f"have {own} tokens: rows past a text's own length are padding, so pool only its own tokens")

    clf, info = sentiment_classifier(ctx)
    say("classifier: " + ("the real SST-2 fine-tuned DistilBERT from the Hub" if info.source == "hub" else
                            "offline stand-in (bundled MiniLM + nearest example sentences), not a fine-tuned sentiment "
                            "model; with the Hub this role is the real SST-2 DistilBERT"))
    inputs = [text for text, _ in SENTIMENT_CHECKS] + user_texts
    texts.report_truncation(clf.tokenizer, inputs)
    predictions = clf(inputs, truncation=True)
    expected = [label for _, label in SENTIMENT_CHECKS] + [None] * (len(inputs) - len(SENTIMENT_CHECKS))
    rows = [{"text": texts.shorten(text, 44), "label": p["label"], "score": p["score"], "expected": want or "-"}
            for text, p, want in zip(inputs, predictions, expected)]
    print_table(rows, title=f"Sentiment with {info.label} (source={info.source})")
    correct = sum(p["label"] == want for p, want in zip(predictions, expected) if want)
    print(f"{correct}/{len(SENTIMENT_CHECKS)} clear-cut sentences got the expected label")

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
    generations, outputs = [], []
    for mode, kwargs in [("greedy", {"do_sample": False}), (f"sampled, seed {ctx.args.seed}", sampling),
                         (f"sampled, seed {ctx.args.seed} again", sampling)]:
        set_seed(ctx.args.seed)  # sampling draws from torch's RNG: the same seed gives the same text
        started = time.perf_counter()
        outputs.append(generator(GENERATION_PROMPT, max_new_tokens=s.generation_tokens, return_full_text=False,
                                 **kwargs)[0]["generated_text"])
        generations.append({"mode": mode, "seconds": time.perf_counter() - started,
                            "continuation": outputs[-1] if where.meaningful else None})  # a twin's text is noise
    say(f"\ntext-generation with {where.label}, prompt {GENERATION_PROMPT!r}, max_new_tokens={s.generation_tokens}"
          " (one call each, not a benchmark: lesson 04 measures generation)")
    for row in generations:
        text = repr(row["continuation"]) if where.meaningful else "(twin: random weights, text not shown)"
        print(f"  {row['mode']:<22} {row['seconds']:5.2f} s  {textwrap.shorten(text, 84, placeholder='...')}")
    reproducible = outputs[1] == outputs[2]
    print(f"same seed, same sampled text: {'yes' if reproducible else 'NO'}")
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
    for batch_size in tqdm(BATCH_SIZES, desc="manual vs pipeline", disable=None):
        batch_texts = texts.repeated_sentences(batch_size)
        counts = [len(ids) for ids in encoder.tokenizer(batch_texts)["input_ids"]]
        comparisons[batch_size] = meter.compare({
            "manual": lambda: manual_embeddings(encoder, batch_texts),
            "pipeline": lambda: pipeline_embeddings(extractor, batch_texts, counts, batch_size),
        }, items=batch_size, tokens=sum(counts))
    timings = [{**row, "ms_per_text": row["p50_ms"] / batch_size, "iqr_ms_per_text": row["iqr_ms"] / batch_size}
               for batch_size, comparison in comparisons.items()
               for row in comparison.rows(baseline="pipeline", batch=batch_size)]
    print_table(timings, ["batch", "workload", "p50_ms", "iqr_ms", "ms_per_text", "items_per_s", "runs", "noisy",
                          "speedup", "verdict"],
                title="Sentence embeddings: one manual batched call vs pipeline(batch_size=), speedup over pipeline")
    ctx.report.add_rows("manual_vs_pipeline", timings)
    verdicts = {str(batch): comparison.sentence("manual", "pipeline") for batch, comparison in comparisons.items()}
    say("\n".join(f"batch {batch:>2}: {sentence}" for batch, sentence in verdicts.items()))
    manual = {row["batch"]: row for row in timings if row["workload"] == "manual"}  # speedup = pipeline / manual time
    small, large = manual[min(BATCH_SIZES)], manual[max(BATCH_SIZES)]
    if small["verdict"] == "faster" and small["speedup_low"] > large["speedup_high"]:
        say(f"The pipeline's relative cost is larger at batch {small['batch']} ({small['speedup']:.2f}x) than at "
              f"batch {large['batch']} ({large['speedup']:.2f}x): a fixed per-call cost weighs most when the forward "
              "pass is short.")
    else:
        say(f"This run does not show the pipeline's relative cost shrinking from batch {small['batch']} to "
              f"{large['batch']} (that takes a measurable cost at batch {small['batch']} and intervals apart).")

    breakdown = overhead_breakdown(ctx, s, encoder, extractor, comparisons[max(BATCH_SIZES)])
    plot_manual_vs_pipeline(ctx, timings)
    return {**agreement, "timings": timings, "overhead_sentences": verdicts,
            "overhead_ratio": {str(batch): row["speedup"] for batch, row in manual.items()}, **breakdown}


def check_agreement(ctx: cli.Context, encoder: models.LoadedModel, extractor: Any,
                    user_texts: list[str]) -> dict:
    """Embeddings and classifier labels, by hand and by pipeline, must agree number for number (else raise)."""
    sentences = texts.SENTENCES + user_texts
    texts.report_truncation(encoder.tokenizer, sentences)
    token_counts = [len(ids) for ids in encoder.tokenizer(sentences, truncation=True)["input_ids"]]
    manual = manual_embeddings(encoder, sentences)
    piped = pipeline_embeddings(extractor, sentences, token_counts, PIPELINE_BATCH_SIZE)
    max_diff = float((manual - piped).abs().max())
    say(f"embeddings of {len(sentences)} texts, manual (one batch) vs pipeline (batch_size={PIPELINE_BATCH_SIZE}): "
          f"max abs difference {max_diff:.2e} (tolerance {EMBEDDING_TOLERANCE:.0e})")
    if not max_diff <= EMBEDDING_TOLERANCE:
        raise AssertionError(f"manual and pipeline embeddings differ by {max_diff:.2e} > {EMBEDDING_TOLERANCE:.0e}")

    clf, info = sentiment_classifier(ctx)
    by_hand = manual_labels(clf, sentences)
    by_pipeline = [p["label"] for p in clf(sentences, batch_size=PIPELINE_BATCH_SIZE, truncation=True)]
    mismatches = [(texts.shorten(t), a, b) for t, a, b in zip(sentences, by_hand, by_pipeline) if a != b]
    print(f"labels from {info.label}, by hand vs pipeline: {len(sentences) - len(mismatches)}/{len(sentences)} equal")
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
    """Time the steps that differ between the two paths on the largest batch: tokenising and padding."""
    largest, tokenizer = max(BATCH_SIZES), encoder.tokenizer
    batch_texts = texts.repeated_sentences(largest)
    collate = pad_collate_fn(tokenizer, None)  # what the pipeline's DataLoader uses to stack items into a batch
    items = [extractor.preprocess(text, truncation=True) for text in batch_texts]
    manual_batch = tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt")
    if not torch.equal(collate(items)["input_ids"], manual_batch["input_ids"]):
        raise AssertionError("the pipeline's collated batch differs from the manual batch")
    parts = ctx.meter(warmup=s.warmup).compare({
        "tokenise per text": lambda: [extractor.preprocess(text, truncation=True) for text in batch_texts],
        "tokenise batched": lambda: tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt"),
        "collate": lambda: collate(items),
    }, items=largest)
    ms = {name: m.median_ms for name, m in {**parts.measurements, **whole.measurements}.items()}
    per_text, batched, padding = ms["tokenise per text"], ms["tokenise batched"], ms["collate"]
    breakdown = [{"part": part, "manual_ms": by_hand, "pipeline_ms": piped, "extra_ms": piped - by_hand}
                 for part, by_hand, piped in [
                     ("whole call", ms["manual"], ms["pipeline"]),
                     ("tokenise (batched vs one call per text)", batched, per_text),
                     ("pad items into a batch (collate)", 0.0, padding),
                     ("rest: forward, DataLoader, unbatching, postprocess", ms["manual"] - batched,
                      ms["pipeline"] - per_text - padding)]]
    print_table(breakdown, title=f"Where the pipeline's extra time goes at batch {largest} (the model gets "
                                 "identical padded input_ids on both paths)")
    say("The pipeline calls the tokenizer once per text, pads the items itself (collate), then runs a DataLoader "
          "loop that unbatches the output and postprocesses each text.")
    tokenising = parts.sentence("tokenise batched", "tokenise per text")
    say(f"tokenising: {tokenising}; collate adds {padding:.2f} ms")
    # The whole-call difference, paired by round, has an interval; what tokenising and collating explain is
    # subtracted from both ends, and the rest counts as noise only if that interval still includes zero.
    _, low, high = (1e3 * seconds for seconds in whole.difference("pipeline", "manual"))
    rest, explained = breakdown[3]["extra_ms"], (per_text - batched) + padding
    rest_interval = (low - explained, high - explained)
    say(f"Beyond tokenising and collating, the rest of the difference is {rest:+.1f} ms (interval "
          f"{rest_interval[0]:+.1f} to {rest_interval[1]:+.1f} ms): " + (
              "within this run's noise." if rest_interval[0] <= 0 <= rest_interval[1] else
              "measurable: forward, DataLoader, unbatching and postprocess together."))
    return {"overhead_breakdown": breakdown, "overhead_parts": parts.rows(), "tokenising_sentence": tokenising,
            "rest_interval_ms": rest_interval,
            "tokenising_verdict": parts.verdict("tokenise batched", "tokenise per text")}


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
    """New tasks plug into pipeline() by splitting work into
    preprocess / _forward / postprocess; each stage is timed."""
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
    print_table(scores, title='pipeline(task="sentence-similarity") on the section-2 sentences')
    ordering_ok = (min(row["score"] for row in scores if row["kind"] == "related")
                   > max(row["score"] for row in scores if row["kind"] == "unrelated"))
    agreement = max(abs(row["score"] - row["by_hand"]) for row in scores)
    say(f"related > unrelated: {'yes' if ordering_ok else 'NO'}; largest difference from the by-hand cosine "
          f"{agreement:.1e}")

    where = models.checkpoint("seq2seq", ctx.source)
    text_to_text = ctx.record_load(where, lambda: pipeline(task=pipelines.TEXT_TO_TEXT, model=where.path,
                                                           dtype=torch.float32, device_map=ctx.device))
    t2t_kwargs = {"prefix": "summarize: ", "max_new_tokens": s.text_to_text_tokens}
    output = text_to_text(TEXT_TO_TEXT_INPUT, **t2t_kwargs)
    new_tokens = output["output_tokens"] - 1  # generate's output ids start with the decoder start token
    say(f'\npipeline(task="text-to-text") with {where.label}: {new_tokens} new tokens (max_new_tokens='
        f'{s.text_to_text_tokens}), {output["output_tokens"]} output ids with the decoder start token')
    print(f"  summary: {output['generated_text']!r}" if where.meaningful else
          "(twin: random weights, its text is noise and is not shown; the call proves the plumbing and timing)")

    meter = ctx.meter(warmup=s.warmup)
    similarity_stages, similarity_glue = time_stages(meter, similarity, "sentence-similarity",
                                                     {"text": SIMILARITY_TEXTS[0], "text_pair": SIMILARITY_TEXTS[1]})
    t2t_stages, t2t_glue = time_stages(meter, text_to_text, "text-to-text", TEXT_TO_TEXT_INPUT, **t2t_kwargs)
    print_table(similarity_stages + t2t_stages, ["pipeline", "stage", "p50_ms", "iqr_ms", "share_pct", "runs", "noisy"],
                title="Where a pipeline call spends its time: preprocess (tokenise) -> _forward (model) "
                      "-> postprocess (tensors to Python); share = of the three stages' summed medians")
    ctx.report.add_rows("custom_pipeline_stages", similarity_stages + t2t_stages)
    say(f"{similarity_glue}\n{t2t_glue}")
    say("preprocess and postprocess run in Python on the CPU; _forward is the step that runs on the model's device, "
        "which is why the split exists: pipelines can batch the model step on its own, and given a list or dataset "
        "with num_workers > 0, a DataLoader prepares the next inputs while it runs (at the default num_workers=0, "
        "as here, nothing overlaps).")
    return {"similarity_scores": scores, "ordering_ok": ordering_ok, "max_diff_vs_manual": agreement,
            "text_to_text": {"model": where.label, "source": where.source, "meaningful": where.meaningful,
                             "output_tokens": output["output_tokens"], "new_tokens": new_tokens},
            "stages": similarity_stages + t2t_stages, "glue": [similarity_glue, t2t_glue]}


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
    # shares of a total they fit in: the whole call, timed on its own, can come out below the sum of its stages
    total = sum(m.stats.median for stage, m in stages.items() if stage != "whole call")
    rows = [{**m.row(pipeline=name, stage=stage),
             "share_pct": None if stage == "whole call" else 100 * m.stats.median / total}
            for stage, m in stages.items()]
    seconds = {stage: np.asarray(m.samples_s) for stage, m in stages.items()}  # one sample per round each
    glue = np.sort(seconds.pop("whole call") - sum(seconds.values())) * 1e3
    low, high, coverage = median_ci(glue)
    interval = f"interval {low:.2f} to {high:.2f} ms" + (f", {coverage:.0%} coverage" if coverage < 0.95 else "")
    if low > 0:
        return rows, f"{name}: its own glue (whole call minus its stages) is {np.median(glue):.2f} ms, {interval}"
    whole_ms, stages_ms = stages["whole call"].stats.median * 1e3, total * 1e3
    below = (f"; the whole call's median even came out below the sum of its stages' ({whole_ms:,.0f} vs "
             f"{stages_ms:,.0f} ms): each is timed in its own turn of the round, and this machine's noise is larger "
             "than the glue") if whole_ms < stages_ms else ""
    return rows, f"{name}: no glue measurable above this run's noise (whole call minus its stages: {interval}){below}"


# ------------------------------------------------------------------------------------------------ charts


def plot_tokenisation_throughput(ctx: cli.Context, rows: list[dict]) -> None:
    """Texts per second of each way to tokenise, labelled with its speed-up over single calls."""
    batched = next(row for row in rows if row["workload"] == "one batched call")
    fig, ax = plots.figure(f"One batched call: {batched['speedup']:.1f}x the texts/s of single calls "
                           f"({batched['verdict']}, {THROUGHPUT_TEXTS:,} texts)", "texts per second (median)", "")
    speeds = [row["items_per_s"] for row in rows]
    ax.barh([row["workload"] for row in rows], speeds, color=["#b0b0b0", "#1f77b4", "#2ca02c"])
    for y, row in enumerate(rows):
        ax.text(row["items_per_s"], y, f"  {row['speedup']:.1f}x ({row['verdict']})", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(speeds) * 1.35)
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


def plot_manual_vs_pipeline(ctx: cli.Context, timings: list[dict]) -> None:
    """Median time per text against batch size for both paths, with the median's interval as error bars."""
    manual = {row["batch"]: row["ms_per_text"] for row in timings if row["workload"] == "manual"}
    first, last = min(manual), max(manual)
    fig, ax = plots.figure(f"Batching cuts the time per text {manual[first] / manual[last]:.1f}x (manual path, "
                           f"batch {first} to {last})", "batch size (texts per call)", "median time per text (ms)")
    for path, colour in [("manual", "#1f77b4"), ("pipeline", "#ff7f0e")]:
        rows = [row for row in timings if row["workload"] == path]
        ax.errorbar([r["batch"] for r in rows], [r["ms_per_text"] for r in rows],
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
