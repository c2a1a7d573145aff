"""The finetune_classifier stage end to end on a tiny base model and a small synthetic SMS file, then `llm classify`."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llm.classifier import load_classifier
from llm.cli import main as cli_main
from llm.config import get_preset
from llm.model import GPT
from llm.model_dir import save_model

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR, METRICS = Path("models/classifier"), Path("metrics/finetune_classifier.json")
REPORTS = Path("reports/finetune_classifier")

SPAM = ["WINNER!! Claim your FREE prize now, call 09061701461", "URGENT! You have won a £1000 cash award, txt WIN"]
HAM = ["ok see you at home later", "Sorry, I'll call you back in a bit"]


def sms_lines(n: int, seed: int = 0) -> list[str]:
    """Obvious spam (prize, call, numbers) and ham (short chat) with some word variation."""
    rng = random.Random(seed)
    prizes, chat = ["cash", "prize", "holiday", "ringtone", "voucher"], ["dinner", "home", "work", "class", "mum"]
    lines = []
    for i in range(n):
        if i % 2:
            lines.append(f"spam\tFREE {rng.choice(prizes)}! You WON, call 0906{rng.randint(1000000, 9999999)} now")
        else:
            lines.append(f"ham\tcan you pick me up from {rng.choice(chat)} later? ok thanks")
    return lines


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLM_DATA_MIRROR", str(mirror))  # the tokenizer
    monkeypatch.setenv("LLM_MLFLOW", "off")
    torch.manual_seed(0)
    save_model(GPT(get_preset("cpu-tiny", context_length=64)), "models/base")
    write_params(tmp_path, {})
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/sms_spam_collection.tsv").write_text("\n".join(sms_lines(120)) + "\n", encoding="utf-8")
    return tmp_path


def run_stage(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLM_MLFLOW": "off"}
    cmd = [sys.executable, "-m", "stages.finetune_classifier"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def write_params(root: Path, overrides: dict) -> None:
    section = {
        "classifier": {"method": "lora", "max_length": 32, "lora": {"r": 4, "alpha": 8}},
        "epochs": 3,
        "train": {"batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "precision": "fp32"},
        "eval_batch_size": 32,
    }
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune_classifier": section | overrides}), encoding="utf-8")


def test_stage_trains_saves_reports_and_classifies(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(workdir, {"export_merged": True})
    assert run_stage(workdir).returncode == 0
    metrics = json.loads((workdir / METRICS).read_text())
    assert {"train", "val", "test", "training"} <= metrics.keys()
    assert metrics["train"]["n"] == 84 and metrics["val"]["n"] == 12 and metrics["test"]["n"] == 24
    assert metrics["test"]["accuracy"] >= 0.9 and metrics["test"]["roc_auc"] >= 0.9
    assert sum(map(sum, metrics["test"]["confusion"])) == 24
    assert metrics["training"]["method"] == "lora" and metrics["training"]["steps"] == 3 * 11
    rows = (workdir / "plots/finetune_classifier_confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 25
    wrong = json.loads((workdir / REPORTS / "misclassified.json").read_text())
    assert len(wrong) == sum(r.split(",")[0] != r.split(",")[1] for r in rows[1:])
    assert (workdir / REPORTS / "confusion.png").stat().st_size > 0
    assert (workdir / "plots/finetune_classifier/val_accuracy.csv").read_text().count("\n") == 1 + 3
    assert json.loads((workdir / "runs/finetune_classifier.json").read_text())["run_id"] is None  # MLflow off
    assert not list((workdir / "checkpoints/finetune_classifier").glob("*"))  # removed after success

    clf = load_classifier(workdir / OUT_DIR)
    merged = load_classifier(workdir / OUT_DIR / "merged")
    ids, lengths = torch.tensor([[5, 6, 7]]), torch.tensor([3])
    torch.testing.assert_close(merged(ids, lengths), clf(ids, lengths), atol=1e-5, rtol=0)

    capsys.readouterr()
    assert cli_main(["classify", "--model", str(OUT_DIR), SPAM[0], HAM[0], SPAM[1], HAM[1]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == ["spam", "ham", "spam", "ham"]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in out)
    (workdir / "texts.txt").write_text(f"{HAM[0]}\n\n{SPAM[0]}\n", encoding="utf-8")
    assert cli_main(["classify", "--model", str(OUT_DIR), "--file", "texts.txt"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["ham", "spam"]

    save_model(GPT(get_preset("cpu-tiny", context_length=64, n_layers=3)), "models/other")
    assert cli_main(["classify", "--model", str(OUT_DIR), "--base", "models/other", "hi"]) == 1
    assert "n_layers=3 (adapter expects 2)" in capsys.readouterr().err


def test_bad_rows_fail_or_are_counted(workdir: Path) -> None:
    path = workdir / "data/raw/sms_spam_collection.tsv"
    path.write_text(path.read_text() + "spam\t\nmaybe\tsome text\n", encoding="utf-8")
    failed = run_stage(workdir)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].endswith("line 121: empty text (set skip_bad_rows to skip bad rows)")
    write_params(workdir, {"data": {"skip_bad_rows": True}, "epochs": 1})
    assert run_stage(workdir).returncode == 0
    assert json.loads((workdir / METRICS).read_text())["training"]["skipped_rows"] == 2


def test_derived_train_settings_are_rejected(workdir: Path) -> None:
    write_params(workdir, {"train": {"max_steps": 10}})
    failed = run_stage(workdir)
    assert failed.returncode == 1 and "train.max_steps is set by the stage" in failed.stderr


def topic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(message, topic) rows of three topics with their own words; CSV-quoted messages hold commas."""
    rng = random.Random(seed)
    words = {
        "sport": ["match", "goal", "team", "league", "coach"],
        "money": ["shares", "bank", "profit", "market", "tax"],
        "food": ["pasta", "soup", "bread", "cheese", "salad"],
    }
    topics = list(words)
    return [(f"{' '.join(rng.choices(words[t], k=4))}, again", t) for t in (topics[i % 3] for i in range(n))]


