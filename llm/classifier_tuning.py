"""Fine-tuning a text classifier: the run's settings (`ClassifierTuningConfig`) and its pieces: the labelled file as
balanced, stratified, tokenised splits, the training run scheduled in epochs, and the scores of every split."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import tiktoken

from llm.classifier import ClassifierConfig, GPTClassifier, classification_metrics, predict_proba
from llm.data.classification import ClassificationDataset, LabeledSet
from llm.data.windows import batch_indices
from llm.registry import RegistryParams
from llm.train_config import PER_EPOCH_FIELDS, TrainConfig, per_epoch
from llm.training import Batch, TrainResult

MLFLOW_UNSAFE = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric names


@dataclass(frozen=True)
class ClassifierTuningConfig:
    """train: the run, except the keys `epochs` sets (see per_epoch). epochs: passes over the train split, each
    ending with an evaluation and a checkpoint; the epoch with the lowest val loss is kept. classifier: what is
    trained (llm.classifier; `labels: null`: the data's own, sorted). data: the labelled set and its splits
    (llm.data.classification.LabeledSet). eval_batch_size: texts per forward when scoring. export_merged: also
    write a self-contained copy with the adapters folded in. registry: models/classifier (with its base) logged to
    the run and registered in MLflow (llm.registry; evaluate moves its `champion` alias)."""

    derived_train_keys: ClassVar[tuple[str, ...]] = PER_EPOCH_FIELDS

    train: TrainConfig = field(default_factory=TrainConfig)
    epochs: int = 5
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: LabeledSet = field(default_factory=LabeledSet)
    eval_batch_size: int = 64
    export_merged: bool = False
    registry: RegistryParams = field(default_factory=RegistryParams)

    def datasets(self, tokenizer: tiktoken.Encoding) -> tuple[dict[str, ClassificationDataset], ClassifierConfig, int]:
        """The train / val / test datasets of `data`, `classifier` with the label names it uses (the params' or
        the data's own), and the number of bad rows skipped."""
        splits, labels, skipped = self.data.read(self.classifier.labels)
        cut = (self.classifier.max_length, self.classifier.append_eot)
        datasets = {name: ClassificationDataset(split, tokenizer, *cut) for name, split in splits.items()}
        return datasets, replace(self.classifier, labels=labels), skipped

    def scheduled(self, n_train: int) -> TrainConfig:
        """`train` scheduled in `epochs` over `n_train` examples (llm.train_config.per_epoch)."""
        return per_epoch(self.train, self.epochs, n_train)

    def train_batches(self, dataset: ClassificationDataset) -> Callable[[int], Batch]:
        """Micro-batch i: `train.batch_size` examples in a seeded order that reshuffles every epoch."""
        size, seed = self.train.batch_size, self.train.seed
        return lambda i: dataset.batch(batch_indices(len(dataset), size, i, seed=seed))

    def scores(
        self, model: GPTClassifier, data: dict[str, ClassificationDataset]
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
        """Per split: (labels, probabilities) of every text, and the classification metrics with the split's size."""
        predictions = {name: predict_proba(model, ds.batches(self.eval_batch_size)) for name, ds in data.items()}
        scores = {name: classification_metrics(*pred, model.config.labels) for name, pred in predictions.items()}
        return predictions, scores


def run_summary(result: TrainResult, method: str, sizes: dict[str, Any], skipped_rows: int) -> dict[str, Any]:
    """What a tuning run did: method, time, steps, the best (kept) step, early stop, parameter counts, bad rows."""
    return {
        "method": method,
        "seconds": result.state.seconds,
        "steps": result.state.step,
        "best_step": result.best.get("step", result.state.step),
        "stopped_early": result.stopped_early,
        "trainable_params": sizes["trainable"],
        "total_params": sizes["total"],
        "skipped_rows": skipped_rows,
    }


def flat_metrics(scores: dict[str, Any], training: dict[str, Any]) -> dict[str, float]:
    """The scores and the run summary as flat numeric metrics: `<split>_<metric>`, `<split>_<metric>.<label>` (per
    class; label names with MLFLOW_UNSAFE characters get `_`) and `train_<key>`."""
    flat = {f"{split}_{key}": value for split, s in scores.items() for key, value in s.items() if _is_number(value)}
    flat |= {
        f"{split}_{key}.{MLFLOW_UNSAFE.sub('_', label)}": value
        for split, s in scores.items()
        for label, per_class in s["per_class"].items()
        for key, value in per_class.items()
    }
    return flat | {f"train_{key}": float(value) for key, value in training.items() if key != "method"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
