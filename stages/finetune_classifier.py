"""finetune_classifier: fine-tune the pretrained base model into an SMS spam classifier.

Reads models/base/ and data/raw/sms_spam_collection.tsv; writes models/classifier/ (adapter + head +
classifier.json; with `export_merged` also a self-contained models/classifier/merged/),
metrics/finetune_classifier.json ({"train"|"val"|"test": accuracy, precision, recall, f1, roc_auc, n,
confusion}, "training": time, steps, parameter counts, skipped rows), plots/finetune_classifier/ (per-step
curves), plots/finetune_classifier_confusion.csv (actual,predicted of every test message, for DVC's confusion
template), reports/finetune_classifier/ (misclassified test messages, confusion-matrix figure) and
runs/finetune_classifier.json (the MLflow run).

Training runs in epochs over the balanced train split: evaluation (val loss and accuracy) after every epoch,
the weights of the epoch with the lowest val loss kept, optional early stopping (`train.patience`).
An interrupted run resumes from checkpoints/finetune_classifier/<fingerprint of base and params>/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm.classifier import (
    ClassifierConfig,
    GPTClassifier,
    classification_evaluator,
    classification_loss,
    classification_metrics,
    export_merged,
    predict_proba,
    save_classifier,
)
from llm.config import from_mapping
from llm.data.classification import ClassificationDataset, balance_classes, read_labeled_tsv, stratified_split
from llm.data.windows import batch_indices
from llm.errors import LLMError
from llm.io import sha256_file, write_json
from llm.lora import parameter_report
from llm.model_dir import WEIGHTS_FILE, load_model
from llm.reports import write_classifier_reports
from llm.tokenizer import get_tokenizer
from llm.tracking import Tracker
from llm.train_config import PER_EPOCH_FIELDS, TrainConfig, per_epoch
from llm.training import train
from stages.common import params_section, run

STAGE = "finetune_classifier"
BASE_DIR = Path("models/base")
OUT_DIR = Path("models/classifier")
DATA_FILE = Path("data/raw/sms_spam_collection.tsv")
RANKS_FILE = Path("data/raw/tokenizer/r50k_base.tiktoken")  # from the fetch stage; else the mirror's
METRICS_FILE = Path("metrics") / f"{STAGE}.json"
CONFUSION_CSV = Path("plots") / f"{STAGE}_confusion.csv"  # beside plots/<stage>/, whose CSVs are step series
REPORT_DIR = Path("reports") / STAGE
CHECKPOINTS = Path("checkpoints") / STAGE


@dataclass(frozen=True)
class DataParams:
    """balance: undersample the majority class; split: train/val/test fractions of every class."""

    skip_bad_rows: bool = False
    balance: bool = True
    split: tuple[float, ...] = (0.7, 0.1, 0.2)
    seed: int = 123


@dataclass(frozen=True)
class FinetuneClassifierParams:
    """epochs: passes over the train split; train: TrainConfig fields except those derived from epochs."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataParams = field(default_factory=DataParams)
    epochs: int = 5
    train: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 64
    export_merged: bool = False


def train_config(params: FinetuneClassifierParams, n_train: int) -> TrainConfig:
    """The engine's config: `params.train` scheduled in epochs (llm.train_config.per_epoch)."""
    fixed = [key for key in PER_EPOCH_FIELDS if key in params.train]
    if fixed:
        raise LLMError(f"params.yaml:{STAGE}.train.{fixed[0]} is set by the stage (from epochs); remove it")
    if params.epochs <= 0:
        raise LLMError(f"params.yaml:{STAGE}.epochs must be a positive integer, got {params.epochs}")
    config = from_mapping(TrainConfig, params.train, where=f"params.yaml:{STAGE}.train")
    return per_epoch(config, params.epochs, n_train)


