"""Shared test helpers: PNG signature check and importing the digit-named lesson scripts."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from common.meter import SAME_BAND

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """True when the file starts with the 8-byte PNG signature and has more than a header."""
    data = Path(path).read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 1000


def verdict_of(low: float, high: float) -> str:
    """The verdict a speed-up interval must give (the meter's rule, restated so a drift in either shows)."""
    if low > 1 + SAME_BAND:
        return "faster"
    if high < 1 / (1 + SAME_BAND):
        return "slower"
    if 1 / (1 + SAME_BAND) <= low and high <= 1 + SAME_BAND:
        return "same" if low <= 1 <= high else "negligible"
    return "inconclusive"


UNDECIDED_WORDS = {"same": "no measurable difference", "negligible": "within +-3%: too small to matter",
                   "inconclusive": "inconclusive"}


def expected_sentence(a: str, b: str, verdict: str, speedup: float) -> str:
    """The start of the line printed for a vs b: the verdict in its words, with the ratio."""
    if verdict in UNDECIDED_WORDS:
        return f"{a} vs {b}: {UNDECIDED_WORDS[verdict]} ({speedup:.2f}x, interval"
    return f"{a} is {speedup:.2f}x as fast as {b}: {verdict} (interval"


def load_script(stem: str):
    """Import a lesson script (its name starts with a digit, so `import` cannot)."""
    spec = importlib.util.spec_from_file_location(f"lesson_{stem}", ROOT / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def png_ok():
    return is_png
