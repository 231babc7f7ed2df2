"""Custom pipelines other lessons reuse, registered with PIPELINE_REGISTRY: text-to-text, embedding classification.

01 defines and registers its own (sentence similarity) in the lesson, where it is taught.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TEXT_TO_TEXT = "text-to-text"
EMBEDDING_CLASSIFICATION = "embedding-classification"


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors of each text, ignoring padding: the sentence embedding MiniLM was trained for."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def embed(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of texts under inference_mode, in input order.

    Batches are formed shortest-first, so one long text does not pad a whole batch to its length; masked mean
    pooling makes the result independent of the padding."""
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True, truncation=True,
                              return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state
            chunks.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1))
    embeddings = torch.cat(chunks)
    return embeddings[torch.argsort(torch.tensor(order))]


class TextToTextPipeline(Pipeline):
    """Encoder-decoder generation (summarise, translate, ...) as a pipeline, since v5 removed text2text-generation."""

    _load_tokenizer = True

    def _sanitize_parameters(self, prefix: str | None = None, max_input_tokens: int | None = None,
                             **generate_kwargs: Any):
        preprocess = {}
        if prefix is not None:
            preprocess["prefix"] = prefix
        if max_input_tokens is not None:
            preprocess["max_input_tokens"] = max_input_tokens
        return preprocess, generate_kwargs, {}

    def preprocess(self, text: str, prefix: str = "", max_input_tokens: int = 512) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(prefix + text, truncation=True, max_length=max_input_tokens, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        generate_kwargs.setdefault("max_new_tokens", 32)
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, str]:
        ids = model_outputs["output_ids"][0]
        return {"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True),
                "output_tokens": int(ids.numel())}


class EmbeddingClassificationPipeline(Pipeline):
    """Labels a text by cosine similarity to the mean embedding of a few example sentences per label."""

    _load_tokenizer = True
    temperature = 0.05  # turns cosine gaps of ~0.1 into clear softmax scores

    def __init__(self, *args: Any, examples: dict[str, list[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not examples or any(not sentences for sentences in examples.values()):
            raise ValueError("embedding-classification needs at least one example sentence per label")
        self.labels = list(examples)
        prototypes = [embed(self.model, self.tokenizer, examples[label]).mean(dim=0) for label in self.labels]
        self.prototypes = torch.nn.functional.normalize(torch.stack(prototypes), dim=-1)

    def _sanitize_parameters(self, top_k: int | None = None, **kwargs: Any):
        return {}, {}, ({"top_k": top_k} if top_k is not None else {})

    def preprocess(self, text: str) -> dict[str, torch.Tensor]:
        return self.tokenizer(text, truncation=True, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = self.model(**model_inputs).last_hidden_state
        return {"embedding": mean_pool(hidden, model_inputs["attention_mask"])}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], top_k: int = 1):
        embedding = torch.nn.functional.normalize(model_outputs["embedding"].float(), dim=-1)
        similarity = embedding @ self.prototypes.to(embedding.device).T
        scores = torch.softmax(similarity[0] / self.temperature, dim=-1)
        ranked = sorted(zip(self.labels, scores.tolist()), key=lambda pair: -pair[1])
        results = [{"label": label, "score": score} for label, score in ranked[:top_k]]
        return results[0] if top_k == 1 else results


PIPELINE_REGISTRY.register_pipeline(TEXT_TO_TEXT, pipeline_class=TextToTextPipeline, pt_model=AutoModelForSeq2SeqLM,
                                    type="text")
PIPELINE_REGISTRY.register_pipeline(EMBEDDING_CLASSIFICATION, pipeline_class=EmbeddingClassificationPipeline,
                                    pt_model=AutoModel, type="text")
