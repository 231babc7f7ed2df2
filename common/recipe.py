"""Choosing a recipe from one round-robin: which candidates keep the fidelity bar, and which of them is fastest.

Every ranking here uses the paired per-round ratio between the two candidates themselves (Comparison.ratio), never
each one's ratio to a third: medians of ratios do not compose, so "A is 2.3x the baseline and B 2.2x" can sit beside
"A is 0.89x B" in the same run. Rows that were not timed in the same round-robin are never ranked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

Ratio = Callable[[str, str], tuple[float, float, float]]  # (a, b) -> how many times faster a is than b, low, high


@dataclass(frozen=True)
class FidelityBar:
    """The fidelity every recommendation must keep: embedding cosine mean and worst text against the reference."""

    mean: float = 0.99
    worst: float = 0.98

    def keeps(self, cosine_mean: float, cosine_min: float) -> bool:
        """True when both the mean and the worst text reach the bar."""
        return cosine_mean >= self.mean and cosine_min >= self.worst

    def text(self) -> str:
        """The bar in words, as tables and bars quote it."""
        return f"cosine mean >= {self.mean} and min >= {self.worst}"


def failing_fidelity(row: dict[str, Any], bar: FidelityBar) -> str | None:
    """Why a candidate row misses the bar on the corpus or on the varied set (None when it keeps both)."""
    problems = [f"{where} {row[mean]:.4f}/{row[worst]:.4f}" for where, mean, worst in (
        ("corpus", "cosine_mean", "cosine_min"), ("varied set", "varied_mean", "varied_min"))
        if not bar.keeps(row[mean], row[worst])]
    return f"misses the fidelity bar ({', '.join(problems)})" if problems else None


def fastest(names: Sequence[str], ratio: Ratio) -> str | None:
    """The candidate that is faster than the most others by their direct paired ratio (Copeland count).

    Ties go to the larger geometric mean of its direct ratios against the rest; None when there are no names.
    """
    if not names:
        return None

    def score(name: str) -> tuple[int, float]:
        others = [ratio(name, other)[0] for other in names if other != name]
        return sum(r > 1 for r in others), sum(math.log(r) for r in others)

    return max(names, key=score)


@dataclass
class Choice:
    """The recipe's winner among the rows that keep the bar, the fastest peer, and why each other row lost."""

    winner: str | None
    best_peer: str | None  # the fastest qualified peer other than the winner: what the recipe bar compares with
    excluded: dict[str, str] = field(default_factory=dict)  # candidate -> why it cannot win


def choose(rows: Sequence[dict[str, Any]], ratio: Ratio, peers: Sequence[str], bar: FidelityBar,
           unavailable: dict[str, str] | None = None) -> Choice:
    """Winner = fastest row (by direct ratios) keeping the bar on the corpus and the varied set; peers may win."""
    excluded = dict(unavailable or {})
    for row in rows:
        reason = excluded.get(row["workload"]) or failing_fidelity(row, bar)
        if reason:
            excluded[row["workload"]] = reason
    qualified = [row["workload"] for row in rows if row["workload"] not in excluded]
    winner = fastest(qualified, ratio)
    best_peer = fastest([name for name in qualified if name in peers and name != winner], ratio)
    return Choice(winner, best_peer, excluded)


def pairwise(names: Sequence[str], ratio: Ratio) -> dict[str, dict[str, list[float]]]:
    """Every pair's direct ratio (estimate, low, high) as nested JSON-ready dicts: pairs[a][b] = a over b."""
    return {a: {b: list(ratio(a, b)) for b in names if b != a} for a in names}


def pytorch_snippet(config: dict[str, Any], model_id: str, texts: list[str], embed_source: str, max_length: int,
                    device_type: str = "cpu") -> str:
    """A PyTorch winner as code a learner can paste: public APIs and a few inline lines, ending in `embeddings =`.

    `config` is the candidate's: variant ("fp32", "half" with its dtype, "int8" with the kept Linears, their dtype
    and the activation range), batch and compile; `embed_source` is the embed_sorted function the lesson timed.
    """
    lines = ["import torch", "from transformers import AutoModel, AutoTokenizer", "",
             f"tokenizer = AutoTokenizer.from_pretrained({model_id!r})",
             f"model = AutoModel.from_pretrained({model_id!r}, dtype=" + (config.get("dtype") or "torch.float32")
             + ")" + (f'.to("{device_type}")' if device_type != "cpu" else "")]
    if config["variant"] == "int8":
        lines[1:1] = ["from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic"]
        lines += ["# the Linears int8 hurts most (section 5's ranking) stay unquantised", f"kept = {config['kept']!r}",
                  "int8 = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) "
                  "and name not in kept]"]
        if not config["reduce_range"]:  # after the imports: torch, torch.ao.quantization, transformers
            lines[3:3] = ["", "", "class FullRangeLinear(DynamicLinear):  # 8-bit activations (the stock one: 7)",
                          "    def forward(self, x):",
                          "        packed = self._packed_params._packed_params",
                          "        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)"
                          ".to(x.dtype)", ""]
            lines[1:1] = ["from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear"]
        mapping = ", mapping={torch.nn.Linear: FullRangeLinear}" if not config["reduce_range"] else ""
        lines.append("model = quantize_dynamic(model, dict.fromkeys(int8, per_channel_dynamic_qconfig),\n"
                     f"                         dtype=torch.qint8{mapping})")
        if config["keep_dtype"] == "bfloat16":
            lines += ["for name in kept:  # bf16 where this CPU ran it faster than fp32: cast in, compute, cast back",
                      "    linear = model.get_submodule(name).to(torch.bfloat16)",
                      "    model.get_submodule(name).forward = lambda x, linear=linear: torch.nn.functional.linear(",
                      "        x.to(torch.bfloat16), linear.weight, linear.bias).to(x.dtype)"]
    if config.get("compile"):
        lines.append("model = torch.compile(model, dynamic=True)  # the first call compiles, once for every shape")
    return ("\n".join(lines) + "\n\n\n" + embed_source + f"\n\ntexts = {list_literal(texts)}\n"
            f"embeddings = embed_sorted(model, tokenizer, texts, batch_size={config['batch']}, "
            f"max_length={max_length})")


def list_literal(items: Sequence[str]) -> str:
    """A list of strings as Python source, one item per line, so a pasted snippet stays narrow."""
    return "[\n" + "".join(f"    {item!r},\n" for item in items) + "]"
