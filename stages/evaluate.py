"""evaluate: the scoreboard → metrics/evaluate.json, reports/evaluation.md (+ figures), plots/evaluate/rouge_l.csv.

Held-out perplexity of the base model, the classifier's test metrics, the instruction model's val loss, ROUGE-L
F1 of the instruction model's test responses and of the base model prompted the same way, and an optional
LLM-judge score (only when `evaluate.judge.url` is set).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.data.instructions import encode, read_responses, respond
from llm.errors import LLMError
from llm.evaluation import JudgeConfig, heldout_tokens, judge, mean_loss, perplexity, rouge_l_f1
from llm.io import read_json, write_json
from llm.model_dir import load_model
from llm.reports import write_evaluation_report, write_rouge_csv
from llm.tokenizer import get_tokenizer
from llm.tracking import Tracker, flatten
from stages.common import load_params, params_section, run
from stages.finetune_instructions import (
    INSTRUCT_DIR,
    RANKS_FILE,
    RESPONSES,
    InstructParams,
    example_limit,
    instruction_splits,
    val_batches,
)

BASE_DIR = Path("models/base")
HELDOUT_DIR = Path("data/raw/heldout")
CLASSIFIER_METRICS = Path("metrics/finetune_classifier.json")
METRICS = Path("metrics/evaluate.json")
REPORT = Path("reports/evaluation.md")
JUDGE_REPLIES = Path("reports/judge.json")
FIGURES = Path("reports/figures")
ROUGE_PLOT = Path("plots/evaluate/rouge_l.csv")


@dataclass(frozen=True)
class EvaluateParams:
    """heldout_max_tokens: score at most this many held-out tokens (0 = all). batch_size: sequences per forward.
    examples: test entries shown in the report. judge: the optional LLM judge (url empty = none)."""

    heldout_max_tokens: int = 0
    batch_size: int = 8
    examples: int = 5
    judge: JudgeConfig = field(default_factory=JudgeConfig)


def classifier_metrics() -> dict[str, float]:
    """The classifier's test metrics (numbers only) from its stage's metrics file."""
    test = read_json(CLASSIFIER_METRICS).get("test")
    if not isinstance(test, dict):
        raise LLMError(f"{CLASSIFIER_METRICS} has no 'test' section; run: dvc repro finetune_classifier")
    return {k: v for k, v in test.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def main() -> None:
    params = load_params()
    config = params_section("evaluate", EvaluateParams, params)
    tuning = params_section("finetune_instructions", InstructParams, params)
    tokenizer = get_tokenizer(RANKS_FILE if RANKS_FILE.is_file() else None)
    base, instruct = load_model(BASE_DIR), load_model(INSTRUCT_DIR)
    test, val = (instruction_splits(tuning)[name] for name in ("test", "val"))
    responses = {"instruct": read_responses(RESPONSES, test)}
    with Tracker("evaluate", upstream=("pretrain", "finetune_classifier", "finetune_instructions")) as tracker:
        tracker.log_params({"evaluate": dataclasses.asdict(config), "examples": {"test": len(test), "val": len(val)}})
        tokens = heldout_tokens(HELDOUT_DIR, tokenizer, config.heldout_max_tokens)
        held = perplexity(base, tokens, batch_size=config.batch_size)
        limit = example_limit(tuning, instruct.config.context_length)
        val_loss = mean_loss(instruct, val_batches(encode(val, tokenizer), tuning, limit))
        responses["base"] = respond(base, test, tokenizer, tuning.generation, batch_size=tuning.response_batch_size)
        rouge = {
            name: [rouge_l_f1(r, e.output) for r, e in zip(responses[name], test, strict=True)]
            for name in ("instruct", "base")
        }
        scores = {name: sum(values) / len(values) for name, values in rouge.items()}
        board: dict[str, Any] = {
            "base": {"heldout_loss": held.loss, "heldout_perplexity": held.perplexity, "rouge_l": scores["base"]},
            "classifier": classifier_metrics(),
            "instruct": {"val_loss": val_loss, "rouge_l": scores["instruct"]},
            "rouge_l_ratio": scores["instruct"] / scores["base"] if scores["base"] else None,
        }
        verdict = judge(test, responses["instruct"], config.judge) if config.judge.url else None
        if verdict is not None:
            board["instruct"] |= {"judge_score": verdict.mean_score, "judge_unparseable": verdict.n_unparseable}
            write_json(
                JUDGE_REPLIES, [{"score": s, "reply": r} for s, r in zip(verdict.scores, verdict.replies, strict=True)]
            )
        tracker.log_metrics({k: v for k, v in flatten(board).items() if v is not None})
        write_rouge_csv(ROUGE_PLOT, rouge)
        write_evaluation_report(
            REPORT,
            FIGURES,
            board,
            test,
            responses,
            rouge,
            verdict,
            judge_model=config.judge.model,
            heldout_tokens=held.n_tokens,
            examples=config.examples,
        )
        tracker.log_artifact(REPORT, "reports")
        tracker.log_artifact(FIGURES, "reports/figures")
    write_json(METRICS, board)  # the scoreboard, nested, replaces the tracker's flat copy
    print(
        f"evaluate: held-out perplexity {held.perplexity:.1f}, ROUGE-L instruct {scores['instruct']:.3f} "
        f"vs base {scores['base']:.3f} → {METRICS}, {REPORT}"
    )


if __name__ == "__main__":
    run(main)
