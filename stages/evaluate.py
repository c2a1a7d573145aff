"""evaluate: the scoreboard → metrics/evaluate.json, reports/evaluation.md (+ figures), plots/evaluate/rouge_l.csv.

Held-out perplexity of the base model, the classifier's test metrics, the instruction model's val loss, ROUGE-L F1
of its test responses and of the base model's (generated as finetune_instructions does), an optional judge score.
Each compared with its registered model's `champion` in MLflow: the scoreboard's `champion` section."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm.classifier_tuning import ClassifierTuningConfig
from llm.data.instructions import read_instruction_set, read_responses, split_entries
from llm.errors import LLMError
from llm.evaluation import JudgeConfig, heldout_tokens, judged, perplexity, rouge_l_f1, scoreboard
from llm.instruction_tuning import InstructConfig
from llm.io import read_json, write_json
from llm.model_dir import load_model
from llm.registry import DEFAULT_NAMES, update_champion
from llm.reports import write_evaluation_report, write_rouge_csv
from llm.tracking import Tracker, flatten
from stages.common import (
    BASE_MODEL,
    CLASSIFIER_METRICS,
    INSTRUCT_MODEL,
    RESPONSES,
    params_section,
    run,
    summary,
    tokenizer,
)

METRICS, REPORT, FIGURES = Path("metrics/evaluate.json"), Path("reports/evaluation.md"), Path("reports/figures")
JUDGE_REPLIES, ROUGE_PLOT = Path("reports/judge.json"), Path("plots/evaluate/rouge_l.csv")
HELDOUT = Path("data/raw/heldout")


@dataclass(frozen=True)
class EvaluateParams:
    """heldout_max_tokens: score at most this many held-out tokens (0 = all). batch_size: sequences per forward.
    examples: test entries shown in the report. judge: the optional LLM judge (url empty = none)."""

    heldout_max_tokens: int = 0
    batch_size: int = 8
    examples: int = 5
    judge: JudgeConfig = field(default_factory=JudgeConfig)


def classifier_test() -> dict[str, Any]:
    """The classifier's test metrics from its stage's metrics file."""
    if not isinstance(test := read_json(CLASSIFIER_METRICS).get("test"), dict):
        raise LLMError(f"{CLASSIFIER_METRICS} has no 'test' section; run: dvc repro finetune_classifier")
    return test


def champions(tracker: Tracker, board: dict[str, Any], names: dict[str, str | None]) -> dict[str, Any]:
    """The new classifier (by test accuracy) and instruction model (by ROUGE-L) against their registered model's
    `champion`, which moves to the better (llm.registry.update_champion; None: no version registered)."""
    contests = {"classifier": ("finetune_classifier", "test_accuracy", "accuracy")}
    contests["instruct"] = ("finetune_instructions", "rouge_l", "rouge_l")
    return {
        kind: update_champion(tracker, names[kind] or DEFAULT_NAMES[kind], stage, metric, board[kind][score])
        for kind, (stage, metric, score) in contests.items()
    }


def main() -> None:
    config = params_section("evaluate", EvaluateParams)
    tuning = params_section("finetune_instructions", InstructConfig)
    names = {"classifier": params_section("finetune_classifier", ClassifierTuningConfig).registry.name}
    names["instruct"] = tuning.registry.name
    encoding, base, instruct = tokenizer(), load_model(BASE_MODEL), load_model(INSTRUCT_MODEL)
    splits = split_entries(read_instruction_set(tuning.data).entries, tuning.split_seed)
    test, examples = splits["test"], {"test": len(splits["test"]), "val": len(splits["val"])}
    responses = {"instruct": read_responses(RESPONSES, test)}
    with Tracker("evaluate", upstream=("pretrain", "finetune_classifier", "finetune_instructions")) as tracker:
        tracker.log_params({"evaluate": asdict(config), "examples": examples})
        tokens = heldout_tokens(HELDOUT, encoding, config.heldout_max_tokens)
        held = perplexity(base, tokens, batch_size=config.batch_size)
        val_loss = tuning.val_loss(instruct, splits, encoding)
        responses["base"] = tuning.responses(base, test, encoding)
        rouge = {n: [rouge_l_f1(r, e.output) for r, e in zip(rs, test, strict=True)] for n, rs in responses.items()}
        board = scoreboard(held, val_loss, rouge, classifier_test())
        verdict = judged(board, test, responses["instruct"], config.judge, JUDGE_REPLIES) if config.judge.url else None
        board["champion"] = champions(tracker, board, names)
        tracker.log_metrics({k: v for k, v in flatten(board).items() if v is not None})
        write_rouge_csv(ROUGE_PLOT, rouge)
        shown = {"judge_model": config.judge.model, "heldout_tokens": held.n_tokens, "examples": config.examples}
        write_evaluation_report(REPORT, FIGURES, board, test, responses, rouge, verdict, **shown)
        tracker.log_artifact(REPORT, "reports")
        tracker.log_artifact(FIGURES, "reports/figures")
    write_json(METRICS, board)  # the scoreboard, nested, replaces the tracker's flat copy
    rouge_l = {f"rouge_l_{name}": board[name]["rouge_l"] for name in responses}
    summary("evaluate", {"heldout_perplexity": held.perplexity, **rouge_l}, METRICS, REPORT)


if __name__ == "__main__":
    run(main)
