"""How close a faster variant's outputs stay to the reference: embedding cosine, rankings, greedy tokens."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Row-by-row cosine similarity of two embedding matrices: the mean and the worst row."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cosine = torch.nn.functional.cosine_similarity(reference.cpu().double(), candidate.cpu().double(), dim=-1)
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


def decoder_fidelity(reference: Sequence[int], candidate: Sequence[int]) -> dict[str, float]:
    """Greedy tokens against the reference's: how many match before the first difference, then position agreement.

    The first is the one to read: once a token differs the texts shift, so later positions disagree even when the
    candidate goes on saying much the same thing.
    """
    return {"tokens_before_divergence": first_divergence(reference, candidate),
            "token_agreement": token_agreement(reference, candidate)}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing the mean of the ranks they span (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Each run of equal values gets the mean of the positions it occupies.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def spearman(x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the tie-averaged ranks."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"need two 1-D sequences of equal length >= 2, got {x.shape} and {y.shape}")
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])


def pairwise_similarities(embeddings: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every pair of rows (i < j), flattened: what search and clustering rank by."""
    unit = torch.nn.functional.normalize(embeddings.cpu().double(), dim=-1)
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return (unit @ unit.T)[rows, cols].numpy()


def similarity_spearman(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Task-level fidelity: do the candidate's pairwise similarities rank the text pairs as the reference's do?"""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    return spearman(pairwise_similarities(reference), pairwise_similarities(candidate))


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Row cosine (mean and worst) plus the pairwise-similarity Spearman, for one table row."""
    return {**cosine_fidelity(reference, candidate), "similarity_spearman": similarity_spearman(reference, candidate)}
