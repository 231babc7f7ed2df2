"""Deterministic sample texts shared by the lessons: everyday sentences, corpora, and a varied fidelity set."""
from __future__ import annotations

import random
import textwrap
import unicodedata
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


def shorten(text: str, width: int = 38) -> str:
    """One line of at most `width` characters, for tables and chart labels."""
    flat = " ".join(text.split())
    if not flat:
        return "(empty)"
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def report_truncation(tokenizer: Any, documents: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Print, for every text longer than the model reads (default: model_max_length), what truncation drops."""
    limit = tokenizer.model_max_length if limit is None else limit
    truncated = []
    for text in documents:
        total = len(tokenizer(text, verbose=False)["input_ids"])  # verbose=False: we report it ourselves
        if total > limit:
            truncated.append({"text": shorten(text, 30), "chars": len(text), "tokens": total, "kept": limit})
            print(f"[truncated] {shorten(text, 30)!r} ({len(text):,} chars, {total:,} tokens): the model reads "
                  f"the first {limit} ({1 - limit / total:.0%} ignored)")
    return truncated


def _has_accents(text: str) -> bool:
    """True when the text has a combining mark once decomposed (é, ü, ş, ...)."""
    return any(unicodedata.category(c) == "Mn" for c in unicodedata.normalize("NFD", text))


def round_trip_losses(text: str, decoded: str, unknown: int, truncated: bool) -> str:
    """Name what decode(encode(text)) did not give back: case, accents, unknown characters, length, spacing."""
    losses = []
    if any(c.isupper() for c in text) and not any(c.isupper() for c in decoded):
        losses.append("lower-cased")
    if _has_accents(text) and not _has_accents(decoded):
        losses.append("accents stripped")
    if unknown:
        losses.append(f"{unknown} [UNK] (characters dropped)")
    if truncated:
        losses.append("truncated")
    if not losses and decoded != text:
        losses.append("spacing around punctuation")
    return ", ".join(losses) or "-"


def count_tokens(tokenizer: Any, texts: list[str], **tokenizer_kwargs: Any) -> int:
    """Real (non-padding) tokens the tokenizer makes of these texts, with the given truncation settings."""
    encoded = tokenizer(texts, **tokenizer_kwargs)
    return sum(len(ids) for ids in encoded["input_ids"])


# Judging a faster variant on a dozen everyday sentences hides where it fails. These texts vary in domain, length
# (one word to about 150), language (English and Turkish) and kind (prose, code, numbers, emoji, chat), and stay
# fixed so every run judges fidelity on the same inputs.
FIDELITY_TEXTS: list[str] = [
    "Good morning!",
    "Refund please.",
    "Where is the nearest pharmacy?",
    "Is this laptop worth the price?",
    "Teşekkürler, yarın görüşürüz.",
    "Kargom ne zaman gelir?",
    "lol same 😂",
    "Meeting moved to 3pm 📅",
    "Error 404: page not found.",
    "pip install -r requirements.txt",
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday, its third increase "
    "this year, citing stubborn inflation in services.",
    "Heavy rain is expected across the north-west tonight, with up to 40 mm in exposed areas and a risk of "
    "localised flooding on low-lying roads.",
    "The home side came back from two goals down to win 3-2, with the winner arriving in the fourth minute of "
    "stoppage time.",
    "Researchers found that the enzyme folds correctly only when a small chaperone protein binds to it during "
    "synthesis.",
    "Take one tablet twice a day with food. Do not exceed four tablets in 24 hours. If symptoms persist for more "
    "than three days, consult your doctor.",
    "This agreement shall be governed by the laws of England and Wales, and the parties submit to the exclusive "
    "jurisdiction of its courts.",
    "Preheat the oven to 200°C. Toss the potatoes in olive oil, salt and rosemary, then roast for 40 minutes, "
    "turning once halfway through.",
    "The battery lasts about nine hours of video playback, but the screen is dim outdoors and the speakers "
    "distort at full volume.",
    "I've tried restarting the router twice and the connection still drops every few minutes. The lights on "
    "the front keep flashing orange.",
    "Can you explain the difference between a process and a thread in simple terms?",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
    "The Ottoman Empire lasted for more than six centuries, from around 1299 until 1922.",
    "Flight TK1984 to Amsterdam is now boarding at gate B12. Passengers in rows 30 to 45, please come forward.",
    "Total: $1,249.99 (incl. 20% VAT). Paid by card ending 4821 on 2024-03-15 at 14:07.",
    "Revenue grew 12.4% year over year to €3.2 billion, while operating margin fell from 18% to 16.5%.",
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "def add(a: int, b: int) -> int:\n    return a + b",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "SELECT name, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY name ORDER BY 2 DESC;",
    "git commit -m \"fix: handle empty batches in the tokenizer\"",
    "Traceback (most recent call last): File \"main.py\", line 12, in <module> ZeroDivisionError: division by zero",
    "{\"user_id\": 1042, \"active\": true, \"tags\": [\"beta\", \"mobile\"]}",
    "The integral of 1/x from 1 to e equals 1.",
    "E = mc², where c ≈ 299,792,458 m/s.",
    "Happy birthday!!! 🎂🎉 Hope you have the best day ever ❤️",
    "Just landed in Tokyo ✈️ jet lag is real but the sushi is worth it 🍣",
    "ugh my train got cancelled again, gonna be late for work 🙄",
    "Who wants pizza tonight? 🍕 I'm ordering at 8.",
    "Bugün hava çok güzel, öğleden sonra sahilde yürüyüş yapmayı düşünüyoruz.",
    "Toplantı yarın saat onda başlayacak; lütfen sunum dosyalarınızı önceden gönderin.",
    "Bu telefonun bataryası bir günden fazla dayanıyor ama kamerası düşük ışıkta pek iyi değil.",
    "İstanbul'da trafik sabah saatlerinde çok yoğun oluyor, bu yüzden çoğu insan metroyu tercih ediyor.",
    "Model yükleme süresi ilk çalıştırmada daha uzundur, çünkü ağırlıklar diskten okunur.",
    "Siparişiniz kargoya verildi. Takip numaranız: 7845 1290 3356. Tahmini teslim süresi iki iş günüdür.",
    "Anneannemin tarifiyle yaptığım mercimek çorbası herkesin çok hoşuna gitti; üzerine biraz pul biber ve "
    "limon sıkmayı unutmayın.",
    "Yapay zekâ modelleri büyüdükçe daha fazla bellek ve işlem gücü gerektiriyor; bu nedenle nicemleme "
    "(quantization) gibi teknikler, modelleri sıradan bilgisayarlarda çalıştırmak için giderek daha önemli hale "
    "geliyor. Ancak her hızlandırma, çıktının kalitesini bir miktar değiştirebilir, bu yüzden sonuçları her zaman "
    "ölçmek gerekir.",
    "Please find attached the signed contract. Let me know if anything needs to change before Friday.",
    "Dear customer, your subscription will renew automatically on 1 July unless you cancel before then.",
    "Step 1: unplug the device. Step 2: hold the reset button for ten seconds. Step 3: plug it back in and wait "
    "for the green light.",
    "What's the capital of Australia? Most people guess Sydney, but it's Canberra.",
    "Honestly the sequel was better than the original: tighter plot, better acting, and a soundtrack I still "
    "listen to.",
    "Terrible service. We waited forty-five minutes for cold food and nobody apologised.",
    "The hotel was spotless and the staff went out of their way to help us find a late-night pharmacy.",
    "Mix 250 g flour, 2 eggs, 500 ml milk and a pinch of salt; rest the batter for 30 minutes before frying.",
    "Patients with type 2 diabetes who walked for thirty minutes after dinner showed lower overnight glucose "
    "levels than those who stayed seated.",
    "The defendant pleaded not guilty to all three charges, and the trial is expected to last six weeks.",
    "Astronomers have detected water vapour in the atmosphere of an exoplanet about 120 light-years from Earth.",
    "Our quarterly all-hands will cover the product roadmap, hiring plans and the results of the employee survey.",
    "Remember to water the tomatoes every morning during the heatwave, preferably before the sun is high.",
    "The museum is open Tuesday to Sunday, 10:00-18:00; admission is free on the first Sunday of each month.",
    "Version 2.3.1 fixes a memory leak in the image decoder and adds support for HEIC files on Windows.",
    "The new bridge, 1.8 km long, cut the journey between the two towns from forty minutes to under ten.",
    "Shakespeare wrote around 39 plays, 154 sonnets and several longer poems during his career.",
    "Climate scientists warn that without deep cuts in emissions, average global temperatures could rise by "
    "more than two degrees this century. Coastal cities face higher sea levels and more frequent storm surges, "
    "while farmers in dry regions may see lower yields as droughts grow longer. Adaptation, from sea walls to "
    "drought-resistant crops, will be needed alongside mitigation, and the cost of both rises the longer action "
    "is delayed.",
    "When you batch texts of very different lengths together, every short text is padded to the length of the "
    "longest one in its batch, and the model spends most of its time multiplying zeros that are masked out "
    "afterwards. Sorting the texts by length before batching keeps texts of similar length together, so each "
    "batch pads only a little. The order of the results is restored at the end, so the caller never notices "
    "that anything was reordered, but the throughput can double on a mixed corpus.",
    "I moved to a small village three years ago after a decade in the city. At first the silence kept me awake "
    "at night, and I missed being able to order food at midnight. Now I know the baker, the postman and most of "
    "the neighbours by name. The internet is slow, the nearest cinema is an hour away, and the winters are long "
    "and dark. Still, when I walk the dog along the river at sunrise and the only sound is the water, I cannot "
    "imagine going back. Friends visit more often than they did when I lived around the corner, and they stay "
    "longer. Life is slower here, but it feels fuller, and I have finally started the garden I always talked "
    "about. This spring the first beans came up, the courgettes took over half the bed, and a family of blackbirds "
    "moved into the hedge by the gate.",
    "The support ticket reads as follows. Since the update last Tuesday, the application crashes whenever I try "
    "to export a report as a PDF. Exporting to Excel still works. I am on Windows 11, version 23H2, with 16 GB of "
    "RAM, and the crash happens both on my laptop and on my desktop. I have reinstalled the application, cleared "
    "the cache folder and tried with a brand-new report containing only one table, and it still crashes after "
    "about five seconds with no error message. This is blocking our month-end closing, so any workaround would "
    "be appreciated. I can send logs or a screen recording if that helps.",
    "Attention lets every token look at every other token in the sentence and decide how much each one matters "
    "for its own meaning. For a sentence of n tokens this needs n times n scores in every head of every layer, "
    "which is why long inputs become expensive quickly. Models such as MiniLM keep the number of layers and the "
    "hidden size small, so a sentence embedding costs only a few million multiply-adds per token. Mean pooling "
    "then averages the token vectors, ignoring padding, and normalising the result to unit length makes the dot "
    "product of two embeddings equal to their cosine similarity, which is what search and clustering use.",
    "https://example.com/docs/getting-started?lang=en#installation",
    "Call me at +90 212 555 01 23 or email destek@example.com.tr before 17:00.",
    "ID: 9f8e7d6c-5b4a-3210-fedc-ba9876543210",
    "3.14159 2.71828 1.41421 1.61803",
    "Q3 2023: 1,204 units; Q4 2023: 1,587 units (+31.8%).",
]


def documentation_paragraphs(count: int) -> list[str]:
    """`count` real English paragraphs of mixed length from Python's own documentation, the same every run.

    The standard library ships its reference manual's topics as text (`pydoc_data.topics`): over a thousand distinct
    prose paragraphs (code blocks and doctests dropped) from 5 to about 260 words. They are taken evenly spaced over the
    whole manual, so any count mixes topics and lengths alike.
    """
    from pydoc_data.topics import topics

    prose = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = textwrap.dedent(block).strip("\n").splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines) or ">>>" in block:
                continue  # an indented block is code or a grammar rule, not prose
            paragraph = " ".join(" ".join(lines).split())
            if len(paragraph.split()) >= 5 and paragraph[-1] in ".:!?)":
                prose.append(paragraph)
    prose = list(dict.fromkeys(prose))  # some paragraphs appear under several topics
    if not 1 <= count <= len(prose):
        raise ValueError(f"count must be between 1 and {len(prose)} (the prose paragraphs available), got {count}")
    return [prose[i * len(prose) // count] for i in range(count)]


def held_out_halves(items: list[str], lengths: list[int]) -> tuple[list[str], list[str]]:
    """Two halves with the same mix of lengths: the items sorted by length, then every other one to each half. The
    first half chooses, the second (never seen by the choice) confirms; each keeps the items' original order."""
    if len(items) != len(lengths) or len(items) < 2:
        raise ValueError(f"need at least 2 items with a length each, got {len(items)} items, {len(lengths)} lengths")
    by_length = sorted(range(len(items)), key=lambda i: lengths[i])
    return [items[i] for i in sorted(by_length[0::2])], [items[i] for i in sorted(by_length[1::2])]
