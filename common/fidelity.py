"""How close a faster variant's outputs stay to the reference: embedding cosine, rankings, greedy tokens."""
from __future__ import annotations

from typing import Sequence

import torch


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Row-by-row cosine similarity of two embedding matrices: the mean and the worst row."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Share of the reference's tokens the candidate repeats at the same position (missing ones disagree)."""
    if not reference:
        raise ValueError("no reference tokens to compare with")
    return sum(r == c for r, c in zip(reference, candidate)) / len(reference)


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Index of the first differing token; len(reference) when the candidate repeats all of it."""
    for index, token in enumerate(reference):
        if index >= len(candidate) or candidate[index] != token:
            return index
    return len(reference)
