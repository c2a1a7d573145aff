"""Tracking one stage run: MLflow (params, step metrics, artifacts, tags) and DVC files, behind one interface.

A `Tracker` logs one MLflow run for stage S (experiment `$MLFLOW_EXPERIMENT_NAME`, default "llm"), tagged with
the stage, the git commit and dirty flag, the DVC experiment name (`$DVC_EXP_NAME`) and the memory set-up
(`system.allocator`, `system.huge_pages`: see `llm.allocator`); with
`$LLM_MLFLOW_PARENT_RUN_ID` set (by a pipeline wrapper) it is a child of that run. When the run finishes it
writes, under the repository root (a failed or interrupted run leaves the last good run's files alone):
- `metrics/S.json`: the latest value of every metric (for `dvc metrics show/diff`, `dvc exp show`);
- `plots/S/<metric>.csv`: `step,<metric>` rows of every per-step metric (declared as DVC plots);
- `runs/S.json`: `{"run_id", "tracking_uri", "experiment_id"}`, so later stages can log the run ids of the
  stages they depend on even when DVC skipped those stages (lineage survives cache hits).

The tracking URI is `$MLFLOW_TRACKING_URI`, else an absolute `sqlite:///<repo>/mlflow.db` (absolute, so runs made in
the temporary copies of `dvc exp run --temp/--queue` land in the real repository). `LLM_MLFLOW=off` keeps only the
DVC files. When MLflow fails (server down, store locked, read-only or not a database), the tracker warns once and
goes on with the DVC files: tracking never stops training. A local SQLite store is probed first
(`llm.mlflow_store.probe_store`), so a store MLflow cannot use costs seconds, not MLflow's minutes of retries;
MLflow's own log records are silenced during the tracker's calls (the one warning says what failed). The run always
ends: FINISHED, FAILED on an exception, KILLED on SIGINT/SIGTERM (`Interrupted`). A process killed by SIGKILL cannot
end its run: runs carry the `llm.process` tag (host, pid, process start), and the next run of the same stage ends
the RUNNING runs of that stage whose process is gone (same host, pid not alive or reused) as KILLED (store access,
experiment lookup and that clean-up live in `llm.mlflow_store`). Also here: `git_tags`/`git_commit` (the run's
source commit) and `redact`/`one_line` (URLs and errors fit for a log). mlflow and matplotlib are imported only when
a run starts.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from llm import signals
from llm.allocator import memory_tags
from llm.errors import Interrupted, LLMError
from llm.io import PathLike, as_written, read_json, replaced_dir, write_json
from llm.mlflow_store import (
    PROCESS_TAG,
    end_orphaned_runs,
    get_or_create_experiment,
    probe_store,
    process_id,
    quiet_mlflow,
    tracking_uri,
)
from llm.signals import handling, raise_interrupted, sigterm_held_back

PARENT_RUN_ENV = "LLM_MLFLOW_PARENT_RUN_ID"
MLFLOW_SWITCH_ENV = "LLM_MLFLOW"
_BATCH = 500  # metrics per MLflow log_batch call (its limit is 1000)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: {"model": {"emb_dim": 64}} → {"model.emb_dim": 64}."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Tracks one run of stage `stage`: use as a context manager (or call `close`). From construction to close,
    SIGTERM raises `Interrupted` (the run then ends KILLED, never RUNNING).

    root: repository root the DVC files are written under (default: the working directory, where stages run).
    upstream: stages whose `runs/<name>.json` run ids are logged as params `upstream.<name>.run_id`.
    mlflow: False writes only the DVC files; None (default) follows `$LLM_MLFLOW` (off/0/false disables).
    """

    def __init__(
        self,
        stage: str,
        *,
        root: PathLike = ".",
        upstream: tuple[str, ...] = (),
        mlflow: bool | None = None,
        uri: str | None = None,
    ) -> None:
        self.stage = stage
        self.root = Path(root)
        self.metrics_file = self.root / "metrics" / f"{stage}.json"
        self.plots_dir = self.root / "plots" / stage
        self.run_file = self.root / "runs" / f"{stage}.json"
        self.latest: dict[str, float | int] = {}
        self.series: dict[str, dict[int, float | int]] = {}
        self.status: str | None = None
        self.run_id: str | None = None
        self.uri = uri or tracking_uri(self.root)
        self.experiment_id: str | None = None
        self._client: Any = None  # None once tracking is off (never started, or a call failed)
        self._run_client: Any = None  # the client that created the run: it also ends it
        self._pending: list[Any] = []
        self._sigterm = contextlib.ExitStack()  # SIGTERM raises Interrupted until close
        if mlflow is None:
            mlflow = os.environ.get(MLFLOW_SWITCH_ENV, "on").lower() not in ("0", "off", "false", "no")
        self._signals_seen = len(signals.raised)
        self._sigterm.enter_context(handling((signal.SIGTERM,), raise_interrupted))  # before the run exists
        try:
            if mlflow:
                with sigterm_held_back(), quiet_mlflow():  # MLflow start-up takes seconds, would swallow the signal
                    try:
                        self._start()
                    except Exception as err:
                        self._disable(err)
            self.log_params(
                {f"upstream.{name}.run_id": run_id for name in upstream if (run_id := _run_id(self.root, name))}
            )
        except BaseException as err:
            self.close("KILLED" if isinstance(err, Interrupted | KeyboardInterrupt) else "FAILED")
            raise

    # -- logging ------------------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params once each; values are stringified (None as "null")."""
        if self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, "null" if v is None else str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._mlflow(lambda chunk=items[i : i + 100]: self._client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow(lambda: self._client.log_batch(self.run_id, tags=_tags(tags)))

    def log_metrics(self, metrics: Mapping[str, float | int], step: int | None = None) -> None:
        """Record metrics; with a `step` they are also a per-step series (plots, MLflow history).

        Values go to MLflow in batches; the DVC files are written when the run closes FINISHED.
        """
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for key, value in metrics.items():
            self.latest[key] = value
            if step is not None:
                self.series.setdefault(key, {})[step] = value
        if len(self._pending) >= _BATCH:
            self._send_metrics()

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact, e.g. "samples/step_000100.txt" (MLflow only)."""
        self._mlflow(lambda: self._client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON/YAML artifact (by the file's extension), e.g. "config.json" (MLflow only)."""
        self._mlflow(lambda: self._client.log_dict(self.run_id, dict(data), artifact_file))

    def log_artifact(self, path: PathLike, artifact_path: str | None = None) -> None:
        """A local file or directory as an artifact (MLflow only)."""
        with as_written(path) as written:  # an output the stage has written, not yet swapped in (llm.io)
            self._mlflow(lambda: self._client.log_artifact(self.run_id, str(written), artifact_path))

    def close(self, status: str = "FINISHED") -> None:
        """Flush, attach the loss curve, and end the MLflow run with `status` (FINISHED, FAILED or KILLED).

        A SIGTERM that arrives meanwhile is held back until the run's last records are sent, then raised as
        `Interrupted` (so the stage still stops with an error) and the run ends KILLED; then the handler installed
        before the Tracker is restored. A SIGTERM raised during the run but caught by code in between (a library's
        `except Exception`) also ends the run KILLED and raises `Interrupted` here.
        """
        if self.status is not None:
            return
        swallowed = signals.raised[self._signals_seen :] if status == "FINISHED" else []
        self.status = "KILLED" if swallowed else status  # a SIGTERM that some library caught: still a stop
        try:
            with sigterm_held_back():
                self._send_metrics()
                if self.status == "FINISHED":
                    self._write_dvc_files()
                if self._client is not None and any(key.endswith("loss") for key in self.series):
                    self._log_loss_figure()
        except (Interrupted, KeyboardInterrupt):  # the stage stops with an error: its run must not say FINISHED
            self.status = "KILLED"
            raise
        finally:  # a run that exists is always ended: also when a signal struck before the hold began, or after
            # a failed call switched tracking off (a store that is still down costs one more attempt)
            try:
                if self.run_id is not None:
                    self._client = self._run_client
                    self._mlflow(lambda: self._client.set_terminated(self.run_id, self.status))
            finally:  # also when a SIGTERM held back during that last call raises: no handler outlives the run
                self._sigterm.close()
        if swallowed:
            raise Interrupted(swallowed[0], f"stopped by {signal.Signals(swallowed[0]).name}")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        killed = isinstance(exc, Interrupted | KeyboardInterrupt)
        self.close("FINISHED" if exc is None else "KILLED" if killed else "FAILED")

    # -- internals ----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        probe_store(self.uri)
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        experiment_id = get_or_create_experiment(client, self.uri)
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        tags = {"dvc.stage": self.stage, "dvc.exp_name": exp_name, "mlflow.source.name": f"stages.{self.stage}"}
        tags[PROCESS_TAG] = process_id(os.getpid())
        tags |= git_tags(self.root) | {f"system.{k}": v for k, v in memory_tags().items()}
        if parent := os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = parent
        run_name = f"{self.stage} ({exp_name})" if exp_name else self.stage
        run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        self._client, self.run_id, self.experiment_id = client, run.info.run_id, experiment_id
        self._run_client = client
        end_orphaned_runs(client, experiment_id, self.stage)

    def _write_dvc_files(self) -> None:
        """metrics/<stage>.json, plots/<stage>/<metric>.csv and runs/<stage>.json, each file (and the plots folder)
        written atomically."""
        write_json(self.metrics_file, {k: _json_number(v) for k, v in self.latest.items()})
        if self.series:  # the folder is replaced whole: no CSV of an earlier run's metric stays
            with replaced_dir(self.plots_dir) as staged:
                for key, points in self.series.items():
                    with open(staged / f"{key}.csv", "w", newline="") as f:
                        writer = csv.writer(f)
                        writer.writerow(["step", key])
                        writer.writerows(sorted(points.items()))
        uri = redact(self.uri)
        run = {"run_id": self.run_id, "tracking_uri": uri, "experiment_id": self.experiment_id}
        write_json(self.run_file, run if self.run_id else {"run_id": None, "tracking_uri": None})

    def _send_metrics(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), _BATCH):
            self._mlflow(lambda chunk=pending[i : i + _BATCH]: self._client.log_batch(self.run_id, metrics=chunk))

    def _mlflow(self, call: Callable[[], Any]) -> None:
        """Run an MLflow call; on the first failure warn once and continue without MLflow."""
        if self._client is None:
            return
        with sigterm_held_back(), quiet_mlflow():  # a SIGTERM during the call is delivered after it
            try:
                call()
            except Exception as err:
                self._disable(err)

    def _disable(self, err: Exception) -> None:
        print(
            f"warning: MLflow at {redact(self.uri)} failed ({type(err).__name__}: {one_line(redact(str(err)))}); "
            f"continuing without it: metrics go to {self.metrics_file} and {self.plots_dir}/ only",
            file=sys.stderr,
        )
        self._client, self._pending = None, []

    def _log_loss_figure(self) -> None:
        """The loss curves as plots/loss.png; a failure to draw them (our side, not MLflow's) only skips the figure."""
        try:
            figure = self._loss_figure()
        except Exception as err:
            print(f"warning: no loss figure for MLflow ({type(err).__name__}: {str(err)[:200]})", file=sys.stderr)
            return
        self._mlflow(lambda: self._client.log_figure(self.run_id, figure, "plots/loss.png"))

    def _loss_figure(self) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4), dpi=100)
        axes = figure.add_subplot()
        for key in sorted(k for k in self.series if k.endswith("loss")):
            steps, values = zip(*sorted(self.series[key].items()), strict=True)
            axes.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None)
        axes.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"{self.stage}: loss")
        axes.grid(alpha=0.3)
        axes.legend()
        return figure


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (runs of whitespace as one space), cut to `limit` characters."""
    return " ".join(text.split())[:limit]


def git_commit(root: Path) -> dict[str, str]:
    """{"mlflow.source.git.commit": HEAD} of the repository at `root`; {} when git cannot tell."""
    try:
        return {"mlflow.source.git.commit": _git(root, "rev-parse", "HEAD")}
    except (OSError, subprocess.SubprocessError):
        return {}


def git_tags(root: Path) -> dict[str, str]:
    """`git_commit` plus "git.dirty" ("true" when tracked files have uncommitted changes); {} without git."""
    try:
        commit = git_commit(root)
        dirty = commit and str(bool(_git(root, "status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        return {}
    return commit | {"git.dirty": dirty} if dirty else {}


def redact(text: str) -> str:
    """`text` with the user:password@ part of every URL removed, so no secret lands in a committed file or a log."""
    return re.sub(r"(?<=//)[^/@\s]+@", "", text)


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True)
    return done.stdout.strip()


def _run_id(root: Path, stage: str) -> str | None:
    with contextlib.suppress(LLMError):
        return read_json(root / "runs" / f"{stage}.json").get("run_id")
    return None


def _tags(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


def _json_number(value: float | int) -> float | int | None:
    return value if math.isfinite(value) else None
