"""Batching a classification dataset and the classifier's val evaluation for the training engine."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from llm.classifier import classification_evaluator
from llm.data.classification import ClassificationDataset
from llm.data.labeled_files import ClassificationExample
from llm.tokenizer import EOT_ID


class CharTokenizer:
    """One token per character (its code point): enough for ClassificationDataset."""

    def encode(self, text: str, disallowed_special: tuple = ()) -> list[int]:
        return [ord(c) for c in text]


def dataset() -> ClassificationDataset:
    texts = ["a", "bcd", "ce", "d", "efgh"]  # first letters a-e: the TableModel rows
    examples = [ClassificationExample(text, i % 2, i + 1) for i, text in enumerate(texts)]
    return ClassificationDataset(examples, CharTokenizer(), max_length=8)  # type: ignore[arg-type]


def test_batch_collates_the_picked_examples_in_order() -> None:
    batch = dataset().batch(np.array([3, 1]))
    assert batch.ids.tolist() == [[ord("d"), EOT_ID, EOT_ID], [ord("b"), ord("c"), ord("d")]]
    assert batch.lengths.tolist() == [1, 3] and batch.labels.tolist() == [1, 1]


def test_batches_cover_the_dataset_in_order() -> None:
    batches = dataset().batches(2)
    assert [b.lengths.tolist() for b in batches] == [[1, 3], [2, 1], [4]]
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 1, 0, 1, 0]


class TableModel(nn.Module):
    """Logits log(PROBS[first token id - ord('a')]): known class probabilities per example."""

    PROBS = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # predict_proba reads the device from a parameter

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.PROBS[ids[:, 0] - ord("a")].log()


def test_evaluator_reports_val_loss_and_accuracy() -> None:
    evaluate = classification_evaluator(dataset().batches(2))
    metrics = evaluate(TableModel())
    # labels 0,1,0,1,0 → probabilities of the actual class 0.9, 0.8, 0.6, 0.5, 1.0; argmax right for 0,1,2,4
    expected_loss = -sum(math.log(p) for p in (0.9, 0.8, 0.6, 0.5, 1.0)) / 5
    assert metrics.keys() == {"val_loss", "val_accuracy"}
    assert metrics["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["val_accuracy"] == pytest.approx(4 / 5)


def test_evaluator_floors_zero_probabilities() -> None:
    examples = [ClassificationExample("e", 1, 1)]  # probability 0 of its actual class
    evaluate = classification_evaluator(ClassificationDataset(examples, CharTokenizer(), 8).batches(4))  # type: ignore[arg-type]
    assert evaluate(TableModel()) == {"val_loss": pytest.approx(-math.log(1e-12)), "val_accuracy": 0.0}
