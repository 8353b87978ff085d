"""Scores of a model's outputs on the test split, computed once for every framework.

Adapters only produce logits; everything derived from them (probabilities, loss, confusion
matrix, per-class scores) is computed here, so any difference between frameworks comes from
their forward passes, not from how each one scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion_matrix: np.ndarray  # [classes, classes], rows true label, columns predicted
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    predictions: np.ndarray  # int64 [n]
    probabilities: np.ndarray  # float32 [n, classes]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> Evaluation:
    """Score logits [n, classes] against true labels [n]."""
    if logits.shape != (len(labels), num_classes):
        raise ValueError(f"logits of shape {list(logits.shape)} do not match {len(labels)} labels x {num_classes} classes")
    log_probs = log_softmax(logits)
    predictions = logits.argmax(axis=1)
    classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    return Evaluation(
        loss=float(-log_probs[np.arange(len(labels)), labels].mean()),
        accuracy=float((predictions == labels).mean()),
        confusion_matrix=confusion_matrix(labels, predictions, labels=classes),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        predictions=predictions.astype(np.int64),
        probabilities=np.exp(log_probs).astype(np.float32),
    )
