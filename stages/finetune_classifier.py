"""finetune_classifier: fine-tune models/base/ into a text classifier of `data` (default: the SMS spam collection).

Params `finetune_classifier` (llm.classifier_tuning.ClassifierTuningConfig). Writes models/classifier/ (adapter +
head + classifier.json with the label names; with `export_merged` also a self-contained models/classifier/merged/),
metrics/finetune_classifier.json ({"train"|"val"|"test": accuracy, precision, recall, f1, roc_auc, confusion, n,
macro_f1, labels, per_class: {label: precision, recall, f1, roc_auc, n}},
"training": time, steps, parameter counts, skipped rows), plots/finetune_classifier/ (per-step curves),
plots/finetune_classifier_confusion.csv (actual,predicted label of every test text: DVC's N×N confusion plot),
reports/finetune_classifier/ (misclassified test messages, confusion figure) and runs/finetune_classifier.json.
An interrupted run resumes from checkpoints/finetune_classifier/<key of the base weights and the params>/.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llm.classifier import GPTClassifier, classification_evaluator, classification_loss, export_merged, save_classifier
from llm.classifier_tuning import ClassifierTuningConfig, flat_metrics, run_summary
from llm.errors import LLMError
from llm.io import replaced_dir, sha256_file, write_json
from llm.lora import parameter_report
from llm.model_dir import WEIGHTS_FILE, load_model
from llm.reports import write_classifier_reports
from llm.training import train
from stages.common import (
    BASE_MODEL,
    CLASSIFIER_METRICS,
    checkpoint_dir,
    params_section,
    run,
    summary,
    tokenizer,
    tracked_run,
)

STAGE = "finetune_classifier"
OUT_DIR, REPORT_DIR = Path("models/classifier"), Path("reports") / STAGE
CONFUSION_CSV = Path("plots") / f"{STAGE}_confusion.csv"  # beside plots/<stage>/, whose CSVs are step series


def main() -> None:
    params = params_section(STAGE, ClassifierTuningConfig)
    if params.epochs <= 0:
        raise LLMError(f"params.yaml:{STAGE}.epochs must be a positive integer, got {params.epochs}")
    data, classifier, skipped = params.datasets(tokenizer())
    config = params.scheduled(len(data["train"]))
    torch.manual_seed(config.seed)  # the new head's initialisation
    model = GPTClassifier(load_model(BASE_MODEL), classifier)
    model.apply_method()
    sizes, base_sha = parameter_report(model), sha256_file(BASE_MODEL / WEIGHTS_FILE)
    checkpoints = checkpoint_dir(STAGE, base_sha, dataclasses.asdict(params))
    logged = {**dataclasses.asdict(params), "train": dataclasses.asdict(config), "base_weights_sha256": base_sha}
    logged |= {"trainable_params": sizes["trainable"], "examples": {name: len(ds) for name, ds in data.items()}}
    logged["classifier"]["labels"] = list(classifier.labels or ())
    with tracked_run(STAGE, logged, checkpoints, "pretrain", model=OUT_DIR, registry=params.registry) as tracker:
        evaluate = classification_evaluator(data["val"].batches(params.eval_batch_size))
        hooks = {"loss_fn": classification_loss, "evaluate": evaluate, "tracker": tracker}
        result = train(model, params.train_batches(data["train"]), config, checkpoint_dir=checkpoints, **hooks)
        model = model.cpu().eval()
        predictions, scores = params.scores(model, data)
        test = (data["test"].examples, *predictions["test"], scores["test"]["confusion"], classifier.labels)
        reports = write_classifier_reports(*test, confusion_csv=CONFUSION_CSV, report_dir=REPORT_DIR)
        for path, folder in zip((*reports, CONFUSION_CSV), ("reports", "plots", "plots"), strict=True):
            tracker.log_artifact(path, folder)
        training = run_summary(result, params.classifier.method, sizes, skipped)
        tracker.log_metrics(flat_metrics(scores, training))
        with replaced_dir(OUT_DIR) as staged:  # models/classifier/ changes only whole, once all is computed
            save_classifier(model, staged, BASE_MODEL)
            if params.export_merged:
                export_merged(model, staged / "merged")
    # the Tracker's flat file holds the last step's values; the stage's summary replaces it (read by evaluate)
    write_json(CLASSIFIER_METRICS, {**scores, "training": training})
    shown = {f"test_{key}": scores["test"][key] for key in ("accuracy", "f1", "roc_auc")}
    summary(STAGE, {**shown, "train_seconds": training["seconds"]}, OUT_DIR, CLASSIFIER_METRICS)


if __name__ == "__main__":
    run(main)
