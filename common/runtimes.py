"""Bookkeeping for 04's runtime contest: why a runtime cannot run here, the ONNX export its peers start from, the
one batching-and-pooling loop every candidate shares (so they differ only in their forward), where a pass's time
goes, and each winner's code as a learner pastes it. The runtimes' own calls are written in 04 itself."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.errors import first_line

Embedder = Callable[[list[str]], torch.Tensor]
OPSET = 17  # ONNX Runtime 1.32 and OpenVINO 2026 run it; the TorchScript exporter's well-trodden opset for BERT
SENTENCE_TRANSFORMERS, ONNX_FP32, ONNX_INT8 = "sentence-transformers fp32", "ONNX Runtime fp32", "ONNX Runtime int8"
OPENVINO_FP32, OPENVINO_INT8 = "OpenVINO fp32", "OpenVINO int8"
PYTORCH_FP32, PYTORCH_INT8 = "PyTorch fp32", "PyTorch int8"
PEERS = (SENTENCE_TRANSFORMERS, ONNX_FP32, ONNX_INT8, OPENVINO_FP32, OPENVINO_INT8)  # what a learner reaches for


def _missing(*modules: str) -> str | None:
    """The first of these modules that does not import, as a printable reason, or None when all do."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, or a broken install raising something else: both mean "skip"
            return f"{module} does not import ({first_line(error)}); pip install -r requirements.txt"
    return None


def onnx_unavailable() -> str | None:
    """Why ONNX export or ONNX Runtime cannot run here, or None when both can."""
    return _missing("onnx", "onnxruntime", "onnxruntime.quantization")


def sentence_transformers_unavailable() -> str | None:
    """Why sentence-transformers cannot run here, or None when it can."""
    return _missing("sentence_transformers")


def peer_problems(path: Path | str, device: torch.device) -> dict[str, str | None]:
    """Why each peer runtime cannot embed with the model at `path` on this device (None where it can)."""
    pooling = (None if (Path(path) / "modules.json").is_file() else
               f"{Path(path).name} has no modules.json, so sentence-transformers would guess its pooling")
    cpu_only = None if device.type == "cpu" else (f"it runs on the CPU here, so it would not compare with this run's "
                                                  f"{device}")
    onnx = onnx_unavailable() or cpu_only
    openvino = onnx_unavailable() or _missing("openvino") or cpu_only  # OpenVINO converts the ONNX export
    return {SENTENCE_TRANSFORMERS: sentence_transformers_unavailable() or pooling, ONNX_FP32: onnx, ONNX_INT8: onnx,
            OPENVINO_FP32: openvino, OPENVINO_INT8: openvino or _missing("nncf")}


