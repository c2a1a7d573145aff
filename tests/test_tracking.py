"""llm.tracking: MLflow runs (SQLite store and a real `mlflow server`), their end states, lineage, the DVC
files, and training that survives an MLflow outage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from llm.errors import Interrupted, LLMError
from llm.mlflow_store import PROCESS_TAG, process_id, tracking_uri
from llm.paths import repo_root
from llm.tracking import PARENT_RUN_ENV, Tracker


def runs(uri: str) -> pd.DataFrame:
    """Every run in the store, as `mlflow.search_runs` reports them."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def test_repo_root_sees_through_dvc_temp_copies(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd" / "stages"
    temp_copy.mkdir(parents=True)
    (temp_copy.parent / ".dvc").mkdir()  # the copy is a repository of its own
    assert repo_root(temp_copy) == repo
    assert repo_root(repo / ".dvc" / "tmp") == repo
    (repo / "sub").mkdir()
    assert repo_root(repo / "sub") == repo


def test_default_uri_is_absolute_sqlite_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "tmp" / "exps" / "x").mkdir(parents=True)
    assert tracking_uri(tmp_path / ".dvc" / "tmp" / "exps" / "x") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(tmp_path).startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri(tmp_path) == "http://tracking.example:5000"


def test_run_has_params_metrics_tags_artifacts_and_dvc_files(store: str, tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sample.json").write_text(json.dumps({"run_id": "abc123", "tracking_uri": store}))
    with Tracker("pretrain", root=tmp_path, upstream=("sample", "tokenize")) as tracker:
        tracker.log_params({"pretrain": {"lr": 0.001, "betas": (0.9, 0.95)}, "model": {"init": "scratch"}})
        for step in range(1, 4):
            tracker.log_metrics({"loss": 4.0 / step, "lr": 1e-3}, step)
        tracker.log_metrics({"val_loss": 2.5}, 3)
        tracker.log_metrics({"tokens": 1536})
        tracker.log_text("Once upon a time", "samples/step_00000003.txt")
    frame = runs(store)
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["status"] == "FINISHED" and row["run_id"] == tracker.run_id
    assert row["params.pretrain.lr"] == "0.001" and row["params.pretrain.betas"] == "(0.9, 0.95)"
    assert row["params.upstream.sample.run_id"] == "abc123" and "params.upstream.tokenize.run_id" not in frame
    assert row["metrics.loss"] == pytest.approx(4 / 3) and row["metrics.val_loss"] == 2.5
    assert row["tags.dvc.stage"] == "pretrain" and row["tags.dvc.exp_name"] == "exp-lr3"
    assert row["tags.mlflow.runName"] == "pretrain (exp-lr3)"
    assert row["tags.mlflow.source.git.commit"] == commit and row["tags.git.dirty"] == "false"
    from mlflow import MlflowClient

    client = MlflowClient(store)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == pytest.approx([4.0, 2.0, 4 / 3])
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"samples", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/loss.png"]
    assert json.loads((tmp_path / "runs" / "pretrain.json").read_text())["run_id"] == tracker.run_id
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics == {"loss": pytest.approx(4 / 3), "lr": 1e-3, "val_loss": 2.5, "tokens": 1536}
    assert (tmp_path / "plots" / "pretrain" / "loss.csv").read_text().splitlines()[:2] == ["step,loss", "1,4.0"]


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("boom"), "FAILED"), (LLMError("bad input"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
)
def test_runs_never_stay_running(store: str, tmp_path: Path, error: BaseException, status: str) -> None:
    with pytest.raises(type(error)), Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
        raise error
    assert list(runs(store)["status"]) == [status]
    assert not any(tmp_path.glob("*/*pretrain*"))  # a failed run leaves the last good run's DVC files alone


def test_sigterm_ends_the_run_killed(store: str, tmp_path: Path) -> None:
    with pytest.raises(Interrupted, match="SIGTERM"), Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert list(runs(store)["status"]) == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_sigterm_while_the_tracker_starts_ends_the_run_killed(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler is installed before the run is created: a SIGTERM right after create_run (here while the
    upstream run ids are read, still inside the constructor) ends the run KILLED."""
    import llm.tracking

    def upstream_run_id(root: Path, stage: str) -> str | None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return None

    monkeypatch.setattr(llm.tracking, "_run_id", upstream_run_id)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"):
        Tracker("evaluate", root=tmp_path, upstream=("pretrain",))
    assert list(runs(store)["status"]) == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_inside_an_mlflow_call_stops_the_stage_and_ends_the_run_killed(store: str, tmp_path: Path) -> None:
    """A SIGTERM that lands inside an MLflow client call is not mistaken for an MLflow failure (which would
    disable tracking and leave the run RUNNING): the call completes, then Interrupted stops the stage, KILLED."""
    with pytest.raises(Interrupted, match="SIGTERM"), Tracker("pretrain", root=tmp_path) as tracker:
        log_batch = tracker._client.log_batch

        def interrupted_call(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the signal arrives while the call runs
            log_batch(*args, **kwargs)

        tracker._client.log_batch = interrupted_call
        tracker.log_params({"lr": 0.1})
    frame = runs(store)
    assert list(frame["status"]) == ["KILLED"] and list(frame["params.lr"]) == ["0.1"]


def test_sigterm_while_the_run_ends_is_raised_after_it_has_ended(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM during close() neither interrupts ending the run nor gets lost: the run ends KILLED (not
    FINISHED: the stage was told to stop), then the stage stops with Interrupted (non-zero exit), so DVC never
    records it."""
    write_dvc_files = Tracker._write_dvc_files

    def slow_write(self: Tracker) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the signal arrives here; it must wait until the run has ended
        write_dvc_files(self)

    monkeypatch.setattr(Tracker, "_write_dvc_files", slow_write)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"), Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
    assert list(runs(store)["status"]) == ["KILLED"]
    assert (tmp_path / "metrics" / "pretrain.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_swallowed_by_library_code_still_ends_the_run_killed_and_stops_the_stage(
    store: str, tmp_path: Path
) -> None:
    """MLflow's model logging runs the input example inside `except Exception`: the `Interrupted` a SIGTERM raises
    there never reaches the stage. The run still ends KILLED (not FINISHED), the stage stops with `Interrupted`, and
    the DVC files of the last good run are left alone."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"), Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
        try:  # what a library does
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        except Exception:
            pass
    assert list(runs(store)["status"]) == ["KILLED"]
    assert not (tmp_path / "metrics" / "pretrain.json").exists()
    assert signal.getsignal(signal.SIGTERM) is previous
    with Tracker("pretrain", root=tmp_path) as tracker:  # the next run is not stopped by the old signal
        tracker.log_metrics({"loss": 1.0}, 1)
    assert (tmp_path / "metrics" / "pretrain.json").is_file()


def test_a_loss_figure_that_cannot_be_drawn_is_skipped_not_fatal_to_tracking(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Drawing fails on our side (here as after an interrupted matplotlib import): the figure is skipped with a
    warning, while the metrics still reach MLflow and the run ends FINISHED."""

    def broken_figure(self: Tracker) -> None:
        raise AttributeError("module 'matplotlib' has no attribute 'get_data_path'")

    monkeypatch.setattr(Tracker, "_loss_figure", broken_figure)
    with Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_metrics({"loss": 1.5}, 1)
    frame = runs(store)
    assert list(frame["status"]) == ["FINISHED"] and list(frame["metrics.loss"]) == [1.5]
    assert "no loss figure" in capsys.readouterr().err


def test_a_failed_mlflow_call_still_lets_the_run_end(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A call that fails switches tracking off (one warning) but the run it created is still ended: never left
    RUNNING."""
    with pytest.raises(Interrupted), Tracker("pretrain", root=tmp_path) as tracker:

        def failing_call(*args: object, **kwargs: object) -> None:
            raise ConnectionError("store went away")

        tracker._client.log_batch = failing_call
        tracker.log_params({"lr": 0.1})
        assert tracker._client is None  # switched off
        raise Interrupted(signal.SIGTERM, "stopped by SIGTERM")
    assert list(runs(store)["status"]) == ["KILLED"]
    assert capsys.readouterr().err.count("store went away") == 1


def test_child_of_a_pipeline_parent_run(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Tracker("parent", root=tmp_path) as parent:
        monkeypatch.setenv(PARENT_RUN_ENV, parent.run_id)  # type: ignore[arg-type]
        with Tracker("pretrain", root=tmp_path) as child:
            pass
    frame = runs(store).set_index("run_id")
    assert frame.loc[child.run_id, "tags.mlflow.parentRunId"] == parent.run_id
    assert set(frame["status"]) == {"FINISHED"}


def test_mlflow_down_warns_once_and_keeps_dvc_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_params({"lr": 1e-3})
        tracker.log_metrics({"loss": 2.0}, 1)
        tracker.log_text("hello", "samples/a.txt")
    err = capsys.readouterr().err
    assert tracker.run_id is None and err.count("warning: MLflow at http://127.0.0.1:") == 1 and "s3cret" not in err
    assert json.loads((tmp_path / "metrics" / "pretrain.json").read_text()) == {"loss": 2.0}
    assert json.loads((tmp_path / "runs" / "pretrain.json").read_text()) == {"run_id": None, "tracking_uri": None}


def test_a_run_left_running_by_sigkill_is_ended_killed_by_the_next_run_of_its_stage(store: str, tmp_path: Path) -> None:
    """A stage killed by SIGKILL cannot end its run; the next run of the stage does, when the run's process is gone.
    RUNNING runs of a live process, of another host, without the process tag or of another stage are left alone."""
    from mlflow import MlflowClient

    code = (
        "import os, signal; from llm.tracking import Tracker\n"
        f"t = Tracker('pretrain', root={str(tmp_path)!r}); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("llm").experiment_id
    alive = {
        "live process": {PROCESS_TAG: process_id(os.getpid())},
        "other host": {PROCESS_TAG: "elsewhere:1:1"},
        "untagged": {},
    }
    for name, tags in alive.items():
        client.create_run(experiment, run_name=name, tags={"dvc.stage": "pretrain", **tags})
    client.create_run(experiment, run_name="other stage", tags={"dvc.stage": "evaluate", PROCESS_TAG: "x:1:"})
    assert list(runs(store)["status"]) == ["RUNNING"] * 5
    with Tracker("pretrain", root=tmp_path):
        pass
    status = runs(store).set_index("tags.mlflow.runName")["status"]
    assert status["pretrain (exp-lr3)"].tolist() == ["FINISHED", "KILLED"]  # newest first
    assert [status[name] for name in [*alive, "other stage"]] == ["RUNNING"] * 4


@pytest.mark.parametrize("store_kind", ["a directory", "not a database", "in a file's place"])
def test_an_unusable_sqlite_store_costs_one_warning_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], store_kind: str
) -> None:
    """MLflow retries a store it cannot open for ~100 s, logging a warning block each time; the tracker probes the
    store first: one warning line, seconds, and the DVC files still written."""
    path = tmp_path / "mlflow.db"
    if store_kind == "a directory":
        path.mkdir()
    elif store_kind == "not a database":
        path.write_bytes(b"not sqlite " * 100)
    else:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    started = time.monotonic()
    with Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_metrics({"loss": 2.0}, 1)
    assert time.monotonic() - started < 15
    err = capfd.readouterr().err
    assert err.count("warning: MLflow at sqlite:///") == 1 and len(err.strip().splitlines()) == 1, err
    assert json.loads((tmp_path / "metrics" / "pretrain.json").read_text()) == {"loss": 2.0}


def test_mlflow_switched_off_never_imports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = (
        "import sys; from llm.tracking import Tracker\n"
        f"with Tracker('x', root={str(tmp_path)!r}) as t: t.log_params({{'a': 1}}); t.log_metrics({{'loss': 1.0}}, 1)\n"
        "assert 'mlflow' not in sys.modules\n"
    )
    env = {**os.environ, "LLM_MLFLOW": "off"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert (tmp_path / "plots" / "x" / "loss.csv").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(migrated_store: Path, tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (skips, saying why, if it does not come up within 60 s)."""
    shutil.copy(migrated_store, tmp_path / "server.db")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    args = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (tmp_path / "server.log").read_text()[-500:]
                pytest.skip(f"mlflow server did not start on {url} within 60 s: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn workers (its own process group)
        server.wait(timeout=30)
        log.close()


def test_logs_to_a_real_mlflow_server(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_params({"lr": 0.01})
        tracker.log_metrics({"loss": 3.0}, 1)
        tracker.log_metrics({"loss": 2.0}, 2)
        tracker.log_text("a sample", "samples/step_00000002.txt")
    found = runs(mlflow_server)
    assert list(found["run_id"]) == [tracker.run_id] and list(found["status"]) == ["FINISHED"]
    assert found.loc[0, "metrics.loss"] == 2.0
    assert json.loads((tmp_path / "runs" / "pretrain.json").read_text())["tracking_uri"] == mlflow_server


def test_a_relative_sqlite_uri_keeps_artifacts_beside_the_store(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with Tracker("pretrain", root=tmp_path) as tracker:
        tracker.log_text("hello", "samples/a.txt")
    assert tracker.run_id is not None
    assert (tmp_path / "mlartifacts" / tracker.run_id / "artifacts" / "samples" / "a.txt").is_file()
