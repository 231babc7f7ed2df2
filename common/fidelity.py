"""How close a faster variant's outputs stay to the reference: embedding cosine, text by text."""
from __future__ import annotations

import torch


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Row-by-row cosine similarity of two embedding matrices: the mean and the worst row."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cosine = torch.nn.functional.cosine_similarity(reference.cpu().double(), candidate.cpu().double(), dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}
