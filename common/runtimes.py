"""The runtimes a user would pick instead of hand-tuned PyTorch: ONNX Runtime (fp32, dynamic int8, int8 after its
transformer fusions) and sentence-transformers' `encode`, each wrapped as `embed(texts) -> Tensor` on the same
batching and pooling; and each one's code as a learner would paste it."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.errors import first_line
from common.pipelines import mean_pool
from common.recipe import list_literal

Embedder = Callable[[list[str]], torch.Tensor]
OPSET = 17  # ONNX Runtime 1.32 runs it; the TorchScript exporter's well-trodden opset for BERT-style encoders
SENTENCE_TRANSFORMERS, ONNX_FP32, ONNX_INT8 = "sentence-transformers fp32", "ONNX Runtime fp32", "ONNX Runtime int8"
ONNX_FUSED_INT8 = "ONNX Runtime int8, fused"  # after onnxruntime.transformers.optimizer: Attention, SkipLayerNorm, ...
PEERS = (SENTENCE_TRANSFORMERS, ONNX_FP32, ONNX_INT8, ONNX_FUSED_INT8)  # what a learner would reach for instead


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
    onnx = onnx_unavailable() or (None if device.type == "cpu" else f"the ONNX Runtime peers run on the CPU only "
                                  f"(CPUExecutionProvider), so they would not compare with this run's {device}")
    return {SENTENCE_TRANSFORMERS: sentence_transformers_unavailable() or pooling, ONNX_FP32: onnx, ONNX_INT8: onnx,
            ONNX_FUSED_INT8: onnx or _missing("onnxruntime.transformers.optimizer")}


def peer_builders(path: Path | str, model: nn.Module, tokenizer: Any, device: torch.device, folder: Path,
                  reduce_range: bool, batch_size: int = 32, max_length: int = 128) -> dict[str, Callable[[], Embedder]]:
    """Each peer's `embed(texts)`, built only when called (exports land in `folder`), on the same batching.

    The fused peer exports an eager-attention copy: ONNX Runtime's optimizer fuses the eager graph's explicit
    softmax(QK^T)V into one Attention node, which SDPA's single exported op hides from it.
    """
    size = dict(batch_size=batch_size, max_length=max_length)

    def fused() -> Embedder:
        eager = type(model).from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
        optimized = optimize_onnx(export_onnx(eager, tokenizer, folder, "encoder.eager"), model.config)
        return onnx_embedder(quantize_onnx_int8(optimized, reduce_range), tokenizer, **size)

    return {
        SENTENCE_TRANSFORMERS: lambda: sentence_transformers_embedder(path, device, **size),
        ONNX_FP32: lambda: onnx_embedder(export_onnx(model, tokenizer, folder), tokenizer, **size),
        ONNX_INT8: lambda: onnx_embedder(quantize_onnx_int8(export_onnx(model, tokenizer, folder), reduce_range),
                                         tokenizer, **size),
        ONNX_FUSED_INT8: fused,
    }


def embed_sorted_batches(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: Any,
                         texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings; batches are length-sorted so each pads only to its own longest text.

    `forward(batch)` maps the padded tokenizer tensors to the last hidden state, so PyTorch and ONNX Runtime share
    every other step (tokenising, order, pooling) and differ only in what they are compared for.
    """
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    rows_out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({key: [encoded[key][i] for i in rows] for key in encoded}, return_tensors="pt")
        pooled = mean_pool(forward(batch).float(), batch["attention_mask"])
        for row, vector in zip(rows, torch.nn.functional.normalize(pooled, dim=-1)):
            rows_out[row] = vector
    return torch.stack(rows_out)


def torch_embedder(model: nn.Module, tokenizer: Any, batch_size: int = 32, max_length: int = 128) -> Embedder:
    """`embed(texts)` for a PyTorch encoder (any dtype or quantisation) under inference_mode."""
    device = next(model.parameters(), torch.empty(0)).device

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():  # a copy on the device: BatchEncoding.to() would move the caller's mask too
            return model(**{key: value.to(device) for key, value in batch.items()}).last_hidden_state.cpu()

    return lambda texts: embed_sorted_batches(forward, tokenizer, texts, batch_size, max_length)


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


