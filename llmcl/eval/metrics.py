"""Continual-learning metrics on the accuracy matrix.

Notation: T stages; A[i][j] = score on stage j's test task after training stage i (0-based); b[j] = score
of the base model (before any stage) on task j. Scores are "higher is better": a lower-is-better metric
(perplexity, bits per byte) enters as its negative, so every metric below reads "positive = better".

  AA          = 1/T     * sum_j            A[T-1][j]                       average accuracy at the end
  BWT         = 1/(T-1) * sum_{j<T-1}      (A[T-1][j] - A[j][j])           backward transfer (Lopez-Paz & Ranzato 2017);
                                                                          negative = forgetting
  FWT         = 1/(T-1) * sum_{j>=1}       (A[j-1][j] - b[j])              forward transfer (Lopez-Paz & Ranzato 2017,
                                                                          with the base model as the reference b)
  Forgetting  = 1/(T-1) * sum_{j<T-1} max_{j<=l<T-1} (A[l][j] - A[T-1][j]) average forgetting (Chaudhry et al. 2018,
                                                                          over the rows since task j was learned);
                                                                          positive = forgotten
The tasks averaged share one metric: a run whose stage tasks are scored in different units (exact match, bits
per byte) gets these per metric (llmcl.eval.report), each over the stages of that metric.
After stage k (k < T-1, a run in progress) the same formulas apply to the first k+1 stages.
General-ability tasks g: delta_g = G[T-1][g] - G_base[g] (same sign convention); "general delta" is the mean.
"""

from __future__ import annotations

from typing import Optional

# the metric of a task that fills the matrix, by preference (eval.metric chooses another); lower-is-better ones
PRIMARY = ("exact_match", "acc", "bits_per_byte", "word_perplexity", "perplexity")
LOWER_IS_BETTER = {"bits_per_byte", "word_perplexity", "byte_perplexity", "perplexity"}

Matrix = list[list[Optional[float]]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(A: Matrix, k: int) -> float | None:
    """Mean score over tasks 0..k after stage k."""
    row = [A[k][j] for j in range(k + 1) if A[k][j] is not None]
    return _mean(row)


def backward_transfer(A: Matrix, k: int) -> float | None:
    """Mean over tasks j<k of A[k][j] - A[j][j]; None for the first stage."""
    return _mean([A[k][j] - A[j][j] for j in range(k) if A[k][j] is not None and A[j][j] is not None])


def forward_transfer(A: Matrix, base: list[Optional[float]] | None, k: int) -> float | None:
    """Mean over tasks 1..k of A[j-1][j] - b[j] (zero-shot score before stage j minus the base model's)."""
    if base is None:
        return None
    return _mean([A[j - 1][j] - base[j] for j in range(1, k + 1)
                  if A[j - 1][j] is not None and base[j] is not None])


def forgetting(A: Matrix, k: int) -> float | None:
    """Mean over tasks j<k of the best score since it was learned, max_{j<=l<k} A[l][j], minus the score after
    stage k (Chaudhry et al. 2018 over the rows where task j is known: scores before stage j are not knowledge
    that can be forgotten, and eval.unseen_stages: next leaves them out)."""
    values = []
    for j in range(k):
        earlier = [A[l][j] for l in range(j, k) if A[l][j] is not None]
        if earlier and A[k][j] is not None:
            values.append(max(earlier) - A[k][j])
    return _mean(values)


def summary(A: Matrix, base: list[Optional[float]] | None, k: int | None = None) -> dict[str, float | None]:
    """AA, BWT, FWT and forgetting after stage k (default: the last row of A)."""
    if k is None:
        k = len(A) - 1
    return {"AA": average_accuracy(A, k), "BWT": backward_transfer(A, k), "FWT": forward_transfer(A, base, k),
            "forgetting": forgetting(A, k)}


def oriented(value: float | None, higher_is_better: bool) -> float | None:
    """The score of a metric value: itself, or its negative for lower-is-better metrics."""
    if value is None:
        return None
    return value if higher_is_better else -value
