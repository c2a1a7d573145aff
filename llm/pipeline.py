"""A parent MLflow run around a whole pipeline: `dvc repro` or `dvc exp run`, run as a subprocess.

DVC has no pipeline hooks, so the wrapper opens the parent run, hands its id to the stages through
`$LLM_MLFLOW_PARENT_RUN_ID` (`llm.tracking.PARENT_RUN_ENV`; every stage's Tracker then starts a child run) and
ends the parent by DVC's exit status: FINISHED on 0, KILLED when DVC died of a signal or the wrapper was
interrupted, FAILED otherwise. `MLFLOW_RUN_ID` is never passed on: a stage starting a run with it would end
the parent. Plain `dvc repro` works without the wrapper (the stages' runs then have no parent). If MLflow
cannot be reached the wrapper warns and runs DVC anyway.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from llm.errors import LLMError
from llm.tracking import DEFAULT_EXPERIMENT, PARENT_RUN_ENV, repo_root, tracking_uri
from llm.tracking import _redact as redact  # user:password@ stripped from URLs before printing

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
    status, code = "FAILED", 1
    try:
        with _relay_signals(child, received):
            child.append(subprocess.Popen(command, env=env))
            code = child[0].wait()
    except FileNotFoundError as err:
        raise LLMError(f"cannot run {command[0]}: {err.strerror}") from err
    finally:
        code = 128 - code if code < 0 else code  # died of signal n: 128 + n, as shells report it
        status = "FINISHED" if code == 0 and not received else "KILLED" if received or code > 128 else "FAILED"
        if parent is not None:
            _end_parent(parent, status, code)
    return code


def _start_parent(action: str, command: list[str]) -> tuple[Any, str] | None:
    """Create the parent run; (client, run id), or None (with a warning) when MLflow fails."""
    uri = tracking_uri()
    try:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = (
                Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" if uri.startswith("sqlite:") else None
            )
            client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)
            experiment = client.get_experiment_by_name(name)
        tags = {
            "llm.pipeline": action,
            "dvc.command": " ".join(["dvc", *command[1:]]),
            "mlflow.source.name": "llm pipeline",
            **_git_commit(),
        }
        run = client.create_run(experiment.experiment_id, run_name=f"pipeline {action}", tags=tags)
    except Exception as err:
        print(
            f"warning: MLflow at {redact(uri)} failed ({type(err).__name__}: {redact(str(err))}); "
            "running without a parent run",
            file=sys.stderr,
        )
        return None
    print(f"pipeline: MLflow parent run {run.info.run_id} at {redact(uri)}", file=sys.stderr)
    return client, run.info.run_id


def _end_parent(parent: tuple[Any, str], status: str, code: int) -> None:
    client, run_id = parent
    try:
        client.set_tag(run_id, "dvc.exit_code", str(code))
        client.set_terminated(run_id, status)
    except Exception as err:
        print(
            f"warning: could not end MLflow parent run {run_id} ({type(err).__name__}: {redact(str(err))})",
            file=sys.stderr,
        )


def _git_commit() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit}


@contextmanager
def _relay_signals(child: list[subprocess.Popen[bytes]], received: list[int]) -> Iterator[None]:
    """While active, SIGINT and SIGTERM are recorded in `received` instead of stopping the wrapper. SIGTERM is
    passed on to the child; SIGINT is not, as Ctrl-C already reaches DVC through the terminal's process group
    (a second one would make the stages stop without a checkpoint)."""

    def relay(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if signum == signal.SIGTERM and child:
            child[0].send_signal(signum)

    previous = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