def main() -> None:
    params = params_section(STAGE, FinetuneClassifierParams)
    parsed = read_labeled_tsv(DATA_FILE, params.classifier.labels, skip_bad_rows=params.data.skip_bad_rows)
    examples = balance_classes(parsed.examples, params.data.seed) if params.data.balance else parsed.examples
    splits = stratified_split(examples, params.data.split, params.data.seed)
    tokenizer = get_tokenizer(RANKS_FILE if RANKS_FILE.is_file() else None)
    data = {
        name: ClassificationDataset(split, tokenizer, params.classifier.max_length, params.classifier.append_eot)
        for name, split in splits.items()
    }
    config = train_config(params, len(data["train"]))

    torch.manual_seed(config.seed)  # the new head's initialisation
    model = GPTClassifier(load_model(BASE_DIR), params.classifier)
    wrapped = model.apply_method()
    sizes = parameter_report(model)
    base_sha = sha256_file(BASE_DIR / WEIGHTS_FILE)
    fingerprint = json.dumps([base_sha, dataclasses.asdict(params)], sort_keys=True, default=str)
    checkpoints = CHECKPOINTS / hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    print(
        f"{params.classifier.method}: {sizes['trainable']:,} of {sizes['total']:,} parameters trainable "
        f"({sizes['trainable_pct']:.2f}%); {len(wrapped)} LoRA layers; "
        + ", ".join(f"{name} {len(ds)}" for name, ds in data.items())
        + (f"; skipped {len(parsed.skipped)} bad rows" if parsed.skipped else "")
    )

    with Tracker(STAGE, upstream=("pretrain",)) as tracker:
        tracker.log_params(
            {
                **dataclasses.asdict(params),
                "train_config": dataclasses.asdict(config),
                "base_weights_sha256": base_sha,
                "trainable_params": sizes["trainable"],
                "examples": {name: len(ds) for name, ds in data.items()},
            }
        )
        result = train(
            model,
            lambda i: data["train"].batch(batch_indices(len(data["train"]), config.batch_size, i, seed=config.seed)),
            config,
            loss_fn=classification_loss,
            evaluate=classification_evaluator(data["val"].batches(params.eval_batch_size)),
            checkpoint_dir=checkpoints,
            tracker=tracker,
        )
        model = model.cpu().eval()
        save_classifier(model, OUT_DIR, BASE_DIR)
        predictions = {name: predict_proba(model, ds.batches(params.eval_batch_size)) for name, ds in data.items()}
        scores: dict[str, Any] = {
            name: {**classification_metrics(labels, probs), "n": len(labels)}
            for name, (labels, probs) in predictions.items()
        }
        misclassified, confusion_figure = write_classifier_reports(
            data["test"].examples,
            *predictions["test"],
            scores["test"]["confusion"],
            params.classifier.labels,
            confusion_csv=CONFUSION_CSV,
            report_dir=REPORT_DIR,
        )
        tracker.log_artifact(misclassified, "reports")
        tracker.log_artifact(confusion_figure, "plots")
        training = {
            "method": params.classifier.method,
            "seconds": result.state.seconds,
            "steps": result.state.step,
            "best_step": result.best.get("step", result.state.step),
            "stopped_early": result.stopped_early,
            "trainable_params": sizes["trainable"],
            "total_params": sizes["total"],
            "skipped_rows": len(parsed.skipped),
        }
        tracker.log_metrics(
            {f"{split}_{key}": value for split, s in scores.items() for key, value in s.items() if key != "confusion"}
            | {f"train_{key}": float(value) for key, value in training.items() if key != "method"}
        )
        if params.export_merged:
            export_merged(model, OUT_DIR / "merged")
    # the Tracker's flat file holds the last step's values; the stage's summary replaces it (read by evaluate)
    write_json(METRICS_FILE, {**scores, "training": training})
    shutil.rmtree(checkpoints, ignore_errors=True)
    test = scores["test"]
    print(
        f"test accuracy {test['accuracy']:.2%}, F1 {test['f1']:.4f}, ROC-AUC {test['roc_auc']:.4f} "
        f"({training['seconds']:.0f} s training); wrote {OUT_DIR}/ and {METRICS_FILE}"
    )


if __name__ == "__main__":
    run(main)