def embed_sorted(forward, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings: tokenised once, length-sorted batches padded per batch, pooled in place."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    embeddings = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({key: [encoded[key][i] for i in rows] for key in encoded}, return_tensors="pt")
        hidden = forward(batch).float()  # the last hidden state: (texts, tokens, hidden size)
        if embeddings is None:
            embeddings = torch.empty(len(texts), hidden.shape[-1])
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embeddings[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
    return embeddings


def outside_forward_share(forward: Callable[[dict], torch.Tensor], tokenizer: Any, texts: list[str], batch_size: int,
                          max_length: int) -> float:
    """The share of one embed_sorted pass spent outside `forward`: tokenising, padding, pooling and copies."""
    inside = [0.0]

    def clocked(batch: dict) -> torch.Tensor:
        started = time.perf_counter()
        hidden = forward(batch)
        inside[0] += time.perf_counter() - started
        return hidden

    started = time.perf_counter()
    embed_sorted(clocked, tokenizer, texts, batch_size, max_length)
    return 1 - inside[0] / (time.perf_counter() - started)


class KeywordEncoder(nn.Module):
    """Calls the encoder with keyword arguments: the exporter passes inputs positionally, which transformers 5's
    BertModel.forward rejects, and only the last hidden state is wanted in the graph."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).last_hidden_state


def _fingerprint(model: nn.Module, input_names: list[str]) -> str:
    """What makes an exported file stale: config, weights (a cheap checksum: twins share configs), library versions."""
    checksum = sum(float(p.detach().float().sum()) for p in model.parameters())  # MPS has no float64
    parts = [model.config.to_json_string(), f"{checksum:.10e}", ",".join(input_names), torch.__version__, str(OPSET),
             str(model.config._attn_implementation)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def export_onnx(model: nn.Module, tokenizer: Any, folder: Path, name: str = "encoder") -> Path:
    """Export the encoder's last hidden state to folder/name.onnx (dynamic batch and sequence), reusing a fresh one."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path, stamp = folder / f"{name}.onnx", folder / f"{name}.json"
    input_names = list(tokenizer.model_input_names)
    fingerprint = _fingerprint(model, input_names)
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return path
    # Padding in the example keeps the attention-mask path in the traced graph (an all-ones mask may be skipped).
    example = tokenizer(["a short text", "a somewhat longer example text for the export"], padding=True,
                        return_tensors="pt")
    axes = {input_name: {0: "batch", 1: "sequence"} for input_name in input_names}
    # The exporter puts the module it is given back into that module's own mode afterwards, recursively: a fresh
    # wrapper is in training mode, which would switch the caller's model to dropout. So the wrapper starts in eval
    # and the model's own mode is restored after.
    was_training = model.training
    wrapper = KeywordEncoder(model, input_names).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the shape checks it freezes (the mask's padding length, SDPA's is_causal) and about
        # negative indices: none of them varies between inputs of a bidirectional encoder, and the tests compare
        # the exported outputs with PyTorch's on texts of mixed lengths.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index")
        torch.onnx.export(wrapper, tuple(example[n] for n in input_names), path,
                          input_names=input_names, output_names=["last_hidden_state"],
                          dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}},
                          opset_version=OPSET, dynamo=False)
    model.train(was_training)
    onnx.checker.check_model(str(path))
    stamp.write_text(json.dumps({"fingerprint": fingerprint}))
    return path


