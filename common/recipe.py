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


def ranked(names: Sequence[str], ratio: Ratio) -> list[str]:
    """The candidates fastest first: by how many others each is faster than by their direct paired ratio (Copeland
    count), ties by the larger geometric mean of those ratios."""
    def score(name: str) -> tuple[int, float]:
        others = [ratio(name, other)[0] for other in names if other != name]
        return sum(r > 1 for r in others), sum(math.log(r) for r in others)

    return sorted(names, key=score, reverse=True)


def fastest(names: Sequence[str], ratio: Ratio) -> str | None:
    """The first of `ranked`: the candidate faster than the most others by direct ratio (None when there are none)."""
    return next(iter(ranked(names, ratio)), None)


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


def finalists(rows: Sequence[dict[str, Any]], ratio: Ratio, peers: Sequence[str], bar: FidelityBar,
              keep: Sequence[str] = (), own: int = 2,
              family: Callable[[str], Any] = lambda name: name) -> tuple[list[str], dict[str, str]]:
    """Screening: the `own` fastest non-peer candidates keeping the bar go on, with every peer keeping it (the recipe
    bar's opponent is decided on the whole corpus, not on a sample), `keep`, and every qualified candidate of an own
    finalist's `family` (in row order); every other one with why it stops here."""
    choice = choose(rows, ratio, peers, bar)
    qualified = [row["workload"] for row in rows if row["workload"] not in choice.excluded]
    ours = ranked([name for name in qualified if name not in peers], ratio)
    families = {family(name) for name in ours[:own]}
    going = {*ours[:own], *(name for name in qualified if name in peers), *keep,
             *(name for name in ours if family(name) in families)}
    stopped = {}
    for row in rows:
        name = row["workload"]
        if name in going:
            continue
        if name in choice.excluded:  # every qualified peer goes on, so a stopped peer is always here
            stopped[name] = choice.excluded[name]
            continue
        estimate, low, high = ratio(name, ours[0])
        stopped[name] = f"{estimate:.2f}x [{low:.2f}-{high:.2f}] the speed of {ours[0]}"
    return [row["workload"] for row in rows if row["workload"] in going], stopped


def pairwise(names: Sequence[str], ratio: Ratio) -> dict[str, dict[str, list[float]]]:
    """Every pair's direct ratio (estimate, low, high) as nested JSON-ready dicts: pairs[a][b] = a over b."""
    return {a: {b: list(ratio(a, b)) for b in names if b != a} for a in names}


def pytorch_snippet(config: dict[str, Any], model_id: str, texts: list[str], embed_source: str, max_length: int,
                    device_type: str = "cpu") -> str:
    """A PyTorch winner as code a learner can paste: public APIs and a few inline lines, ending in `embeddings =`.

    `config` is the candidate's: variant ("fp32", "half" with its dtype, "int8" with the kept Linears, their dtype,
    the activation range and SmoothQuant's calibration texts, "torchao", "pt2e"), batch and compile; `embed_source`
    is the embed_sorted function the lesson timed (defined before the model is changed: calibration runs it).
    """
    head = ["import torch", "from transformers import AutoModel, AutoTokenizer", "",
            f"tokenizer = AutoTokenizer.from_pretrained({model_id!r})",
            f"model = AutoModel.from_pretrained({model_id!r}, dtype=" + (config.get("dtype") or "torch.float32")
            + ")" + (f'.to("{device_type}")' if device_type != "cpu" else "")]
    lines: list[str] = []
    if config["variant"] == "int8":
        if config.get("calibration"):
            lines += _smoothquant_lines(config["calibration"], config.get("alpha", 0.5), max_length)
        head[1:1] = ["from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic"]
        if config["kept"]:
            lines += ["# the Linears int8 hurts most (section 5's ranking) stay unquantised",
                      f"kept = {config['kept']!r}",
                      "int8 = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) "
                      "and name not in kept]"]
        else:
            lines += ["# every Linear in int8",
                      "int8 = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]"]
        if not config["reduce_range"]:  # after the imports: torch, torch.ao.quantization, transformers
            head[3:3] = ["", "", "class FullRangeLinear(DynamicLinear):  # 8-bit activations (the stock one: 7)",
                         "    def forward(self, x):",
                         "        packed = self._packed_params._packed_params",
                         "        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)"
                         ".to(x.dtype)", ""]
            head[1:1] = ["from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear"]
        mapping = ", mapping={torch.nn.Linear: FullRangeLinear}" if not config["reduce_range"] else ""
        lines.append("model = quantize_dynamic(model, dict.fromkeys(int8, per_channel_dynamic_qconfig),\n"
                     f"                         dtype=torch.qint8{mapping})")
        if config["kept"] and config["keep_dtype"] == "bfloat16":
            lines += ["for name in kept:  # bf16 where this CPU ran it faster than fp32: cast in, compute, cast back",
                      "    linear = model.get_submodule(name).to(torch.bfloat16)",
                      "    model.get_submodule(name).forward = lambda x, linear=linear: torch.nn.functional.linear(",
                      "        x.to(torch.bfloat16), linear.weight, linear.bias).to(x.dtype)"]
    elif config["variant"] == "torchao":
        head[1:1] = ["from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_"]
        lines.append(f"quantize_(model, Int8DynamicActivationInt8WeightConfig(reduce_range={config['reduce_range']}))")
    elif config["variant"] == "pt2e":
        head[1:1] = ["from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e",
                     "from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86",
                     "from transformers.modeling_outputs import BaseModelOutput"]
        lines += _pt2e_lines(config["reduce_range"])
    if config.get("compile") and config["variant"] != "pt2e":
        lines.append("model = torch.compile(model, dynamic=True)  # the first call compiles, once for every shape")
    return ("\n".join(head) + "\n\n\n" + embed_source + "\n\n\n" + "\n".join(lines) + "\n\n"
            f"texts = {list_literal(texts)}\nembeddings = embed_sorted(model, tokenizer, texts, "
            f"batch_size={config['batch']}, max_length={max_length})")


