"""Int8 bookkeeping for the lessons: the activation range this CPU affords, what a variant stores, which Linears int8 hurts.

PyTorch's dynamic int8 (`quantize_dynamic`) stores each nn.Linear's weight as int8 (one scale per output row) and
quantises the activations on the fly at every call. How many bits those activations get is the fidelity question:
fbgemm's AVX2 kernel multiplies uint8 activations by int8 weights with `vpmaddubsw`, which adds pairs of products
into int16 and saturates, so the stock module always passes `reduce_range=True` (7-bit activations: no overflow, but
half the resolution). CPUs with VNNI (`vpdpbusd`) or AMX accumulate straight into int32, so there the full 8 bits
are safe and noticeably more faithful.
"""
from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Sequence

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from common.device import cpu_flags, native_bf16
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
