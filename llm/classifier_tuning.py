"""Fine-tuning a text classifier: the run's settings (`ClassifierTuningConfig`) and its pieces: the labelled file as
balanced, stratified, tokenised splits, the training run scheduled in epochs, and the scores of every split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tiktoken

from llm.classifier import ClassifierConfig, GPTClassifier, classification_metrics, predict_proba
from llm.data.classification import ClassificationDataset, balance_classes, read_labeled_tsv, stratified_split
from llm.data.windows import batch_indices
from llm.registry import RegistryParams
from llm.train_config import PER_EPOCH_FIELDS, TrainConfig, per_epoch
from llm.training import Batch, TrainResult


@dataclass(frozen=True)
class DataSplit:
    """skip_bad_rows: skip (and count) malformed lines instead of failing on the first. balance: undersample every
    class to the smallest. split: train/val/test fractions of every class. seed: the balancing and the split."""

    skip_bad_rows: bool = False
    balance: bool = True
    split: tuple[float, ...] = (0.7, 0.1, 0.2)
    seed: int = 123


@dataclass(frozen=True)
class ClassifierTuningConfig:
    """train: the run, except the keys `epochs` sets (see per_epoch). epochs: passes over the train split, each
    ending with an evaluation and a checkpoint; the epoch with the lowest val loss is kept. classifier: what is
    trained (llm.classifier). data: the splits. eval_batch_size: texts per forward when scoring. export_merged:
    also write a self-contained copy with the adapters folded in."""

    derived_train_keys: ClassVar[tuple[str, ...]] = PER_EPOCH_FIELDS

    train: TrainConfig = field(default_factory=TrainConfig)
    epochs: int = 5
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataSplit = field(default_factory=DataSplit)
    eval_batch_size: int = 64
    export_merged: bool = False
    registry: RegistryParams = field(default_factory=RegistryParams)

    def datasets(self, path: Path, tokenizer: tiktoken.Encoding) -> tuple[dict[str, ClassificationDataset], int]:
        """The train / val / test datasets of the labelled TSV file `path`, and the number of bad rows skipped."""
        parsed = read_labeled_tsv(path, self.classifier.labels, skip_bad_rows=self.data.skip_bad_rows)
        examples = balance_classes(parsed.examples, self.data.seed) if self.data.balance else parsed.examples
        cut = (self.classifier.max_length, self.classifier.append_eot)
        splits = stratified_split(examples, self.data.split, self.data.seed)
        return {name: ClassificationDataset(split, tokenizer, *cut) for name, split in splits.items()}, len(
            parsed.skipped
        )

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
        scores = {name: {**classification_metrics(*pred), "n": len(pred[0])} for name, pred in predictions.items()}
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
    """The scores and the run summary as flat numeric metrics: `<split>_<metric>` and `train_<key>`."""
    flat = {f"{split}_{key}": value for split, s in scores.items() for key, value in s.items() if key != "confusion"}
    return flat | {f"train_{key}": float(value) for key, value in training.items() if key != "method"}
