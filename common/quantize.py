"""Int8 for CPU inference: the activation range this CPU affords, GPT-2's Conv1D, selective, SmoothQuant, torchao, PT2E.

PyTorch's dynamic int8 (`quantize_dynamic`) stores each nn.Linear's weight as int8 (one scale per output row) and
quantises the activations on the fly at every call. How many bits those activations get is the fidelity question:
fbgemm's AVX2 kernel multiplies uint8 activations by int8 weights with `vpmaddubsw`, which adds pairs of products
into int16 and saturates, so the stock module always passes `reduce_range=True` (7-bit activations: no overflow, but
half the resolution). CPUs with VNNI (`vpdpbusd`) or AMX accumulate straight into int32, so there the full 8 bits
are safe and noticeably more faithful.
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from common.device import cpu_flags, native_bf16
from common.errors import first_line
from common.fidelity import cosine_fidelity
from common.memory import MIB, weights_bytes

# Any one of these accumulates uint8 x int8 products in int32 (AVX-512 VNNI, AVX-VNNI, AMX), so 8-bit activations
# cannot saturate an intermediate sum.
INT32_ACCUMULATING_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class ActivationRange:
    """The activation range chosen for dynamic int8 on a CPU, with the reason a lesson can print."""

    reduce_range: bool  # True: 7-bit activations (quantized::linear_dynamic's reduce_range)
    reason: str
    measure_both: bool  # the choice trades fidelity for safety here, so both are worth measuring

    @property
    def bits(self) -> int:
        """Bits the activations are quantised to."""
        return 7 if self.reduce_range else 8


def choose_activation_range(flags: Sequence[str] | None = None) -> ActivationRange:
    """8-bit activations where the CPU accumulates int8 products in int32 (VNNI/AMX), 7-bit elsewhere."""
    flags = cpu_flags() if flags is None else list(flags)
    safe = [flag for flag in INT32_ACCUMULATING_FLAGS if flag in flags]
    if safe:
        return ActivationRange(False, f"this CPU has {', '.join(safe)} (instructions that add int8 products up in "
                                      "32-bit integers), so a sum of 8-bit activations cannot overflow",
                               measure_both=False)
    if "avx2" in flags:
        return ActivationRange(True, "AVX2 without VNNI (the int8 dot-product instructions): fbgemm, PyTorch's int8 "
                                     "CPU kernels, adds pairs of int8 products in 16-bit integers, which 8-bit "
                                     "activations can overflow, so 7-bit is the safe default", measure_both=True)
    return ActivationRange(True, "no x86 int8 features reported (flags: "
                                 f"{', '.join(flags) or 'none'}): keeping PyTorch's safe 7-bit default",
                           measure_both=False)


class FullRangeDynamicLinear(DynamicQuantizedLinear):
    """Dynamic int8 Linear that quantises activations to all 8 bits (reduce_range=False)."""

    # The stock module hard-codes reduce_range=True for its current serialisation version (a legacy branch for
    # version < 4 drops it). Overriding forward says what we mean without relying on that branch.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                  reduce_range=False).to(x.dtype)

    def _get_name(self) -> str:
        """The name printed in the model's repr, so the 8-bit-activation variant is recognisable."""
        return "DynamicQuantizedLinear8bitActivations"


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear in the model, in module order."""
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


def quantize_dynamic_int8(model: nn.Module, reduce_range: bool, layers: Collection[str] | None = None,
                          per_channel: bool = True) -> nn.Module:
    """A dynamic-int8 copy: the named Linears (all by default) get int8 weights and 7- or 8-bit activations."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    names = linear_names(model) if layers is None else list(layers)
    unknown = set(names) - set(linear_names(model))
    if unknown:
        raise ValueError(f"not nn.Linear layers of this model: {sorted(unknown)}")
    # Module names as keys quantise exactly these layers; the mapping picks which dynamic module replaces them.
    module = DynamicQuantizedLinear if reduce_range else FullRangeDynamicLinear
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao; kept as the baseline
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, dict.fromkeys(names, qconfig), dtype=torch.qint8, mapping={nn.Linear: module})


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' Conv1D (GPT-2's x @ W + b) by the equivalent nn.Linear in place; returns how many."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                # Conv1D stores W as (in, out); Linear wants (out, in), so the same numbers, transposed.
                linear = nn.Linear(child.nx, child.nf, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


@dataclass(frozen=True)
class QuantizedShare:
    """How much of a model's matrix-multiply weights is stored quantised (int8 or 4-bit): element counts and share."""

    quantized_elements: int  # weight elements stored as int8 (torch.ao, torchao, bitsandbytes 8-bit) or 4-bit (nf4/fp4)
    matmul_elements: int  # weights of Linear, Conv1D and quantised Linear layers: what quantisation could reach

    @property
    def of_matmul(self) -> float:
        """Share of the matrix-multiply weights that are stored quantised."""
        return self.quantized_elements / self.matmul_elements if self.matmul_elements else 0.0


def quantized_share(model: nn.Module) -> QuantizedShare:
    """Count quantised weight elements (torch.ao dynamic, torchao int8, bitsandbytes 8/4-bit) against all matmuls."""
    from transformers.pytorch_utils import Conv1D

    quantized = matmul = 0
    for module in model.modules():
        if isinstance(module, DynamicQuantizedLinear):
            weight = module.weight()
            quantized += weight.numel() if weight.dtype == torch.qint8 else 0
            matmul += weight.numel()
        elif isinstance(module, (nn.Linear, Conv1D)):  # bitsandbytes' Linear8bitLt and Linear4bit are nn.Linears
            matmul += _logical_numel(module.weight)
            quantized += _logical_numel(module.weight) if _is_quantized(module.weight) else 0
    return QuantizedShare(quantized, matmul)


def storage_columns(model: nn.Module, reference_bytes: int) -> dict[str, float]:
    """How a variant is stored, as table columns: size_mib, size_pct of the reference's bytes, quantized_share."""
    size = weights_bytes(model)
    return {"size_mib": size / MIB, "size_pct": 100 * size / reference_bytes,
            "quantized_share": quantized_share(model).of_matmul}


def _logical_numel(weight: torch.Tensor) -> int:
    """Elements of the matrix a weight stands for: bitsandbytes packs two 4-bit values a byte and keeps the shape."""
    state = getattr(weight, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else weight.numel()


def _is_quantized(weight: torch.Tensor) -> bool:
    """True for int8 storage (torchao's subclasses included, which report a float dtype) or packed 4-bit."""
    if weight.dtype in (torch.int8, torch.qint8) or getattr(weight, "quant_state", None) is not None:
        return True
    inner = getattr(weight, "qdata", None)  # torchao's Int8Tensor keeps its int8 data here
    return isinstance(inner, torch.Tensor) and inner.dtype == torch.int8


@dataclass(frozen=True)
class LayerSensitivity:
    """Fidelity of the model with only this one Linear quantised, against fp32."""

    name: str
    cosine_mean: float
    cosine_min: float

    @property
    def drop(self) -> float:
        """How much this layer alone costs: 1 - mean cosine."""
        return 1.0 - self.cosine_mean


def rank_sensitivity(model: nn.Module, embed: Callable[[nn.Module], torch.Tensor], reduce_range: bool,
                     progress: str | None = None) -> list[LayerSensitivity]:
    """Quantise one Linear at a time, embed with it, and rank the layers by cosine drop against fp32, worst first.

    `embed(model)` returns the embeddings of a small fixed text set: one pass per Linear is the whole cost, so keep
    that set small (a dozen texts ranks MiniLM's 36 layers in seconds).
    """
    from tqdm.auto import tqdm

    reference = embed(model)
    ranking = []
    for name in tqdm(linear_names(model), desc=progress, disable=True if progress is None else None, leave=False,
                     unit="layer"):
        with _only_quantized(model, name, reduce_range):
            fidelity = cosine_fidelity(reference, embed(model))
        ranking.append(LayerSensitivity(name, fidelity["cosine_mean"], fidelity["cosine_min"]))
    return sorted(ranking, key=lambda layer: layer.drop, reverse=True)


@contextmanager
def _only_quantized(model: nn.Module, name: str, reduce_range: bool) -> Iterator[None]:
    """Swap one Linear for its int8 version for the duration of the block, then put the fp32 one back."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, child)
    # Quantising a one-layer wrapper copies just that layer, not the whole model as quantize_dynamic would.
    setattr(parent, child, quantize_dynamic_int8(nn.Sequential(original), reduce_range)[0])
    try:
        yield
    finally:
        setattr(parent, child, original)


def quantize_selective(model: nn.Module, ranking: Sequence[LayerSensitivity], keep_fp32: int,
                       reduce_range: bool) -> tuple[nn.Module, list[str]]:
    """A dynamic-int8 copy with the `keep_fp32` most sensitive Linears left in fp32; returns it and their names."""
    if not 0 <= keep_fp32 <= len(ranking):
        raise ValueError(f"keep_fp32 must be between 0 and {len(ranking)}, got {keep_fp32}")
    kept = [layer.name for layer in ranking[:keep_fp32]]
    quantised = [name for name in linear_names(model) if name not in kept]
    return quantize_dynamic_int8(model, reduce_range, layers=quantised), kept


def int8_dynamic(model: nn.Module, reduce_range: bool | None = None, per_channel: bool = True) -> nn.Module:
    """A dynamic-int8 copy of every Linear (GPT-2's Conv1D included), activations 8- or 7-bit as this CPU allows."""
    model = copy.deepcopy(model)
    conv1d_to_linear(model)  # GPT-2's Conv1D is a Linear in disguise: without this it stays fp32
    if reduce_range is None:
        reduce_range = choose_activation_range().reduce_range
    return quantize_dynamic_int8(model, reduce_range=reduce_range, per_channel=per_channel)


def bnb_compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a bitsandbytes model computes in (and loads its unquantised parts as): bf16 on a GPU with bf16
    tensor cores, fp16 on an older GPU (LLM.int8 casts anything else to fp16 on every Linear), fp32 on a CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def variant_unavailable(variant: str, device: torch.device) -> str | None:
    """Why a quantisation variant ("int8-...", "bnb-...") cannot run on this device here, or None."""
    if variant.startswith("int8-"):
        if device.type != "cpu":
            return "PyTorch's dynamic int8 kernels are CPU-only"
        if importlib.util.find_spec("torch.ao.quantization") is None:
            return f"torch {torch.__version__} no longer ships torch.ao.quantization (torchao replaces it)"
    if variant.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if variant.startswith("bnb") and device.type == "mps":
        return "bitsandbytes has no Apple MPS backend"
    return None


def torchao_unavailable() -> str | None:
    """Why torchao's int8 path cannot run here (not installed, or an incompatible build), or None when it can."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao; 0.18.0 ran on CPU with torch 2.13)"
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as error:  # a torchao built for another torch fails in many ways; the reason is what matters
        return f"torchao does not import here: {first_line(error)}"
    return None


def quantize_torchao_int8(model: nn.Module, reduce_range: bool = False) -> nn.Module:
    """A copy quantised with torchao's int8 dynamic-activation / int8-weight config (what PyTorch now points to);
    reduce_range=True gives the activations 7 bits, as the CPU's activation range asks."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantised = copy.deepcopy(model)
    quantize_(quantised, Int8DynamicActivationInt8WeightConfig(reduce_range=reduce_range))
    return quantised


class CastLinear(nn.Module):
    """A Linear kept in a lower float precision (bf16) inside an fp32 model: casts its input in and its output back."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = linear.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype)).to(x.dtype)


def quantize_mixed(model: nn.Module, kept: Collection[str], keep_dtype: torch.dtype,
                   reduce_range: bool) -> nn.Module:
    """A dynamic-int8 copy with the `kept` Linears left unquantised, in `keep_dtype` (fp32, or bf16 where fast)."""
    quantised = quantize_dynamic_int8(model, reduce_range, [name for name in linear_names(model) if name not in kept])
    if keep_dtype != torch.float32:
        for name in kept:
            parent, _, child = name.rpartition(".")
            holder = quantised.get_submodule(parent)
            setattr(holder, child, CastLinear(getattr(holder, child), keep_dtype))
    return quantised


def pt2e_unavailable() -> str | None:
    """Why PyTorch 2's export-based x86 int8 path (PT2E, in torchao since torch 2.13) cannot run here, or None."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: F401
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer  # noqa: F401
    except Exception as error:  # a missing or broken torchao lands here
        return f"torchao's PT2E does not import: {first_line(error)}"
    return None


def x86_dynamic_quantizer(reduce_range: bool) -> Any:
    """torchao's X86InductorQuantizer for dynamic int8: int8 weights, activations quantised per call (7 or 8 bits)."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config(is_dynamic=True, reduce_range=reduce_range)
    return x86.X86InductorQuantizer().set_global(config)


def export_encoder(model: nn.Module, example: dict[str, torch.Tensor]) -> nn.Module:
    """torch.export of an encoder's last hidden state, batch and sequence dynamic, as a module taking the inputs
    by position (in `example`'s order): what prepare_pt2e annotates.

    Dynamic shapes rather than fixed buckets: one export serves every batch of a length-sorted corpus. The pooler is
    dropped: its output is unused here, and its dead Linear+Tanh pair breaks the quantizer's fusion matching.
    """
    names = list(example)
    encoder = copy.deepcopy(model).eval()
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    longest = getattr(model.config, "max_position_embeddings", 4096)  # export proves the graph for every length
    batch, sequence = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", max=longest)
    exported = torch.export.export(_PositionalEncoder(encoder, names), tuple(example[name] for name in names),
                                   dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),))  # *inputs: one
    return exported.module()


class _PositionalEncoder(nn.Module):
    """The encoder called with its inputs by position, returning only the last hidden state (what gets exported)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


class ExportedEncoder(nn.Module):
    """An exported (and quantised, compiled) encoder graph called like the model: keywords in, .last_hidden_state
    out, with .config and .device, so the same embedding code runs it."""

    def __init__(self, graph: Callable[..., torch.Tensor], config: Any, names: list[str]) -> None:
        super().__init__()
        self.graph, self.config, self.names = graph, config, names

    @property
    def device(self) -> torch.device:
        """Where the graph's inputs go: PT2E's x86 path runs on the CPU."""
        return torch.device("cpu")

    def forward(self, **inputs: torch.Tensor) -> Any:
        return SimpleNamespace(last_hidden_state=self.graph(*(inputs[name] for name in self.names)))


@dataclass(frozen=True)
class SmoothGroup:
    """A LayerNorm, the Linears reading its output, and the residual block that adds that output back in."""

    norm: str
    linears: tuple[str, ...]
    residual: str  # the BertSelfOutput/BertOutput whose input_tensor is this LayerNorm's output


def bert_smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Where a BERT-style (post-LayerNorm) encoder has a LayerNorm feeding Linears: embeddings and every sublayer,
    except the last layer's output LayerNorm, whose output is the model's."""
    prefix = "encoder.layer" if hasattr(model, "encoder") else "layer"
    layers = len(model.get_submodule(prefix))
    qkv = [tuple(f"{prefix}.{i}.attention.self.{name}" for name in ("query", "key", "value")) for i in range(layers)]
    groups = [SmoothGroup("embeddings.LayerNorm", qkv[0], f"{prefix}.0.attention.output")]
    for i in range(layers):
        groups.append(SmoothGroup(f"{prefix}.{i}.attention.output.LayerNorm", (f"{prefix}.{i}.intermediate.dense",),
                                  f"{prefix}.{i}.output"))
        if i + 1 < layers:
            groups.append(SmoothGroup(f"{prefix}.{i}.output.LayerNorm", qkv[i + 1],
                                      f"{prefix}.{i + 1}.attention.output"))
    return groups


def activation_absmax(model: nn.Module, names: Collection[str], calibrate: Callable[[nn.Module], Any]
                      ) -> dict[str, torch.Tensor]:
    """Per-channel max |output| of the named modules over everything calibrate(model) runs through the model."""
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            peak = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
            absmax[name] = torch.maximum(absmax[name], peak) if name in absmax else peak
        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        calibrate(model)
    finally:
        for handle in handles:
            handle.remove()
    return absmax


def _rescale_residual(block: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook of a residual block whose skip input arrives divided by s: multiplies s back first."""
    hidden_states, input_tensor = args
    return hidden_states, input_tensor * block.smooth_scale


def smooth_bert(model: nn.Module, calibrate: Callable[[nn.Module], Any], alpha: float = 0.5) -> nn.Module:
    """A SmoothQuant-smoothed copy, equal to the model in fp32: per input channel j of the Linears after each
    LayerNorm, s_j = max|X_j|^alpha / max|W_j|^(1-alpha) scales their weight columns up and the LayerNorm's weight
    and bias down: a few outlier channels no longer set the one int8 scale of a whole activation tensor, and alpha
    shares the quantisation difficulty between activations and weights.

    BERT is post-LayerNorm: the normalised output is also the next residual, so that block multiplies s back in
    (one elementwise product per block, against the smoothed LayerNorm's free fold).
    """
    smoothed = copy.deepcopy(model).eval()
    groups = bert_smooth_groups(smoothed)
    absmax = activation_absmax(smoothed, [group.norm for group in groups], calibrate)
    scales = {}
    with torch.no_grad():
        for group in groups:
            linears = [smoothed.get_submodule(name) for name in group.linears]
            weight_max = torch.stack([linear.weight.abs().amax(0) for linear in linears]).amax(0)
            scale = scales[group.residual] = (absmax[group.norm].pow(alpha) / weight_max.pow(1 - alpha)).clamp(1e-5)
            norm = smoothed.get_submodule(group.norm)
            norm.weight.div_(scale)
            norm.bias.div_(scale)
            for linear in linears:
                linear.weight.mul_(scale)
    for name, scale in scales.items():  # a hook, not a wrapper: every Linear keeps its name (the kept list)
        block = smoothed.get_submodule(name)
        block.register_buffer("smooth_scale", scale)
        block.register_forward_pre_hook(_rescale_residual)
    return smoothed
