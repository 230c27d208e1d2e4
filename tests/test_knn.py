"""common.knn_predict against a plain-loop reference and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

import common


def reference_knn(train_features, train_labels, test_features, num_classes, k, temperature) -> list[int]:
    """Weighted kNN by Python loops: the k most cosine-similar training rows vote exp(sim/T) for their label."""
    def normalise(row):
        norm = math.sqrt(sum(value * value for value in row))
        return [value / norm for value in row]

    bank = [normalise(row) for row in train_features.double().tolist()]
    labels = train_labels.tolist()
    predictions = []
    for query in test_features.double().tolist():
        query = normalise(query)
        similarities = [sum(a * b for a, b in zip(query, row)) for row in bank]
        nearest = sorted(range(len(bank)), key=lambda j: similarities[j], reverse=True)[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[labels[j]] += math.exp(similarities[j] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return predictions


@pytest.mark.parametrize("k, temperature, chunk", [(1, 0.1, 1024), (5, 0.1, 3), (7, 1.0, 4), (200, 0.5, 1024)])
def test_knn_matches_loop_reference(k, temperature, chunk):
    generator = torch.Generator().manual_seed(k)
    train_features = torch.randn(40, 6, generator=generator)
    train_labels = torch.randint(0, 4, (40,), generator=generator)
    test_features = torch.randn(11, 6, generator=generator)
    predictions = common.knn_predict(train_features, train_labels, test_features, 4, k, temperature, chunk)
    expected = reference_knn(train_features, train_labels, test_features, 4, min(k, 40), temperature)
    assert predictions.tolist() == expected


def test_knn_weights_beat_counts():
    # Query (1, 0). One class-1 neighbour at similarity 1, two class-0 neighbours at 0.5, k=3.
    # T=0.1: class 1 gets e^10 = 22026, class 0 gets 2e^5 = 297, so class 1 wins.
    # T=10: class 1 gets e^0.1 = 1.105, class 0 gets 2e^0.05 = 2.103, so class 0 wins.
    half = math.sqrt(3) / 2
    train_features = torch.tensor([[1.0, 0.0], [0.5, half], [0.5, -half], [-1.0, 0.0]])
    train_labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[3.0, 0.0]])
    assert common.knn_predict(train_features, train_labels, query, 3, k=3, temperature=0.1).tolist() == [1]
    assert common.knn_predict(train_features, train_labels, query, 3, k=3, temperature=10.0).tolist() == [0]


def test_knn_k_limits_voters():
    # Two class-0 rows near the query and three class-1 rows farther away: k=2 picks class 0,
    # k=5 lets the three class-1 rows outvote them at a high temperature.
    train_features = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.9], [1.0, -0.9], [1.0, 1.0]])
    train_labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert common.knn_predict(train_features, train_labels, query, 2, k=2, temperature=100.0).tolist() == [0]
    assert common.knn_predict(train_features, train_labels, query, 2, k=5, temperature=100.0).tolist() == [1]


def test_knn_top1_fraction():
    train_features = torch.eye(3)
    train_labels = torch.tensor([0, 1, 2])
    test_features = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 1.0], [1.0, 0.0, 0.1]])
    test_labels = torch.tensor([0, 1, 0, 0])  # the third query is closest to class 2
    assert common.knn_top1(train_features, train_labels, test_features, test_labels, 3, k=1) == 0.75
