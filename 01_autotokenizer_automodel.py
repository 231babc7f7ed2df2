#!/usr/bin/env python3
"""01 · AutoTokenizer, AutoModel and pipeline(): how text becomes ids, ids become vectors, and what the
pipeline convenience costs. Tokenise and decode, run the encoder by hand, do the same with pipeline(),
check both paths agree and time them, then build custom pipelines on preprocess/_forward/postprocess."""
from __future__ import annotations

import os
import time
import unicodedata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import pipeline, set_seed
from transformers.pipelines.base import pad_collate_fn

from common import cli, memory, models, pipelines, plots, texts
from common.errors import UserError
from common.meter import Measurement, PerformanceMeter
from common.report import print_table

# Settings: plain constants, quick variants next to them.
THROUGHPUT_TEXTS = 1_000            # the same texts go through single calls and one batched call
BATCH_SIZES = [1, 8, 32]            # manual vs pipeline sweep
MEASURE_BUDGET_S = 1.0              # seconds of repeats per measurement (at least MIN_RUNS)
QUICK_MEASURE_BUDGET_S = 0.2
MIN_RUNS = 5
QUICK_MIN_RUNS = 3
NEW_TOKENS = 20                     # text-generation demo
QUICK_NEW_TOKENS = 8
TEXT_TO_TEXT_NEW_TOKENS = 16
QUICK_TEXT_TO_TEXT_NEW_TOKENS = 6
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


_SHARED: dict[str, Any] = {}  # the encoder and classifier several sections use; main() empties it


# ------------------------------------------------------------------------------------------- helpers


def read_user_texts(args) -> list[str] | None:
    """The user's --text and --text-file sentences (blank lines dropped), None when neither was given."""
    if args.text is None and args.text_file is None:
        return None
    given = list(args.text or [])
    if args.text_file is not None:
        path = args.text_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"--text-file {path}: no such file") from None
        except OSError as error:
            raise UserError(f"--text-file {path}: cannot read it ({error.strerror or error})") from None
        try:
            given += raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as error:
            raise UserError(f"--text-file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                            f"{error.start}); save it as UTF-8, one text per line") from None
    kept = [text.strip() for text in given if text.strip()]
    if not kept:
        raise UserError("no text to work on: --text/--text-file gave only empty lines; pass at least one sentence")
    return kept


def shorten(text: str, width: int = 38) -> str:
    """One line of at most `width` characters, for tables and chart labels."""
    flat = " ".join(text.split())
    if not flat:
        return "(empty)"
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def max_tokens(tokenizer: Any, model: Any) -> int:
    """The longest input the encoder reads; some tokenizers store a huge sentinel instead of a real limit."""
    limit = tokenizer.model_max_length
    return limit if limit < 1_000_000 else model.config.max_position_embeddings


def report_truncation(tokenizer: Any, limit: int, documents: list[str]) -> list[dict]:
    """Print, for every text longer than the model reads, how much truncation drops (never silent)."""
    truncated = []
    for text in documents:
        total = len(tokenizer(text, verbose=False)["input_ids"])  # verbose=False: we report it ourselves
        if total > limit:
            truncated.append({"text": shorten(text, 30), "chars": len(text), "tokens": total, "kept": limit})
            print(f"[truncated] {shorten(text, 30)!r} ({len(text):,} chars, {total:,} tokens): the model reads only "
                  f"the first {limit} tokens; {1 - limit / total:.0%} of the text is ignored")
    return truncated


def make_meter(ctx: cli.Context) -> PerformanceMeter:
    """The house meter with this run's budget (smaller with --quick)."""
    if ctx.quick:
        return PerformanceMeter(ctx.device, warmup=1, min_runs=QUICK_MIN_RUNS, budget_s=QUICK_MEASURE_BUDGET_S)
    return PerformanceMeter(ctx.device, warmup=2, min_runs=MIN_RUNS, budget_s=MEASURE_BUDGET_S)


def encoder(ctx: cli.Context) -> models.LoadedModel:
    """The encoder role (MiniLM), loaded on first use and shared by the sections."""
    if "encoder" not in _SHARED:
        _SHARED["encoder"] = models.load_model("encoder", source=ctx.source, device=ctx.device)
        ctx.report.add_model(_SHARED["encoder"].info.to_dict())
    return _SHARED["encoder"]