def test_own_three_class_csv_with_named_columns(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "data/raw/sms_spam_collection.tsv").unlink()  # only the user's file is read
    (workdir / "data/news").mkdir()
    rows = "".join(f'{i},"{text}",{topic}\n' for i, (text, topic) in enumerate(topic_rows(150)))
    (workdir / "data/news/news.csv").write_text("id,message,topic\n" + rows, encoding="utf-8")
    data = {"path": "data/news/news.csv", "text_column": "message", "label_column": "topic"}
    classifier = {"method": "lora", "max_length": 32, "lora": {"r": 4, "alpha": 8}, "labels": None}  # the data's
    write_params(workdir, {"data": data, "epochs": 4, "classifier": classifier})
    assert run_stage(workdir).returncode == 0
    metrics = json.loads((workdir / METRICS).read_text())
    test = metrics["test"]
    assert test["labels"] == ["food", "money", "sport"] and test["n"] == 30 and len(test["confusion"]) == 3
    assert test["accuracy"] >= 0.8 and test["macro_f1"] >= 0.8  # chance: 1/3
    assert set(test["per_class"]) == {"food", "money", "sport"} and test["per_class"]["food"]["n"] == 10
    rows = (workdir / "plots/finetune_classifier_confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and {r.split(",")[0] for r in rows[1:]} == {"food", "money", "sport"}
    assert json.loads((workdir / OUT_DIR / "classifier.json").read_text())["classifier"]["labels"] == test["labels"]

    capsys.readouterr()
    texts = ["goal team match coach", "bank tax profit shares", "soup bread cheese pasta"]
    assert cli_main(["classify", "--model", str(OUT_DIR), *texts]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["sport", "money", "food"]

    write_params(workdir, {"data": data | {"label_column": "label"}, "classifier": classifier})
    failed = run_stage(workdir)
    assert failed.returncode == 1 and "has no column 'label'" in failed.stderr
    assert "its columns: id, message, topic" in failed.stderr
