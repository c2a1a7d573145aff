"""evaluate: the scoreboard → metrics/evaluate.json, reports/evaluation.md (+ figures), plots/evaluate/rouge_l.csv.

Held-out perplexity of the base model, the classifier's test metrics, the instruction model's val loss, ROUGE-L
F1 of the instruction model's test responses and of the base model prompted the same way, and an optional
LLM-judge score (only when `evaluate.judge.url` is set).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import load_model, read_json
from llm.data.instructions import Instruction, encode, respond
from llm.data.text import read_text, strip_gutenberg
from llm.errors import LLMError
from llm.evaluation import JudgeConfig, judge, mean_loss, perplexity, rouge_l_f1
from llm.io import atomic_path, write_json
from llm.tokenizer import EOT_ID, get_tokenizer
from llm.tracking import Tracker, flatten
from stages.common import load_params, params_section, run
from stages.finetune_instructions import (
    INSTRUCT_DIR,
    RANKS_FILE,
    RESPONSES,
    InstructParams,
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


def heldout_tokens(tokenizer: Any, max_tokens: int) -> torch.Tensor:
    """The held-out books (Gutenberg boilerplate stripped), joined by end-of-text, as a 1-D token tensor."""
    files = sorted(HELDOUT_DIR.glob("*.txt"))
    if not files:
        raise LLMError(f"no held-out text in {HELDOUT_DIR}/ (run the fetch stage: dvc repro fetch)")
    tokens: list[int] = []
    for path in files:
        tokens += [*tokenizer.encode_ordinary(strip_gutenberg(read_text(path))), EOT_ID]
    return torch.tensor(tokens[:max_tokens] if max_tokens else tokens)


def read_responses(test: list[Instruction]) -> list[str]:
    """The instruction model's test responses, checked against the test split (stale files are an error)."""
    try:
        rows = json.loads(RESPONSES.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LLMError(f"cannot read {RESPONSES} ({err}); run: dvc repro finetune_instructions") from err
    if [(r["instruction"], r["input"]) for r in rows] != [(e.instruction, e.input) for e in test]:
        raise LLMError(f"{RESPONSES} does not match the test split; run: dvc repro finetune_instructions")
    return [r["response"] for r in rows]


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
    responses = read_responses(test)
    with Tracker("evaluate", upstream=("pretrain", "finetune_classifier", "finetune_instructions")) as tracker:
        tracker.log_params({"evaluate": dataclasses.asdict(config), "examples": {"test": len(test), "val": len(val)}})
        held = perplexity(base, heldout_tokens(tokenizer, config.heldout_max_tokens), batch_size=config.batch_size)
        val_loss = mean_loss(instruct, val_batches(encode(val, tokenizer), tuning, instruct.config.context_length))
        base_responses = respond(base, test, tokenizer, tuning.generation, batch_size=tuning.response_batch_size)
        rouge = {
            "instruct": [rouge_l_f1(r, e.output) for r, e in zip(responses, test, strict=True)],
            "base": [rouge_l_f1(r, e.output) for r, e in zip(base_responses, test, strict=True)],
        }
        scores = {name: sum(values) / len(values) for name, values in rouge.items()}
        board: dict[str, Any] = {
            "base": {"heldout_loss": held.loss, "heldout_perplexity": held.perplexity, "rouge_l": scores["base"]},
            "classifier": classifier_metrics(),
            "instruct": {"val_loss": val_loss, "rouge_l": scores["instruct"]},
            "rouge_l_ratio": scores["instruct"] / scores["base"] if scores["base"] else None,
        }
        verdict = judge(test, responses, config.judge) if config.judge.url else None
        if verdict is not None:
            board["instruct"] |= {"judge_score": verdict.mean_score, "judge_unparseable": verdict.n_unparseable}
            write_json(
                JUDGE_REPLIES, [{"score": s, "reply": r} for s, r in zip(verdict.scores, verdict.replies, strict=True)]
            )
        tracker.log_metrics({k: v for k, v in flatten(board).items() if v is not None})
        _write_rouge_plot(rouge)
        _write_report(board, test, responses, base_responses, rouge, verdict, config, held.n_tokens)
        tracker.log_artifact(REPORT, "reports")
        tracker.log_artifact(FIGURES, "reports/figures")
    write_json(METRICS, board)  # the scoreboard, nested, replaces the tracker's flat copy
    print(
        f"evaluate: held-out perplexity {held.perplexity:.1f}, ROUGE-L instruct {scores['instruct']:.3f} "
        f"vs base {scores['base']:.3f} → {METRICS}, {REPORT}"
    )


def _number(value: float | int | None) -> str:
    return "n/a" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _write_rouge_plot(rouge: dict[str, list[float]]) -> None:
    with atomic_path(ROUGE_PLOT) as tmp:
        lines = ["example,base,instruct"]
        lines += [f"{i},{b:.6f},{s:.6f}" for i, (b, s) in enumerate(zip(rouge["base"], rouge["instruct"], strict=True))]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _figure(name: str, draw: Any) -> str:
    """Draw one matplotlib figure with `draw(ax)`, save it as reports/figures/<name>.png; returns its report path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    draw(ax)
    fig.tight_layout()
    with atomic_path(FIGURES / f"{name}.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return f"figures/{name}.png"


def _write_report(
    board: dict[str, Any],
    test: list[Instruction],
    responses: list[str],
    base_responses: list[str],
    rouge: dict[str, list[float]],
    verdict: Any,
    config: EvaluateParams,
    heldout_tokens: int,
) -> None:
    def rouge_hist(ax: Any) -> None:
        ax.hist([rouge["base"], rouge["instruct"]], bins=10, range=(0, 1), label=["base", "instruct"])
        ax.set(xlabel="ROUGE-L F1 per test response", ylabel="responses", title="ROUGE-L: instruct vs base")
        ax.legend()

    def judge_hist(ax: Any) -> None:
        ax.hist([s for s in verdict.scores if s is not None], bins=10, range=(0, 100))
        ax.set(xlabel="judge score (0-100)", ylabel="responses", title=f"LLM judge ({config.judge.model})")

    base, instruct, clf = board["base"], board["instruct"], board["classifier"]
    lines = [
        "# Evaluation",
        "",
        "| what | metric | value |",
        "|---|---|---|",
        f"| base model | held-out loss / perplexity ({heldout_tokens:,} tokens) | "
        f"{base['heldout_loss']:.3f} / {base['heldout_perplexity']:.1f} |",
        *(f"| classifier | test {k} | {_number(v)} |" for k, v in clf.items()),
        f"| instruction model | val loss | {instruct['val_loss']:.3f} |",
        f"| instruction model | ROUGE-L F1 (test, {len(test)}) | {instruct['rouge_l']:.3f} |",
        f"| base model, same prompts | ROUGE-L F1 (test, {len(test)}) | {base['rouge_l']:.3f} |",
        f"| | ROUGE-L ratio instruct / base | {_number(board['rouge_l_ratio'])}× |",
    ]
    if verdict is not None:
        lines.append(
            f"| instruction model | judge score ({config.judge.model}, 0–100) | {instruct['judge_score']:.1f} "
            f"({instruct['judge_unparseable']} unparseable) |"
        )
    lines += ["", f"![ROUGE-L]({_figure('rouge_l', rouge_hist)})"]
    if verdict is not None:
        lines += ["", f"![judge]({_figure('judge', judge_hist)})"]
    lines += ["", "## Examples from the test split", ""]
    for i, entry in enumerate(test[: config.examples]):
        lines += [
            f"### {i + 1}. {entry.instruction}",
            *([f"*Input:* {entry.input}", ""] if entry.input else []),
            f"- **reference:** {entry.output}",
            f"- **instruct** (ROUGE-L {rouge['instruct'][i]:.2f}): {responses[i] or '(empty)'}",
            f"- **base** (ROUGE-L {rouge['base'][i]:.2f}): {base_responses[i] or '(empty)'}",
            "",
        ]
    with atomic_path(REPORT) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    run(main)
