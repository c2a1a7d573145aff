"""llm.reports: the classifier's test reports and the evaluation report, with their figures."""

import json
from pathlib import Path

import numpy as np

from llm.data.instructions import Instruction
from llm.data.labeled_files import ClassificationExample
from llm.evaluation import JudgeResult
from llm.reports import save_figure, write_classifier_reports, write_evaluation_report, write_rouge_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ("ham", "spam")


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_save_figure_draws_and_writes_a_png(tmp_path: Path) -> None:
    drawn = []

    def draw(axes: object) -> None:
        drawn.append(axes)
        axes.plot([0, 1], [1, 0])  # type: ignore[attr-defined]

    save_figure(tmp_path / "sub/line.png", draw, size=(2, 1))
    assert len(drawn) == 1 and is_png(tmp_path / "sub/line.png")
    assert list((tmp_path / "sub").iterdir()) == [tmp_path / "sub/line.png"]  # no temporary file left behind


def test_classifier_reports_list_every_message_and_the_wrong_ones(tmp_path: Path) -> None:
    examples = [
        ClassificationExample("hello", 0, 2),
        ClassificationExample("WIN cash", 1, 5),
        ClassificationExample("see you", 0, 7),
        ClassificationExample("FREE", 1, 9),
    ]
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    confusion = [[1, 1], [1, 1]]
    misclassified, figure = write_classifier_reports(
        examples, labels, probs, confusion, NAMES, confusion_csv=tmp_path / "confusion.csv", report_dir=tmp_path / "r"
    )
    assert (tmp_path / "confusion.csv").read_text() == "actual,predicted\nham,ham\nspam,spam\nham,spam\nspam,ham\n"
    assert misclassified == tmp_path / "r/misclassified.json" and figure == tmp_path / "r/confusion.png"
    assert json.loads(misclassified.read_text()) == [
        {"line": 7, "actual": "ham", "predicted": "spam", "probability": 0.8, "text": "see you"},
        {"line": 9, "actual": "spam", "predicted": "ham", "probability": 0.6, "text": "FREE"},
    ]
    assert is_png(figure)


def test_rouge_csv_has_one_row_per_test_response(tmp_path: Path) -> None:
    write_rouge_csv(tmp_path / "plots/rouge_l.csv", {"instruct": [0.5, 1.0], "base": [0.125, 0.0]})
    assert (tmp_path / "plots/rouge_l.csv").read_text() == (
        "example,base,instruct\n0,0.125000,0.500000\n1,0.000000,1.000000\n"
    )


def board(judged: bool) -> dict:
    instruct = {"val_loss": 1.25, "rouge_l": 0.5}
    return {
        "base": {"heldout_loss": 3.5, "heldout_perplexity": 33.115, "rouge_l": 0.25},
        "classifier": {"accuracy": 0.96875, "f1": 0.5, "n": 1234},
        "instruct": instruct | ({"judge_score": 62.5, "judge_unparseable": 1} if judged else {}),
        "rouge_l_ratio": 2.0 if judged else None,
    }


TEST = [Instruction("Name a colour.", "", "Blue."), Instruction("Add the numbers.", "2 and 3", "5")]
RESPONSES = {"instruct": ["Blue.", ""], "base": ["Red", "23"]}
ROUGE = {"instruct": [1.0, 0.0], "base": [0.0, 0.0]}


def test_evaluation_report_holds_the_scoreboard_and_examples(tmp_path: Path) -> None:
    report, figures = tmp_path / "reports/evaluation.md", tmp_path / "reports/figures"
    write_evaluation_report(
        report, figures, board(False), TEST, RESPONSES, ROUGE, None, judge_model="m", heldout_tokens=12345, examples=1
    )
    lines = report.read_text(encoding="utf-8").splitlines()
    assert lines[:4] == ["# Evaluation", "", "| what | metric | value |", "|---|---|---|"]
    assert "| base model | held-out loss / perplexity (12,345 tokens) | 3.500 / 33.1 |" in lines
    assert "| classifier | test accuracy | 0.9688 |" in lines
    assert "| classifier | test n | 1,234 |" in lines
    assert "| instruction model | val loss | 1.250 |" in lines
    assert "| instruction model | ROUGE-L F1 (test, 2) | 0.500 |" in lines
    assert "| base model, same prompts | ROUGE-L F1 (test, 2) | 0.250 |" in lines
    assert "| | ROUGE-L ratio instruct / base | n/a× |" in lines
    assert "![ROUGE-L](figures/rouge_l.png)" in lines and not any("judge" in line for line in lines)
    assert "### 1. Name a colour." in lines and "- **instruct** (ROUGE-L 1.00): Blue." in lines
    assert "### 2. Add the numbers." not in lines  # only `examples` entries are shown
    assert sorted(p.name for p in figures.iterdir()) == ["rouge_l.png"] and is_png(figures / "rouge_l.png")


def test_evaluation_report_with_a_judge_adds_its_score_and_figure(tmp_path: Path) -> None:
    report, figures = tmp_path / "evaluation.md", tmp_path / "figs"
    verdict = JudgeResult([50.0, None], ["50", "no idea"])
    write_evaluation_report(
        report, figures, board(True), TEST, RESPONSES, ROUGE, verdict, judge_model="m", heldout_tokens=9, examples=5
    )
    lines = report.read_text(encoding="utf-8").splitlines()
    assert "| instruction model | judge score (m, 0–100) | 62.5 (1 unparseable) |" in lines
    assert "| | ROUGE-L ratio instruct / base | 2× |" in lines
    assert "![judge](figs/judge.png)" in lines  # linked relative to the report
    assert "*Input:* 2 and 3" in lines and "- **instruct** (ROUGE-L 0.00): (empty)" in lines
    assert sorted(p.name for p in figures.iterdir()) == ["judge.png", "rouge_l.png"]
    assert all(is_png(p) for p in figures.iterdir())