def quantize_onnx_int8(fp32_path: Path, reduce_range: bool) -> Path:
    """ONNX Runtime's dynamic int8 of an exported model (per-channel int8 weights, uint8 activations), cached.

    ORT's reduce_range narrows the WEIGHTS to 7 bits (PyTorch's narrows the activations) against the same AVX2
    int16 saturation, so the caller passes the same choice as for PyTorch (quantize.choose_activation_range).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = fp32_path.with_name(f"{fp32_path.stem}.int8{'-reduce-range' if reduce_range else ''}.onnx")
    if not path.exists() or path.stat().st_mtime < fp32_path.stat().st_mtime:
        # quantize_dynamic logs advice to run quant_pre_process first; on MiniLM that changed no output when tried
        # (its symbolic shape inference also fails on this graph), so the advice is muted rather than followed.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(fp32_path, path, per_channel=True, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.setLevel(level)
    return path


def list_literal(items: list[str]) -> str:
    """A list of strings as Python source: on one line when it fits in 110 columns, else one item per line."""
    flat = repr(list(items))
    return flat if len(flat) <= 110 else "[\n" + "".join(f"    {item!r},\n" for item in items) + "]"


_HEAD = '''import torch
from transformers import AutoModel, AutoTokenizer
{imports}
tokenizer = AutoTokenizer.from_pretrained({model!r})
model = AutoModel.from_pretrained({model!r}, dtype=torch.float32).eval()
'''
_EXPORT = '''names = tokenizer.model_input_names


class LastHiddenState(torch.nn.Module):  # the exporter passes inputs by position; the model wants keywords
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(**dict(zip(names, inputs))).last_hidden_state


example = tokenizer(["a short text", "a somewhat longer example text"], padding=True, return_tensors="pt")
torch.onnx.export(LastHiddenState(model).eval(), tuple(example[name] for name in names), "encoder.onnx",
                  input_names=names, output_names=["last_hidden_state"], opset_version={opset}, dynamo=False,
                  dynamic_axes={{name: {{0: "batch", 1: "sequence"}} for name in [*names, "last_hidden_state"]}})
'''
_FORWARD = {
    PYTORCH_FP32: ("", "", '''

def forward(batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state
'''),
    PYTORCH_INT8: ("from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic\n", "", '''
# every Linear in int8 (stock module: 7-bit activations, safe on every x86 CPU)
model = quantize_dynamic(model, {{torch.nn.Linear: per_channel_dynamic_qconfig}}, dtype=torch.qint8)


def forward(batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state
'''),
    ONNX_FP32: ("import onnxruntime as ort\n", _EXPORT, '''options = ort.SessionOptions()
options.intra_op_num_threads = {threads}
session = ort.InferenceSession("encoder.onnx", options, providers=["CPUExecutionProvider"])


def forward(batch):
    return torch.from_numpy(session.run(["last_hidden_state"], {{name: batch[name].numpy() for name in names}})[0])
'''),
    ONNX_INT8: ("import onnx\nimport onnxruntime as ort\nfrom onnxruntime.quantization import QuantType, "
                "quantize_dynamic\n", _EXPORT, '''quantize_dynamic("encoder.onnx", "encoder.int8.onnx", per_channel=True, reduce_range={reduce_range},
                 weight_type=QuantType.QInt8, extra_options={{"DefaultTensorType": onnx.TensorProto.FLOAT}})
options = ort.SessionOptions()
options.intra_op_num_threads = {threads}
session = ort.InferenceSession("encoder.int8.onnx", options, providers=["CPUExecutionProvider"])


def forward(batch):
    return torch.from_numpy(session.run(["last_hidden_state"], {{name: batch[name].numpy() for name in names}})[0])
'''),
    OPENVINO_FP32: ("import openvino as ov\n", _EXPORT, '''compiled = ov.Core().compile_model(ov.convert_model("encoder.onnx"), "CPU", {{"INFERENCE_NUM_THREADS": {threads}}})


def forward(batch):
    return torch.from_numpy(compiled({{name: batch[name].numpy() for name in names}})[0])
'''),
    OPENVINO_INT8: ("import nncf\nimport openvino as ov\nfrom nncf.quantization.advanced_parameters import "
                    "AdvancedQuantizationParameters, OverflowFix\n", _EXPORT, '''# calibration.txt: the paragraphs the lesson calibrated on (written beside this snippet), one per line
calibration = [tokenizer(text, truncation=True, max_length={max_length}, return_tensors="np")
               for text in open("calibration.txt", encoding="utf-8").read().splitlines()]
quantized = nncf.quantize(ov.convert_model("encoder.onnx"), nncf.Dataset([dict(c) for c in calibration]),
                          model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                          advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.{overflow}))
compiled = ov.Core().compile_model(quantized, "CPU", {{"INFERENCE_NUM_THREADS": {threads}}})


def forward(batch):
    return torch.from_numpy(compiled({{name: batch[name].numpy() for name in names}})[0])
'''),
}


def snippet(kind: str, model: str, texts: list[str], batch_size: int, max_length: int, threads: int,
            reduce_range: bool) -> str:
    """The code a learner pastes for a winner: public APIs only, the batching the lesson timed (embed_sorted's own
    source), ending in `embeddings = ...` of `texts` (L2-normalised, like every other candidate's)."""
    if kind == SENTENCE_TRANSFORMERS:
        return (f"from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer({model!r})\n"
                f"model.max_seq_length = {max_length}\ntexts = {list_literal(texts)}\nembeddings = model.encode("
                f"texts, batch_size={batch_size}, convert_to_tensor=True, normalize_embeddings=True)")
    imports, export, forward = _FORWARD[kind]
    settings = dict(opset=OPSET, threads=threads, reduce_range=reduce_range, max_length=max_length,
                    overflow="ENABLE" if reduce_range else "DISABLE")
    return (_HEAD.format(imports=imports, model=model) + export.format(**settings) + forward.format(**settings)
            + "\n\n" + inspect.getsource(embed_sorted) + f"\n\ntexts = {list_literal(texts)}\n"
            f"embeddings = embed_sorted(forward, tokenizer, texts, batch_size={batch_size}, max_length={max_length})")
