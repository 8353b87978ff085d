"""Scoring checked against scikit-learn on a real model of real data (the digits set)."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss

from coordinator.results import swap_rate
from weightrelay.metrics import evaluate_logits


def test_scores_of_a_trained_classifier():
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    model = LogisticRegression(max_iter=200).fit(x[:1200], y[:1200])
    logits = model.decision_function(x[1200:]).astype(np.float32)
    labels = y[1200:]
    result = evaluate_logits(logits, labels)
    assert result.confusion_matrix.shape == (10, 10)
    assert result.confusion_matrix.sum() == len(labels)
    assert result.confusion_matrix.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()
    assert result.accuracy == accuracy_score(labels, model.predict(x[1200:]))
    assert abs(result.loss - log_loss(labels, model.predict_proba(x[1200:]), labels=range(10))) < 1e-4
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert result.recall.tolist() == (np.diag(result.confusion_matrix) / result.confusion_matrix.sum(axis=1)).tolist()


def test_swap_rate_counts_both_off_diagonal_cells():
    cm = np.zeros((10, 10), dtype=int)
    cm[1][1], cm[1][7], cm[7][7], cm[7][1] = 10, 90, 20, 80
    assert swap_rate(cm.tolist()) == (90 + 80) / (100 + 100)
    assert swap_rate(np.zeros((10, 10), dtype=int).tolist()) == 0.0