def _smoothquant_lines(calibration: list[str], alpha: float, max_length: int) -> list[str]:
    """SmoothQuant on a BERT model as pasteable lines (common.quantize.smooth_bert written out)."""
    return [
        "# SmoothQuant: per input channel j of the Linears after each LayerNorm, s_j = max|x_j|^a / max|w_j|^(1-a)",
        "# multiplies their weights and divides the LayerNorm; BERT adds that LayerNorm's output back later, so",
        "# that residual is multiplied by s again. Exact in fp32; int8 then sees smaller activation outliers.",
        f"calibration = {list_literal(calibration)}",
        "layers = model.encoder.layer",
        "groups = [(model.embeddings.LayerNorm, layers[0].attention.self, layers[0].attention.output)]",
        "for i, layer in enumerate(layers):",
        "    groups.append((layer.attention.output.LayerNorm, layer.intermediate, layer.output))",
        "    if i + 1 < len(layers):",
        "        groups.append((layer.output.LayerNorm, layers[i + 1].attention.self, layers[i + 1].attention.output))",
        "peaks = {}",
        "",
        "",
        "def record(norm, inputs, out):",
        "    peak = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()",
        "    peaks[norm] = torch.maximum(peaks[norm], peak) if norm in peaks else peak",
        "",
        "",
        "hooks = [norm.register_forward_hook(record) for norm, _, _ in groups]",
        f"embed_sorted(model, tokenizer, calibration, batch_size=32, max_length={max_length})",
        "for hook in hooks:",
        "    hook.remove()",
        "with torch.no_grad():",
        "    for norm, block, residual in groups:",
        "        linears = [block.query, block.key, block.value] if hasattr(block, 'query') else [block.dense]",
        "        weight_max = torch.stack([linear.weight.abs().amax(0) for linear in linears]).amax(0)",
        f"        s = (peaks[norm].pow({alpha}) / weight_max.pow({1 - alpha})).clamp(1e-5)",
        "        norm.weight.div_(s)",
        "        norm.bias.div_(s)",
        "        for linear in linears:",
        "            linear.weight.mul_(s)",
        "        residual.register_forward_pre_hook(lambda block, args, s=s: (args[0], args[1] * s))"]


def _pt2e_lines(reduce_range: bool) -> list[str]:
    """PT2E's x86 dynamic int8 as pasteable lines (export with dynamic shapes, prepare, convert, compile)."""
    return [
        "model.pooler = None  # unused, and its dead Linear+Tanh pair breaks the quantizer's fusion matching",
        "names = list(tokenizer.model_input_names)",
        "",
        "",
        "class LastHiddenState(torch.nn.Module):  # inputs by position in, one tensor out: what export traces",
        "    def __init__(self, model):",
        "        super().__init__()",
        "        self.model = model",
        "",
        "    def forward(self, *inputs):",
        "        return self.model(**dict(zip(names, inputs))).last_hidden_state",
        "",
        "",
        "class Encoder(torch.nn.Module):  # the compiled graph called like the model, for embed_sorted",
        "    def __init__(self, graph, config):",
        "        super().__init__()",
        "        self.graph, self.config, self.device = graph, config, torch.device('cpu')",
        "",
        "    def forward(self, **inputs):",
        "        return BaseModelOutput(last_hidden_state=self.graph(*(inputs[name] for name in names)))",
        "",
        "",
        "example = tokenizer(['a short text', 'a somewhat longer example text for the export'], padding=True,",
        "                    return_tensors='pt')",
        "batch = torch.export.Dim('batch', min=1, max=4096)",
        "sequence = torch.export.Dim('sequence', max=model.config.max_position_embeddings)",
        "exported = torch.export.export(LastHiddenState(model.eval()), tuple(example[name] for name in names),",
        "                               dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),)).module()",
        "quantizer = x86.X86InductorQuantizer().set_global(",
        f"    x86.get_default_x86_inductor_quantization_config(is_dynamic=True, reduce_range={reduce_range}))",
        "prepared = prepare_pt2e(exported, quantizer)",
        "prepared(*(example[name] for name in names))",
        "model = Encoder(torch.compile(convert_pt2e(prepared), dynamic=True), model.config)"]


def list_literal(items: Sequence[str]) -> str:
    """A list of strings as Python source, one item per line, so a pasted snippet stays narrow."""
    return "[\n" + "".join(f"    {item!r},\n" for item in items) + "]"
