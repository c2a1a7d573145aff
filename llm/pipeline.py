"""A parent MLflow run around a whole pipeline: `dvc repro` or `dvc exp run`, run as a subprocess.

DVC has no pipeline hooks, so the wrapper opens the parent run, hands its id to the stages through
`$LLM_MLFLOW_PARENT_RUN_ID` (`llm.tracking.PARENT_RUN_ENV`; every stage's Tracker then starts a child run) and
ends the parent by how DVC ended: FINISHED on exit status 0, KILLED when DVC died of a signal or the wrapper
received SIGINT/SIGTERM, FAILED otherwise (DVC exits 255 when a stage fails, also when a signal stopped the
stage: the stage's own run says KILLED then). `MLFLOW_RUN_ID` is never passed on: a stage starting a run with it
would end the parent. Plain `dvc repro` works without the wrapper (the stages' runs then have no parent). If
MLflow cannot be reached the wrapper warns (once, within seconds: `llm.mlflow_store.probe_store`) and runs DVC anyway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm.errors import LLMError
from llm.mlflow_store import get_or_create_experiment, probe_store, quiet_mlflow, tracking_uri
from llm.paths import repo_root
from llm.signals import relay_to
from llm.tracking import PARENT_RUN_ENV, git_commit, one_line, redact

ACTIONS: dict[str, tuple[str, ...]] = {"repro": ("repro",), "exp-run": ("exp", "run")}


def dvc_executable() -> str:
    """The `dvc` beside this Python interpreter (the same virtual environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if found is None:
        raise LLMError("dvc not found: install the pipeline extras (pip install 'llm[pipeline]')")
    return found


def run_pipeline(action: str, dvc_args: Sequence[str] = (), *, dvc: str | None = None) -> int:
    """Run `dvc <action> <dvc_args>` under a parent MLflow run; returns DVC's exit status (128 + n for signal n)."""
    if action not in ACTIONS:
        raise LLMError(f"unknown pipeline action {action!r}; valid: {', '.join(ACTIONS)}")
    command = [dvc or dvc_executable(), *ACTIONS[action], *dvc_args]
    parent = _start_parent(action, command)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_RUN_ID"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # stages' `python`
    if parent is not None:
        env[PARENT_RUN_ENV] = parent[1]
    child: list[subprocess.Popen[bytes]] = []
    received: list[int] = []
    returncode = 1
    try:
        with relay_to(child, received):
            child.append(subprocess.Popen(command, env=env))
            returncode = child[0].wait()
    except FileNotFoundError as err:
        raise LLMError(f"cannot run {command[0]}: {err.strerror}") from err
    finally:
        killed = returncode < 0 or bool(received)  # Popen: -n when the child died of signal n
        status = "KILLED" if killed else "FINISHED" if returncode == 0 else "FAILED"
        if parent is not None:
            _end_parent(parent, status, 128 - returncode if returncode < 0 else returncode)
    return 128 - returncode if returncode < 0 else returncode


def _start_parent(action: str, command: list[str]) -> tuple[Any, str] | None:
    """Create the parent run; (client, run id), or None (with a warning) when MLflow fails."""
    uri = tracking_uri()
    try:
        with quiet_mlflow():
            probe_store(uri)
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            experiment_id = get_or_create_experiment(client, uri)
            tags = {
                "llm.pipeline": action,
                "dvc.command": " ".join(["dvc", *command[1:]]),
                "mlflow.source.name": "llm pipeline",
                **git_commit(repo_root()),
            }
            run = client.create_run(experiment_id, run_name=f"pipeline {action}", tags=tags)
    except Exception as err:
        print(
            f"warning: MLflow at {redact(uri)} failed ({type(err).__name__}: {one_line(redact(str(err)))}); "
            "running without a parent run",
            file=sys.stderr,
        )
        return None
    print(f"pipeline: MLflow parent run {run.info.run_id} at {redact(uri)}", file=sys.stderr)
    return client, run.info.run_id


def _end_parent(parent: tuple[Any, str], status: str, code: int) -> None:
    client, run_id = parent
    try:
        with quiet_mlflow():
            client.set_tag(run_id, "dvc.exit_code", str(code))
            client.set_terminated(run_id, status)
    except Exception as err:
        print(
            f"warning: could not end MLflow parent run {run_id} ({type(err).__name__}: {one_line(redact(str(err)))})",
            file=sys.stderr,
        )
