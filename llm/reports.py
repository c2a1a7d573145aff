"""Figures and human-readable reports: the classifier's test reports and the evaluation scoreboard.

Every path is an argument (the library knows no pipeline layout). Figures are PNG files drawn with matplotlib's
Agg backend, imported only when a figure is drawn, so importing llm stays fast. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm.io import atomic_path, replaced_dir, write_json

if TYPE_CHECKING:
    from llm.data.instructions import Instruction
    from llm.data.labeled_files import ClassificationExample
    from llm.evaluation import JudgeResult

MISCLASSIFIED_FILE = "misclassified.json"
CONFUSION_FIGURE = "confusion.png"
ROUGE_FIGURE = "rouge_l.png"
JUDGE_FIGURE = "judge.png"


def save_figure(path: Path, draw: Callable[[Any], None], size: tuple[float, float] = (6, 3.5)) -> None:
    """Draw one figure of `size` inches (100 dpi) with `draw(axes)` and save it to `path` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100)
    draw(figure.add_subplot())
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def write_classifier_reports(
    examples: Sequence[ClassificationExample],
    labels: np.ndarray,
    probs: np.ndarray,
    confusion: list[list[int]],
    names: Sequence[str],
    *,
    confusion_csv: Path,
    report_dir: Path,
) -> tuple[Path, Path]:
    """The test split's reports; returns the paths of the misclassified messages and of the confusion figure.

    labels: (N,) actual class indices of `examples`; probs: (N, K) predicted probabilities; confusion: (K, K)
    counts, rows actual, columns predicted; names: the K label names. Writes `confusion_csv` (`actual,predicted`
    per message, for DVC's confusion template), report_dir/misclassified.json (line, labels, probability of the
    predicted label, text) and report_dir/confusion.png.
    """
    predicted = probs.argmax(axis=1)
    rows = io.StringIO()  # label names with commas or quotes are CSV-quoted
    csv.writer(rows, lineterminator="\n").writerows(
        [("actual", "predicted")] + [(names[a], names[p]) for a, p in zip(labels, predicted, strict=True)]
    )
    with atomic_path(confusion_csv) as tmp:
        tmp.write_text(rows.getvalue())
    wrong = [
        {"line": e.line, "actual": names[a], "predicted": names[p], "probability": float(probs[i, p]), "text": e.text}
        for i, (e, a, p) in enumerate(zip(examples, labels, predicted, strict=True))
        if a != p
    ]

    def draw_confusion(axes: Any) -> None:
        axes.imshow(np.array(confusion), cmap="Blues")
        for (row, col), count in np.ndenumerate(np.array(confusion)):
            axes.text(col, row, str(count), ha="center", va="center")
        axes.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names)
        axes.set(xlabel="predicted", ylabel="actual", title="test confusion matrix")

    with replaced_dir(report_dir) as staged:  # report_dir changes only whole
        write_json(staged / MISCLASSIFIED_FILE, wrong)
        side = max(4.0, 1.0 + 0.6 * len(names))  # room for every class's row and column
        save_figure(staged / CONFUSION_FIGURE, draw_confusion, size=(side, side - 0.5))
    return report_dir / MISCLASSIFIED_FILE, report_dir / CONFUSION_FIGURE


def write_rouge_csv(path: Path, rouge: dict[str, list[float]]) -> None:
    """`example,base,instruct`: the ROUGE-L F1 of every test response of the base and the instruction model."""
    lines = ["example,base,instruct"]
    lines += [f"{i},{b:.6f},{s:.6f}" for i, (b, s) in enumerate(zip(rouge["base"], rouge["instruct"], strict=True))]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_evaluation_report(
    path: Path,
    figures_dir: Path,
    board: dict[str, Any],
    test: Sequence[Instruction],
    responses: dict[str, list[str]],
    rouge: dict[str, list[float]],
    verdict: JudgeResult | None,
    *,
    judge_model: str,
    heldout_tokens: int,
    examples: int,
) -> None:
    """The scoreboard as Markdown at `path`, with figures_dir/rouge_l.png (and judge.png with a verdict) linked.

    board: the evaluate stage's metrics ("base", "classifier", "instruct", "rouge_l_ratio"); responses and rouge:
    per model ("instruct", "base"), one response / ROUGE-L F1 per test entry; heldout_tokens: the number of
    tokens behind the held-out loss; examples: how many test entries to show.
    """

    def rouge_hist(axes: Any) -> None:
        axes.hist([rouge["base"], rouge["instruct"]], bins=10, range=(0, 1), label=["base", "instruct"])
        axes.set(xlabel="ROUGE-L F1 per test response", ylabel="responses", title="ROUGE-L: instruct vs base")
        axes.legend()

    judge_scores = [] if verdict is None else [score for score in verdict.scores if score is not None]

    def judge_hist(axes: Any) -> None:
        axes.hist(judge_scores, bins=10, range=(0, 100))
        axes.set(xlabel="judge score (0-100)", ylabel="responses", title=f"LLM judge ({judge_model})")

    def figure(name: str, draw: Callable[[Any], None]) -> str:
        save_figure(staged / name, draw)
        return Path(os.path.relpath(figures_dir / name, path.parent)).as_posix()

    with replaced_dir(figures_dir) as staged:  # figures_dir changes only whole (no figure of an earlier run stays)
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
                f"| instruction model | judge score ({judge_model}, 0–100) | {instruct['judge_score']:.1f} "
                f"({instruct['judge_unparseable']} unparseable) |"
            )
        lines += ["", f"![ROUGE-L]({figure(ROUGE_FIGURE, rouge_hist)})"]
        if verdict is not None:
            lines += ["", f"![judge]({figure(JUDGE_FIGURE, judge_hist)})"]
        lines += ["", "## Examples from the test split", ""]
        for i, entry in enumerate(test[:examples]):
            lines += [
                f"### {i + 1}. {entry.instruction}",
                *([f"*Input:* {entry.input}", ""] if entry.input else []),
                f"- **reference:** {entry.output}",
                f"- **instruct** (ROUGE-L {rouge['instruct'][i]:.2f}): {responses['instruct'][i] or '(empty)'}",
                f"- **base** (ROUGE-L {rouge['base'][i]:.2f}): {responses['base'][i] or '(empty)'}",
                "",
            ]
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines), encoding="utf-8")


def _number(value: float | int | None) -> str:
    """A scoreboard value: n/a for None, thousands separators for integers, 4 significant digits otherwise."""
    return "n/a" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