def optimize_onnx(fp32_path: Path, config: Any) -> Path:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu, ...) of an export, cached."""
    from onnxruntime.transformers.optimizer import optimize_model

    path = fp32_path.with_name(f"{fp32_path.stem}.fused.onnx")
    if not path.exists() or path.stat().st_mtime < fp32_path.stat().st_mtime:
        optimized = optimize_model(str(fp32_path), model_type="bert", num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size)
        optimized.save_model_to_file(str(path))
    return path


def fused_operators(path: Path) -> dict[str, int]:
    """How many of each fused operator (Attention, SkipLayerNormalization, ...) an optimised ONNX file holds."""
    import onnx

    fused = ("Attention", "QAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu")
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in fused:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_onnx_int8(fp32_path: Path, reduce_range: bool) -> Path:
    """ONNX Runtime's dynamic int8 of an exported model (per-channel int8 weights, uint8 activations), cached.

    ORT's reduce_range narrows the WEIGHTS to 7 bits (PyTorch's narrows the activations) against the same AVX2
    int16 saturation, so the caller passes the same choice as for PyTorch (quantize.choose_activation_range).
    DefaultTensorType tells the quantiser the element type of tensors whose type the fused graph leaves unknown.
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


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session using as many threads as torch does, so the comparison is like for like."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_embedder(path: Path, tokenizer: Any, batch_size: int = 32, max_length: int = 128,
                  threads: int | None = None) -> Embedder:
    """`embed(texts)` running an exported encoder (fp32 or int8) in ONNX Runtime."""
    session = onnx_session(path, threads)
    names = [node.name for node in session.get_inputs()]

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        (hidden,) = session.run(["last_hidden_state"], {name: batch[name].numpy() for name in names})
        return torch.from_numpy(hidden)

    return lambda texts: embed_sorted_batches(forward, tokenizer, texts, batch_size, max_length)


def sentence_transformers_embedder(path: Path | str, device: torch.device | str = "cpu", batch_size: int = 32,
                                   max_length: int = 128) -> Embedder:
    """`embed(texts)` with sentence-transformers' own `encode` (normalised), truncating at the same max_length."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=str(device))  # 6.2.0 rejects a Path
    model.max_seq_length = max_length  # the bundled folder says 256; the comparison must truncate alike

    def embed(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).float().cpu()

    return embed


_ONNX_SNIPPET = '''import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({model!r})
model = AutoModel.from_pretrained({model!r}, attn_implementation={attention!r}).eval()
names = tokenizer.model_input_names


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
{prepare}session = ort.InferenceSession({session_file!r}, providers=["CPUExecutionProvider"])


def embed_sorted(texts, batch_size={batch_size}, max_length={max_length}):
    """Mean-pooled, normalised embeddings, batched shortest-first so each batch pads only to its own longest text."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    embeddings = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({{key: [encoded[key][i] for i in rows] for key in encoded}}, return_tensors="np")
        (hidden,) = session.run(["last_hidden_state"], {{name: batch[name] for name in names}})
        mask = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).float()
        pooled = (torch.from_numpy(hidden) * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embeddings[rows] = torch.nn.functional.normalize(pooled, dim=-1)
    return embeddings


texts = {texts}
embeddings = embed_sorted(texts)'''


def peer_snippet(peer: str, model: str, texts: list[str], reduce_range: bool, batch_size: int = 32,
                 max_length: int = 128) -> str:
    """A peer's code as a learner can paste it: public APIs only, ending in `embeddings = ...` of `texts`."""
    if peer == SENTENCE_TRANSFORMERS:
        return (f"from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer({model!r})\n"
                f"model.max_seq_length = {max_length}\ntexts = {list_literal(texts)}\nembeddings = model.encode("
                f"texts, batch_size={batch_size}, convert_to_tensor=True, normalize_embeddings=True)")
    quantise = ('quantize_dynamic({source!r}, "encoder.int8.onnx", per_channel=True, reduce_range={reduce_range},\n'
                '                 weight_type=QuantType.QInt8, extra_options={{"DefaultTensorType": '
                'onnx.TensorProto.FLOAT}})\n')
    prepare, source = {ONNX_FP32: ("", "encoder.onnx"), ONNX_INT8: (quantise, "encoder.int8.onnx"), ONNX_FUSED_INT8: (
        'optimize_model("encoder.onnx", model_type="bert", num_heads=model.config.num_attention_heads,\n'
        '               hidden_size=model.config.hidden_size).save_model_to_file("encoder.fused.onnx")\n'
        + quantise, "encoder.int8.onnx")}[peer]
    prepare = prepare.format(source="encoder.fused.onnx" if peer == ONNX_FUSED_INT8 else "encoder.onnx",
                             reduce_range=reduce_range)
    return _ONNX_SNIPPET.format(model=model, attention="eager" if peer == ONNX_FUSED_INT8 else "sdpa", opset=OPSET,
                                prepare=prepare, session_file=source, batch_size=batch_size, max_length=max_length,
                                texts=list_literal(texts))
