"""Reaching an MLflow store: its URI, a fast probe of a local SQLite store, MLflow's logging kept quiet, the
experiment runs go to, and the ending of runs left RUNNING by a killed process.

- `tracking_uri`: `$MLFLOW_TRACKING_URI`, else an absolute `sqlite:///<repo>/mlflow.db`.
- `probe_store`: an unusable local SQLite store (read-only, locked, not a database) is an `LLMError` within
  seconds, where MLflow retries for minutes; HTTP stores get few, short retries.
- `quiet_mlflow`: MLflow, urllib3 and alembic log nothing below CRITICAL within the block.
- `get_or_create_experiment`: experiment `$MLFLOW_EXPERIMENT_NAME` (default "llm"), artifacts beside a SQLite store.
- `process_id` / `process_gone` / `end_orphaned_runs`: runs carry the `llm.process` tag ("host:pid:start"); a run
  of a stage whose process is gone (same host, pid not alive or reused, e.g. after SIGKILL) is ended KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import LLMError
from llm.paths import repo_root

PROCESS_TAG = "llm.process"  # "host:pid:start" of the process that started the run (see process_id)
DEFAULT_EXPERIMENT = "llm"


def tracking_uri(start: Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else an absolute SQLite URI for `<repo root>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(start) / 'mlflow.db'}"


def probe_store(uri: str) -> None:
    """An LLMError within seconds when `uri` is a local SQLite store that cannot be written (read-only file or
    filesystem, a directory in its place, not a database, locked for more than 5 s, unwritable folder); MLflow
    would retry opening it for about 100 s. Other stores are left to MLflow, with HTTP retries set low."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a down server fails in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    try:
        if path.exists():
            with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=5)) as db:
                db.execute("BEGIN IMMEDIATE")  # takes the write lock, as MLflow's first write will
                db.execute("SELECT count(*) FROM sqlite_master")
                db.rollback()
        else:  # MLflow creates the store: its folder must take a new file
            path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path.parent).close()
    except (OSError, sqlite3.Error) as err:
        raise LLMError(f"cannot write the SQLite store {path}: {err}") from err


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Within the block MLflow (and the HTTP retries under it) log nothing below CRITICAL: a failing store would
    print a warning block per retry; the tracker's own warning says what failed."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "urllib3", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def process_id(pid: int) -> str:
    """`host:pid:start` for process `pid` of this host; start is its start time in clock ticks after boot (Linux;
    empty elsewhere), so a pid the system gave to a new process is told apart from the one that started a run."""
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def process_gone(process: str) -> bool:
    """Whether the process `process_id` named is known to have ended: False for another host's processes."""
    host, pid, start = ([""] * 3 + process.rsplit(":", 2))[-3:]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    return bool(start) and _start_ticks(int(pid)) != start


def end_orphaned_runs(client: Any, experiment_id: str, stage: str) -> None:
    """End as KILLED the RUNNING runs of `stage` whose process is gone (see `process_gone`): a process killed by
    SIGKILL could not end its own run. Runs of live processes, of other hosts and without the tag stay RUNNING."""
    query = f"tags.`dvc.stage` = '{stage}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], filter_string=query, max_results=1000):
        if process_gone(run.data.tags.get(PROCESS_TAG, "")):
            client.set_tag(run.info.run_id, "llm.ended_by", "a later run of the stage: its process was gone")
            client.set_terminated(run.info.run_id, "KILLED")


def get_or_create_experiment(client: Any, uri: str) -> str:
    """The id of experiment `$MLFLOW_EXPERIMENT_NAME` (default "llm") in `client`'s store at `uri`, created if
    missing; with a SQLite store its artifacts go beside the store (not into a DVC temporary copy)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        local = uri.startswith("sqlite:")
        store = Path(uri.removeprefix("sqlite:///")).resolve()
        location = (store.parent / "mlartifacts").as_uri() if local else None
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            client.create_experiment(name, artifact_location=location)
        experiment = client.get_experiment_by_name(name)
    return str(experiment.experiment_id)


def _start_ticks(pid: int) -> str:
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, counted after the command name
    return ""
