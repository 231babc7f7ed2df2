"""Deterministic sample texts shared by the lessons: everyday sentences and a mixed-length corpus."""
from __future__ import annotations

import random
from typing import Any

SENTENCES: list[str] = [
    "The weather is lovely today, so we are walking to the park.",
    "Transformers turn text into vectors that capture meaning.",
    "My laptop fan gets loud when I run large models.",
    "She ordered a coffee and read the news on her phone.",
    "The train was delayed by twenty minutes because of the snow.",
    "Tokenizers split words into smaller pieces called subwords.",
    "We measured the latency of every request on the server.",
    "Bugün hava çok güzel, parkta yürüyüş yapacağız.",
    "Model yükleme süresi ilk çalıştırmada daha uzundur.",
    "A good benchmark reports the median and the spread, not one number.",
    "The cat slept on the warm windowsill all afternoon.",
    "Batching many short texts together keeps the processor busy.",
]

_WORDS = (
    "model token batch memory speed device latency layer attention vector text input output sentence "
    "cache thread kernel matrix weight precision quantization pipeline encoder decoder benchmark "
    "the a of and to in is that for on with as by it this we are be from at"
).split()


def mixed_length_corpus(count: int, seed: int = 0, short: tuple[int, int] = (4, 16), long: tuple[int, int] = (80, 200),
                        long_fraction: float = 0.2) -> list[str]:
    """`count` synthetic texts, most short and some long (word counts drawn from the ranges), same every run."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        low, high = long if rng.random() < long_fraction else short
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + ".")
    return texts


def repeated_sentences(count: int) -> list[str]:
    """`count` texts cycling through SENTENCES: realistic everyday lengths for throughput tests."""
    return [SENTENCES[i % len(SENTENCES)] for i in range(count)]


def count_tokens(tokenizer: Any, texts: list[str], **tokenizer_kwargs: Any) -> int:
    """Real (non-padding) tokens the tokenizer makes of these texts, with the given truncation settings."""
    encoded = tokenizer(texts, **tokenizer_kwargs)
    return sum(len(ids) for ids in encoded["input_ids"])
