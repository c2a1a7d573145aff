"""llm.pipeline: a parent MLflow run around a (fake) `dvc` subprocess; stages attach as children through the
environment, never through MLFLOW_RUN_ID; the parent ends FINISHED / FAILED / KILLED by the outcome."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from llm.cli import main as cli_main
from llm.errors import LLMError
from llm.pipeline import run_pipeline
from llm.tracking import PARENT_RUN_ENV

# A stand-in for dvc: records its arguments and environment, runs one tracked "stage" (a child run), then
# exits with $FAKE_DVC_EXIT, or waits for a signal when that is "wait".
FAKE_DVC = """\
#!{python}
import json, os, signal, sys, time
from llm.tracking import Tracker
record = {{"argv": sys.argv[1:], "parent": os.environ.get("{env}"), "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID"),
          "python": os.environ["PATH"].split(os.pathsep)[0]}}
with open(os.environ["FAKE_DVC_RECORD"], "w") as f:
    json.dump(record, f)
with Tracker("stage", root=os.environ["FAKE_DVC_ROOT"]):
    pass
if os.environ["FAKE_DVC_EXIT"] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if os.environ["FAKE_DVC_EXIT"] == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    open(os.environ["FAKE_DVC_RECORD"] + ".ready", "w").close()
    time.sleep(60)
sys.exit(int(os.environ["FAKE_DVC_EXIT"]))
"""


@pytest.fixture
def fake_dvc(migrated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "must-not-reach-the-stages")
    monkeypatch.setenv("FAKE_DVC_RECORD", str(tmp_path / "record.json"))
    monkeypatch.setenv("FAKE_DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    script = tmp_path / "dvc"
    script.write_text(FAKE_DVC.format(python=sys.executable, env=PARENT_RUN_ENV))
    script.chmod(0o755)
    return script


def runs(tmp_path: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True).set_index("tags.mlflow.runName")


def test_stages_become_children_of_a_finished_parent(fake_dvc: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_DVC_EXIT", "0")
    assert run_pipeline("exp-run", ["-S", "pretrain.lr=0.002"], dvc=str(fake_dvc)) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["argv"] == ["exp", "run", "-S", "pretrain.lr=0.002"]
    assert record["mlflow_run_id"] is None and record["python"] == str(Path(sys.executable).parent)
    frame = runs(tmp_path)
    parent, child = frame.loc["pipeline exp-run"], frame.loc["stage"]
    assert record["parent"] == parent["run_id"] == child["tags.mlflow.parentRunId"]
    assert parent["status"] == child["status"] == "FINISHED"
    assert parent["tags.dvc.command"] == "dvc exp run -S pretrain.lr=0.002" and parent["tags.dvc.exit_code"] == "0"


def test_a_failing_pipeline_fails_the_parent_and_the_cli_exit_status(fake_dvc: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAKE_DVC_EXIT", "3")
    monkeypatch.setattr("llm.pipeline.dvc_executable", lambda: str(fake_dvc))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", "repro", "evaluate", "--force"])
    assert exit_info.value.code == 3
    assert json.loads((tmp_path / "record.json").read_text())["argv"] == ["repro", "evaluate", "--force"]
    parent = runs(tmp_path).loc["pipeline repro"]
    assert parent["status"] == "FAILED" and parent["tags.dvc.exit_code"] == "3"


@pytest.mark.parametrize(("exit", "status", "code"), [("255", "FAILED", 255), ("kill", "KILLED", 128 + 9)])
def test_the_parent_is_killed_only_by_signals_not_by_a_high_exit_status(
    fake_dvc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit: str, status: str, code: int
) -> None:
    """DVC exits 255 when a stage fails: FAILED. KILLED only when DVC itself died of a signal."""
    monkeypatch.setenv("FAKE_DVC_EXIT", exit)
    assert run_pipeline("repro", dvc=str(fake_dvc)) == code
    parent = runs(tmp_path).loc["pipeline repro"]
    assert parent["status"] == status and parent["tags.dvc.exit_code"] == str(code)


def test_sigterm_reaches_dvc_and_ends_the_parent_killed(fake_dvc: Path, tmp_path: Path) -> None:
    code = f"import sys; from llm.pipeline import run_pipeline; sys.exit(run_pipeline('repro', dvc={str(fake_dvc)!r}))"
    wrapper = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "FAKE_DVC_EXIT": "wait"})
    ready = tmp_path / "record.json.ready"
    deadline = time.monotonic() + 120
    while not ready.exists() and wrapper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), "the fake dvc never started"
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=60) == 143  # the fake dvc's answer to the SIGTERM it was passed
    assert runs(tmp_path).loc["pipeline repro", "status"] == "KILLED"


def test_unknown_action_and_missing_dvc_are_clear_errors(fake_dvc: Path, tmp_path: Path) -> None:
    with pytest.raises(LLMError, match="unknown pipeline action 'push'"):
        run_pipeline("push")
    with pytest.raises(LLMError, match="cannot run"):
        run_pipeline("repro", dvc=str(tmp_path / "no-such-dvc"))
    assert runs(tmp_path).loc["pipeline repro", "status"] == "FAILED"