def classifier(ctx: cli.Context):
    """The sentiment classifier role as a pipeline: real SST-2 with the Hub, the bundled stand-in offline."""
    if "classifier" not in _SHARED:
        _SHARED["classifier"], info = models.load_classifier(source=ctx.source, device=ctx.device)
        ctx.report.add_model(info.to_dict())
        _SHARED["classifier_info"] = info
    return _SHARED["classifier"], _SHARED["classifier_info"]


def overlong_text() -> str:
    """A text many times longer than the encoder's 512-token window."""
    return " ".join(texts.SENTENCES * OVERLONG_REPEATS)


def timing_row(measurement: Measurement, **labels: Any) -> dict:
    """A table row from a measurement: median, spread, and throughput at the median."""
    return {**labels, "p50_ms": measurement.median_ms, "iqr_ms": measurement.stats.iqr * 1e3,
            "runs": measurement.stats.count, "items_per_s": measurement.items_per_call / measurement.stats.median,
            "noisy": measurement.noisy}


# --------------------------------------------------------------------------------------- 1. tokenizer


def lost_in_round_trip(text: str, decoded: str, ids: list[int], tokenizer: Any, truncated: bool) -> str:
    """Name what decode(encode(text)) could not give back: case, accents, unknown characters, spacing, length."""
    def has_accents(value: str) -> bool:
        return any(unicodedata.category(c) == "Mn" for c in unicodedata.normalize("NFD", value))

    losses = []
    if any(c.isupper() for c in text) and not any(c.isupper() for c in decoded):
        losses.append("lower-cased")
    if has_accents(text) and not has_accents(decoded):
        losses.append("accents stripped")
    unknown = ids.count(tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else 0
    if unknown:
        losses.append(f"{unknown} [UNK] (characters dropped)")
    if truncated:
        losses.append("truncated")
    if not losses and decoded != text:
        losses.append("spacing around punctuation")
    return ", ".join(losses) or "-"


def normalise(tokenizer: Any, text: str) -> str:
    """The text as the tokenizer's normaliser sees it (lower-casing, accent stripping, ...) before splitting."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.normalizer.normalize_str(text) if backend is not None and backend.normalizer else text


def tokenizer_section(ctx: cli.Context, user_texts: list[str] | None) -> dict:
    """Encode, decode, pad, truncate, map offsets, round-trip edge cases, and time single vs batched calls."""
    loaded = encoder(ctx)
    tokenizer = loaded.tokenizer
    limit = max_tokens(tokenizer, loaded.model)

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
    print_table(special, title="Special tokens of this tokenizer")

    batch = tokenizer(PADDING_DEMO_TEXTS, padding=True, truncation=True, max_length=PADDING_DEMO_MAX_LENGTH,
                      return_tensors="pt")
    print(f"\nA batch of {len(PADDING_DEMO_TEXTS)} texts, padding=True, truncation=True, "
          f"max_length={PADDING_DEMO_MAX_LENGTH}: every row has the same length, padding carries mask 0")
    print(f"input_ids {tuple(batch['input_ids'].shape)}:\n{batch['input_ids']}")
    print(f"attention_mask:\n{batch['attention_mask']}")
    untruncated = [len(ids) for ids in tokenizer(PADDING_DEMO_TEXTS)["input_ids"]]
    for text, total in zip(PADDING_DEMO_TEXTS, untruncated):
        if total > PADDING_DEMO_MAX_LENGTH:
            print(f"[truncated] {shorten(text)!r}: {total} tokens cut to {PADDING_DEMO_MAX_LENGTH}")

    offsets = tokenizer(OFFSETS_DEMO_TEXT, return_offsets_mapping=True)
    offset_rows = [{"token": token, "span": f"{start}-{end}",
                    "source text": OFFSETS_DEMO_TEXT[start:end] if end > start else "(special token)"}
                   for token, (start, end) in zip(offsets.tokens(), offsets["offset_mapping"])]
    print_table(offset_rows, title=f"Offsets mapping: each token points back at characters of {OFFSETS_DEMO_TEXT!r}")

    cases = EDGE_CASES + [("Over-long", overlong_text())]
    cases += [(f"--text {i + 1}", text) for i, text in enumerate((user_texts or [])[:MAX_USER_TEXTS_SHOWN])]
    round_trip = []
    for label, text in cases:
        ids = tokenizer(text, truncation=True)["input_ids"]
        total = len(tokenizer(text, verbose=False)["input_ids"])
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        normalised = normalise(tokenizer, text)
        round_trip.append({
            "case": label, "text": shorten(text, 30), "chars": len(text), "tokens": total, "kept": len(ids),
            "exact": decoded == text,
            # lossless up to normalisation: same characters as the normaliser's output, ignoring spaces
            "lossless_after_norm": "".join(decoded.split()) == "".join(normalised.split()),
            "lost": lost_in_round_trip(text, decoded, ids, tokenizer, total > len(ids)),
        })
    print_table(round_trip, title="Round trip decode(encode(text)): exact, lossless after normalisation, what is lost")
    truncated = report_truncation(tokenizer, limit, [text for _, text in cases])

    corpus = texts.mixed_length_corpus(THROUGHPUT_TEXTS, seed=ctx.args.seed)
    lengths = [len(ids) for ids in tokenizer(corpus, truncation=True)["input_ids"]]
    total_tokens = sum(lengths)
    meter = make_meter(ctx)
    ways = {
        f"{THROUGHPUT_TEXTS:,} single calls": lambda: [tokenizer(text, truncation=True) for text in corpus],
        "one batched call": lambda: tokenizer(corpus, truncation=True),
        "one batched call, padded tensor": lambda: tokenizer(corpus, padding=True, truncation=True,
                                                             return_tensors="pt"),
    }
    measured = {way: meter.measure(way, fn, items=THROUGHPUT_TEXTS, tokens=total_tokens) for way, fn in ways.items()}
    single = next(iter(measured.values()))
    throughput = [{**timing_row(m, way=way), "speedup_vs_single": single.stats.median / m.stats.median}
                  for way, m in measured.items()]
    print_table(throughput, title=f"Tokenisation throughput over the same {THROUGHPUT_TEXTS:,} texts "
                                  f"({total_tokens:,} tokens)")
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset (Rust threads on)")
    speedup = throughput[1]["speedup_vs_single"]
    if speedup > 1:
        print(f"One batched call is {speedup:.1f}x faster: it crosses from Python into the Rust tokenizer once instead "
              f"of {THROUGHPUT_TEXTS:,} times and can split the work over threads "
              f"(TOKENIZERS_PARALLELISM={parallelism}).")
    else:
        print(f"Here the batched call was not faster ({speedup:.2f}x): its Rust worker threads competed with other "
              "processes on these cores (see the noisy column); rerun on an idle machine.")
    print(f"Padding to one tensor pads every text to the longest "
          f"({max(lengths)} tokens): {1 - total_tokens / (len(lengths) * max(lengths)):.0%} of that tensor is padding, "
          "the waste that padding each small batch on its own (dynamic padding, lesson 03) avoids.")
    ctx.report.add_rows("tokenisation", throughput)

    fig, ax = plots.figure(f"Tokenisation throughput, {THROUGHPUT_TEXTS:,} texts", "texts per second (median)", "")
    names = list(measured)
    speeds = [row["items_per_s"] for row in throughput]
    ax.barh(names, speeds, color=["#b0b0b0", "#1f77b4", "#2ca02c"])
    for y, (speed, row) in enumerate(zip(speeds, throughput)):
        ax.text(speed, y, f"  {row['speedup_vs_single']:.1f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(speeds) * 1.2)
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "tokenisation_throughput"))

    return {"walkthrough": {"text": WALKTHROUGH_TEXT, "tokens": encoded.tokens(), "input_ids": encoded["input_ids"]},
            "special_tokens": special, "padded_batch_shape": list(batch["input_ids"].shape),
            "max_tokens": limit, "round_trip": round_trip, "truncated": truncated,
            "throughput": throughput, "tokenizers_parallelism": parallelism,
            "batched_speedup": speedup}


# --------------------------------------------------------------------------------------- 2. AutoModel


def automodel_section(ctx: cli.Context, user_texts: list[str] | None) -> dict:
    """Tokenizer -> model -> last_hidden_state -> masked mean pooling -> cosine similarity matrix and heat-map."""
    loaded = encoder(ctx)
    sentences = SIMILARITY_TEXTS + (user_texts or [])[:MAX_USER_TEXTS_SHOWN]
    report_truncation(loaded.tokenizer, max_tokens(loaded.tokenizer, loaded.model), sentences)

    batch = loaded.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(ctx.device)
    with torch.inference_mode():  # no autograd graph is recorded: inference needs no gradients
        hidden = loaded.model(**batch).last_hidden_state
    texts_n, positions, width = hidden.shape
    print(f"last_hidden_state shape {tuple(hidden.shape)} = {texts_n} texts x {positions} token positions "
          f"(the longest text; shorter ones are padded) x {width} numbers per token (config.hidden_size)")

    # Mean pooling: average only the real tokens; the mask zeroes the padding rows before summing.
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    naive = hidden.mean(dim=1)  # what you get if you forget the mask
    padded_rows = int((batch["attention_mask"] == 0).any(dim=1).sum())
    mask_effect = float((pooled - naive).abs().max())
    print(f"pooled embeddings {tuple(pooled.shape)}; forgetting the mask changes the {padded_rows} padded texts' "
          f"embeddings by up to {mask_effect:.3f} (max abs)")

    unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
    similarity = (unit @ unit.T).cpu()
    labels = [f"S{i + 1}" for i in range(len(sentences))]
    print_table([{"": label, **{other: float(similarity[i, j]) for j, other in enumerate(labels)}}
                 for i, label in enumerate(labels)], title="Cosine similarity (1 = same direction, 0 = unrelated)")
    for label, text in zip(labels, sentences):
        print(f"  {label}: {shorten(text, 70)}")
    related = [float(similarity[i, j]) for i, j in RELATED_PAIRS]
    unrelated = [float(similarity[i, j]) for i, j in UNRELATED_PAIRS]
    ordering_ok = min(related) > max(unrelated)
    print(f"related pairs {[round(v, 3) for v in related]} vs unrelated pairs {[round(v, 3) for v in unrelated]}: "
          + (f"every related pair beats every unrelated one by at least {min(related) - max(unrelated):.3f}"
             if ordering_ok else "WARNING: an unrelated pair scores as high as a related one"))

    fig, ax = plots.figure("Related sentences score higher (cosine similarity)", "sentence", "sentence",
                           size=(6.5 + 0.4 * len(sentences), 5 + 0.3 * len(sentences)))
    image = ax.imshow(similarity.numpy(), cmap="viridis", vmin=min(0.0, float(similarity.min())), vmax=1.0)
    ticks = [f"{label}: {shorten(text, 22)}" for label, text in zip(labels, sentences)]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), ticks)
    ax.grid(False)
    for i in range(len(labels)):
        for j in range(len(labels)):
            value = float(similarity[i, j])
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "similarity_heatmap"))

    return {"hidden_shape": [texts_n, positions, width], "sentences": [shorten(text, 60) for text in sentences],
            "similarity": similarity.numpy(), "related": related, "unrelated": unrelated,
            "related_min": min(related), "unrelated_max": max(unrelated), "ordering_ok": ordering_ok,
            "mask_effect_max_abs": mask_effect}


# ---------------------------------------------------------------------------------------- 3. pipeline()


def pipeline_section(ctx: cli.Context, user_texts: list[str] | None) -> dict:
    """The same jobs with pipeline(): feature-extraction, the sentiment classifier role, text-generation."""
    loaded = encoder(ctx)
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=loaded.tokenizer)
    features = extractor(SIMILARITY_TEXTS[0], return_tensors=True)
    print(f'pipeline("feature-extraction") on one text -> tensor {tuple(features.shape)}: the token vectors, '
          "no pooling; mean over the tokens gives the sentence embedding")
    padded = extractor(PADDING_DEMO_TEXTS[:2], batch_size=2, return_tensors=True)
    own = [len(ids) for ids in loaded.tokenizer(PADDING_DEMO_TEXTS[:2])["input_ids"]]
    print(f"with batch_size=2 the two texts come back with {[f.shape[1] for f in padded]} token rows although they "
          f"have {own} tokens: rows past a text's own length are padding, so pool only its own tokens")

    clf, info = classifier(ctx)
    if info.source == "hub":
        print("classifier: the real SST-2 fine-tuned DistilBERT from the Hub")
    else:
        print("classifier: offline stand-in (bundled MiniLM + nearest example sentences), not a fine-tuned "
              "sentiment model; with the Hub this role is the real SST-2 DistilBERT")
    inputs = [text for text, _ in SENTIMENT_CHECKS] + (user_texts or [])[:MAX_USER_TEXTS_SHOWN]
    report_truncation(clf.tokenizer, max_tokens(clf.tokenizer, clf.model), inputs)
    predictions = clf(inputs, truncation=True)
    expected = [label for _, label in SENTIMENT_CHECKS] + [None] * (len(inputs) - len(SENTIMENT_CHECKS))
    rows = [{"text": shorten(text, 44), "label": p["label"], "score": p["score"], "expected": want or "-"}
            for text, p, want in zip(inputs, predictions, expected)]
    print_table(rows, title=f"Sentiment with {info.label} (source={info.source})")
    correct = sum(p["label"] == want for p, want in zip(predictions, expected) if want)
    print(f"{correct}/{len(SENTIMENT_CHECKS)} clear-cut sentences got the expected label")

    decoder = models.load_model("decoder", source=ctx.source, device=ctx.device)
    ctx.report.add_model(decoder.info.to_dict())
    generator = pipeline("text-generation", model=decoder.model, tokenizer=decoder.tokenizer)
    new_tokens = QUICK_NEW_TOKENS if ctx.quick else NEW_TOKENS
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    generations = []
    for mode, kwargs in [("greedy", {"do_sample": False}), (f"sampled, seed {ctx.args.seed}", sampling),
                         (f"sampled, seed {ctx.args.seed} again", sampling)]:
        set_seed(ctx.args.seed)  # sampling draws from torch's RNG: the same seed gives the same text
        started = time.perf_counter()
        text = generator(GENERATION_PROMPT, max_new_tokens=new_tokens, return_full_text=False, **kwargs)[0]
        generations.append({"mode": mode, "seconds": time.perf_counter() - started,
                            "continuation": text["generated_text"]})
    print(f"\ntext-generation with {decoder.info.label}, prompt {GENERATION_PROMPT!r}, max_new_tokens={new_tokens}"
          " (one call each, not a benchmark: lesson 04 measures generation)")
    if not decoder.info.meaningful:
        print("(twin: random weights, text is noise; shown only to prove the plumbing)")
    for row in generations:
        print(f"  {row['mode']:<24} {row['seconds']:5.2f} s  {row['continuation']!r}")
    reproducible = generations[1]["continuation"] == generations[2]["continuation"]
    print(f"same seed, same sampled text: {'yes' if reproducible else 'NO'}")
    del generator, decoder
    memory.cleanup()

    return {"feature_shape": list(features.shape), "padded_rows": [f.shape[1] for f in padded], "own_tokens": own,
            "classifier_source": info.source, "classifier": info.name, "sentiment": rows,
            "sentiment_correct": correct, "sentiment_checked": len(SENTIMENT_CHECKS),
            "generation": generations, "sampling_reproducible": reproducible, "new_tokens": new_tokens}


# ---------------------------------------------------------------------------------- 4. manual vs pipeline


def manual_embeddings(loaded: models.LoadedModel, sentences: list[str]) -> torch.Tensor:
    """One batched call: tokenise all texts together, one forward pass, masked mean pooling."""
    batch = loaded.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(loaded.model.device)
    with torch.inference_mode():
        hidden = loaded.model(**batch).last_hidden_state
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


def manual_vs_pipeline_section(ctx: cli.Context, user_texts: list[str] | None) -> dict:
    """Same inputs through both paths: check they agree, then time them at several batch sizes."""
    loaded = encoder(ctx)
    tokenizer = loaded.tokenizer
    extractor = pipeline("feature-extraction", model=loaded.model, tokenizer=tokenizer)
    sentences = texts.SENTENCES + (user_texts or [])[:MAX_USER_TEXTS_SHOWN]
    report_truncation(tokenizer, max_tokens(tokenizer, loaded.model), sentences)
    token_counts = [len(ids) for ids in tokenizer(sentences, truncation=True)["input_ids"]]

    manual = manual_embeddings(loaded, sentences)
    piped = pipeline_embeddings(extractor, sentences, token_counts, PIPELINE_BATCH_SIZE)
    max_diff = float((manual - piped).abs().max())
    print(f"embeddings of {len(sentences)} texts, manual (one batch) vs pipeline (batch_size={PIPELINE_BATCH_SIZE}): "
          f"max abs difference {max_diff:.2e} (tolerance {EMBEDDING_TOLERANCE:.0e})")
    if not max_diff <= EMBEDDING_TOLERANCE:
        raise AssertionError(f"manual and pipeline embeddings differ by {max_diff:.2e} > {EMBEDDING_TOLERANCE:.0e}")

    clf, info = classifier(ctx)
    by_hand = manual_labels(clf, sentences)
    by_pipeline = [p["label"] for p in clf(sentences, batch_size=PIPELINE_BATCH_SIZE, truncation=True)]
    mismatches = [(shorten(t), a, b) for t, a, b in zip(sentences, by_hand, by_pipeline) if a != b]
    print(f"labels from {info.label}, by hand vs pipeline: {len(sentences) - len(mismatches)}/{len(sentences)} equal")
    if mismatches:
        raise AssertionError(f"labels differ between manual and pipeline paths: {mismatches}")

    meter = make_meter(ctx)
    timings, overhead = [], {}
    for batch_size in tqdm(BATCH_SIZES, desc="manual vs pipeline", disable=None):
        batch_texts = texts.repeated_sentences(batch_size)
        counts = [len(ids) for ids in tokenizer(batch_texts)["input_ids"]]
        hand = meter.measure(f"manual b{batch_size}", lambda: manual_embeddings(loaded, batch_texts),
                             items=batch_size, tokens=sum(counts))
        piped_m = meter.measure(f"pipeline b{batch_size}",
                                lambda: pipeline_embeddings(extractor, batch_texts, counts, batch_size),
                                items=batch_size, tokens=sum(counts))
        overhead[batch_size] = piped_m.stats.median / hand.stats.median
        for path, m in [("manual", hand), ("pipeline", piped_m)]:
            timings.append({**timing_row(m, batch=batch_size, path=path), "ms_per_text": m.median_ms / batch_size,
                            "iqr_ms_per_text": m.stats.iqr * 1e3 / batch_size})
    print_table(timings, ["batch", "path", "p50_ms", "iqr_ms", "ms_per_text", "items_per_s", "runs", "noisy"],
                title="Sentence embeddings: one manual batched call vs pipeline(batch_size=)")
    ctx.report.add_rows("manual_vs_pipeline", timings)
    print("pipeline / manual time: " + ", ".join(f"{ratio:.2f}x at batch {b}" for b, ratio in overhead.items()))
    if any(row["noisy"] for row in timings):
        print("[noisy] some measurements spread by more than 10% of their median (see iqr_ms): treat ratios close "
              "to 1 as a tie")

    # Where the overhead comes from: time the steps that differ between the two paths, on the largest batch.
    largest = max(BATCH_SIZES)
    batch_texts = texts.repeated_sentences(largest)
    collate = pad_collate_fn(tokenizer, None)  # what the pipeline's DataLoader uses to stack items into a batch
    items = [extractor.preprocess(text, truncation=True) for text in batch_texts]
    manual_batch = tokenizer(batch_texts, padding=True, truncation=True, return_tensors="pt")
    if not torch.equal(collate(items)["input_ids"], manual_batch["input_ids"]):
        raise AssertionError("the pipeline's collated batch differs from the manual batch")
    per_text = meter.measure("tokenise per text",
                             lambda: [extractor.preprocess(text, truncation=True) for text in batch_texts])
    batched = meter.measure("tokenise batched", lambda: tokenizer(batch_texts, padding=True, truncation=True,
                                                                   return_tensors="pt"))
    padding = meter.measure("collate", lambda: collate(items))
    whole = {row["path"]: row for row in timings if row["batch"] == largest}
    manual_ms, pipeline_ms = whole["manual"]["p50_ms"], whole["pipeline"]["p50_ms"]
    breakdown = [
        {"part": "whole call", "manual_ms": manual_ms, "pipeline_ms": pipeline_ms},
        {"part": "tokenise (batched vs one call per text)", "manual_ms": batched.median_ms,
         "pipeline_ms": per_text.median_ms},
        {"part": "pad items into a batch (collate)", "manual_ms": 0.0, "pipeline_ms": padding.median_ms},
        {"part": "rest: forward, DataLoader, unbatching, postprocess", "manual_ms": manual_ms - batched.median_ms,
         "pipeline_ms": pipeline_ms - per_text.median_ms - padding.median_ms},
    ]
    for row in breakdown:
        row["extra_ms"] = row["pipeline_ms"] - row["manual_ms"]
    print_table(breakdown, title=f"Where the pipeline's extra time goes at batch {largest} (the model gets "
                                 "identical padded input_ids on both paths)")
    noise = whole["manual"]["iqr_ms"] + whole["pipeline"]["iqr_ms"]
    print(f"The pipeline calls the tokenizer once per text ({breakdown[1]['extra_ms']:+.2f} ms), pads the items "
          f"itself ({padding.median_ms:+.2f} ms), then runs a DataLoader loop that unbatches the output and "
          f"postprocesses each text (rest {breakdown[3]['extra_ms']:+.2f} ms; the whole calls' IQRs add up to "
          f"{noise:.1f} ms, so a smaller difference is noise). Such a fixed per-call cost weighs most when the forward "
          "pass is short: small batches, small models, fast devices.")

    fig, ax = plots.figure("Pipeline vs manual: latency per text", "batch size (texts per call)",
                           "median time per text (ms)")
    for path, colour in [("manual", "#1f77b4"), ("pipeline", "#ff7f0e")]:
        rows = [row for row in timings if row["path"] == path]
        ax.errorbar([r["batch"] for r in rows], [r["ms_per_text"] for r in rows],
                    yerr=[r["iqr_ms_per_text"] / 2 for r in rows], marker="o", capsize=4, color=colour,
                    label=f"{path} (bars: IQR)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    ax.set_ylim(bottom=0)
    ax.legend()
    ctx.report.add_chart(plots.save(fig, ctx.out_dir, "manual_vs_pipeline_latency"))

    return {"texts_compared": len(sentences), "embedding_max_abs_diff": max_diff, "tolerance": EMBEDDING_TOLERANCE,
            "embeddings_agree": True, "labels_agree": True, "labels": by_pipeline, "timings": timings,
            "overhead_ratio": {str(b): ratio for b, ratio in overhead.items()}, "overhead_breakdown": breakdown}


# -------------------------------------------------------------------------------------- 5. custom pipelines


def time_stages(meter: PerformanceMeter, pipe: Any, name: str, item: Any, **call_kwargs: Any) -> list[dict]:
    """Time preprocess, forward (_forward with device moves and no_grad) and postprocess apart, then the whole call."""
    pre_params, forward_params, post_params = pipe._sanitize_parameters(**call_kwargs)  # routes each kwarg
    model_inputs = pipe.preprocess(item, **pre_params)
    model_outputs = pipe.forward(model_inputs, **forward_params)
    stages = {
        "preprocess": meter.measure(f"{name} preprocess", lambda: pipe.preprocess(item, **pre_params)),
        "_forward": meter.measure(f"{name} forward", lambda: pipe.forward(model_inputs, **forward_params)),
        "postprocess": meter.measure(f"{name} postprocess", lambda: pipe.postprocess(model_outputs, **post_params)),
    }
    whole = meter.measure(f"{name} whole call", lambda: pipe(item, **call_kwargs))
    rows = [{"pipeline": name, "stage": stage, "p50_ms": m.median_ms, "iqr_ms": m.stats.iqr * 1e3,
             "share_pct": 100 * m.stats.median / whole.stats.median, "runs": m.stats.count}
            for stage, m in stages.items()]
    glue = whole.stats.median - sum(m.stats.median for m in stages.values())
    rows.append({"pipeline": name, "stage": "glue (call - stages)", "p50_ms": glue * 1e3, "iqr_ms": None,
                 "share_pct": 100 * glue / whole.stats.median, "runs": None})
    rows.append({"pipeline": name, "stage": "whole call", "p50_ms": whole.median_ms, "iqr_ms": whole.stats.iqr * 1e3,
                 "share_pct": 100.0, "runs": whole.stats.count})
    return rows


def custom_pipelines_section(ctx: cli.Context) -> dict:
    """Registered custom tasks used through pipeline(task=...): sentence-similarity and text-to-text."""
    loaded = encoder(ctx)
    similarity = pipeline(task=pipelines.SENTENCE_SIMILARITY, model=loaded.model, tokenizer=loaded.tokenizer)
    reference = pipelines.embed(loaded.model, loaded.tokenizer, SIMILARITY_TEXTS)
    scores = []
    for kind, pairs in [("related", RELATED_PAIRS), ("unrelated", UNRELATED_PAIRS)]:
        for i, j in pairs:
            score = similarity({"text": SIMILARITY_TEXTS[i], "text_pair": SIMILARITY_TEXTS[j]})["score"]
            scores.append({"pair": f"S{i + 1}-S{j + 1}", "kind": kind, "score": score,
                           "by_hand": float(reference[i] @ reference[j])})
    print_table(scores, title='pipeline(task="sentence-similarity") on the section-2 sentences')
    related = [row["score"] for row in scores if row["kind"] == "related"]
    unrelated = [row["score"] for row in scores if row["kind"] == "unrelated"]
    ordering_ok = min(related) > max(unrelated)
    agreement = max(abs(row["score"] - row["by_hand"]) for row in scores)
    print(f"related > unrelated: {'yes' if ordering_ok else 'NO'}; largest difference from the by-hand cosine "
          f"{agreement:.1e}")

    seq2seq = models.load_model("seq2seq", source=ctx.source, device=ctx.device)
    ctx.report.add_model(seq2seq.info.to_dict())
    text_to_text = pipeline(task=pipelines.TEXT_TO_TEXT, model=seq2seq.model, tokenizer=seq2seq.tokenizer)
    new_tokens = QUICK_TEXT_TO_TEXT_NEW_TOKENS if ctx.quick else TEXT_TO_TEXT_NEW_TOKENS
    t2t_kwargs = {"prefix": "summarize: ", "max_new_tokens": new_tokens}
    output = text_to_text(TEXT_TO_TEXT_INPUT, **t2t_kwargs)
    print(f'\npipeline(task="text-to-text") with {seq2seq.info.label}: {output["output_tokens"]} output tokens')
    if seq2seq.info.meaningful:
        print(f"  summary: {output['generated_text']!r}")
    else:
        print("(twin: random weights, text is noise; shown only to prove the plumbing and the timing)")

    meter = make_meter(ctx)
    stages = time_stages(meter, similarity, "sentence-similarity",
                         {"text": SIMILARITY_TEXTS[0], "text_pair": SIMILARITY_TEXTS[1]})
    stages += time_stages(meter, text_to_text, "text-to-text", TEXT_TO_TEXT_INPUT, **t2t_kwargs)
    print_table(stages, title="Where a pipeline call spends its time: preprocess (tokenise) -> _forward (model) "
                              "-> postprocess (tensors to Python)")
    ctx.report.add_rows("custom_pipeline_stages", stages)
    print("preprocess and postprocess run on the CPU in Python; _forward is the only part a GPU speeds up, which is "
          "why the split exists: pipelines can overlap or batch the model step on its own.")
    t2t_info = seq2seq.info
    del text_to_text, seq2seq
    memory.cleanup()

    return {"similarity_scores": scores, "ordering_ok": ordering_ok, "max_diff_vs_manual": agreement,
            "text_to_text": {"model": t2t_info.label, "source": t2t_info.source, "meaningful": t2t_info.meaningful,
                             "output_tokens": output["output_tokens"]},
            "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = cli.base_parser(__doc__)
    parser.add_argument("--text", action="append", default=None,
                        help="a sentence of your own (repeat the option for several)")
    parser.add_argument("--text-file", type=Path, default=None, help="a UTF-8 file with one text per line")
    args = parser.parse_args(argv)
    user_texts = read_user_texts(args)
    ctx = cli.start(__file__, args)
    if user_texts:
        print(f"your texts: {len(user_texts)}" + (f" (the lesson uses the first {MAX_USER_TEXTS_SHOWN})"
                                                  if len(user_texts) > MAX_USER_TEXTS_SHOWN else ""))
    _SHARED.clear()
    report = ctx.report
    report.run_section("1. Tokenizer encode/decode", "Models read integer ids, not text: see what the tokenizer "
                       "keeps, drops and pads, and why one batched call beats many single ones.",
                       tokenizer_section, ctx, user_texts)
    report.run_section("2. AutoModel by hand", "tokenizer -> model -> vectors, step by step: the shape of the "
                       "output and how pooling turns token vectors into one sentence vector.",
                       automodel_section, ctx, user_texts)
    report.run_section("3. pipeline()", "The same jobs in one line each; the pipeline hides tokenising, batching "
                       "and decoding.", pipeline_section, ctx, user_texts)
    report.run_section("4. Manual vs pipeline", "Convenience should not change answers; it may cost time. Both "
                       "are checked here, on the same inputs.", manual_vs_pipeline_section, ctx, user_texts)
    report.run_section("5. Custom pipelines", "New tasks plug into pipeline() by splitting work into "
                       "preprocess / _forward / postprocess; each stage is timed.", custom_pipelines_section, ctx)
    _SHARED.clear()
    memory.cleanup()
    return report.finish()


if __name__ == "__main__":
    cli.run(main)
