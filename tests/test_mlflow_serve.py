"""The champion classifier served by MLflow itself: a real `mlflow models serve` process answering HTTP requests on
127.0.0.1, and `mlflow models predict`, both on `models:/llm-classifier@champion`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm.classifier import classify, load_classifier
from llm.registry import RegistryParams, log_model, update_champion
from llm.tokenizer import get_tokenizer
from llm.tracking import PARENT_RUN_ENV, Tracker

ROOT = Path(__file__).resolve().parents[1]
URI = "models:/llm-classifier@champion"
TEXTS = ["WINNER!! Claim your free prize now", "Are we still on for lunch?"]
STARTUP_SECONDS = 240  # the server imports MLflow and torch and loads the model: ~15-40 s on 2 busy cores


@pytest.fixture(scope="module")
def env(migrated_store: Path, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that sees a store whose llm-classifier champion is a tiny classifier."""
    root = tmp_path_factory.mktemp("serve")
    shutil.copy(migrated_store, root / "mlflow.db")
    variables = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "LLM_MODEL_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in variables.items():
            patch.setenv(key, value)
        patch.delenv(PARENT_RUN_ENV, raising=False)
        with Tracker("finetune_classifier", root=root) as tracker:
            log_model(tracker, "classifier", model_dirs["classifier"], RegistryParams(), base_dir=model_dirs["base"])
        with Tracker("evaluate", root=root) as tracker:
            assert update_champion(tracker, "llm-classifier", "finetune_classifier", "test_accuracy", 0.9)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **variables, "PYTHONPATH": pythonpath}


@pytest.fixture(scope="module")
def expected(model_dirs: dict[str, Path]) -> list[dict[str, object]]:
    labels = classify(load_classifier(model_dirs["classifier"]), TEXTS, get_tokenizer())
    return [{"label": label, "probability": probability} for label, probability in labels]


@pytest.fixture(scope="module")
def server(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve` of the champion on a free port (its own process group, stopped afterwards)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local"]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=out, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not come up in {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_serve_answers_invocations(server: str, expected: list[dict[str, object]]) -> None:
    body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[text] for text in TEXTS]}}).encode()
    request = urllib.request.Request(
        f"{server}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        predictions = json.loads(reply.read())["predictions"]
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    assert [p["probability"] for p in predictions] == pytest.approx([e["probability"] for e in expected], abs=1e-6)

    wrong = urllib.request.Request(
        f"{server}/invocations",
        data=json.dumps({"dataframe_split": {"columns": ["txt"], "data": [["hi"]]}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(wrong, timeout=60)
    assert error.value.code == 400 and "text" in error.value.read().decode()


def test_models_predict_on_the_same_uri(env: dict[str, str], tmp_path: Path, expected: list[dict[str, object]]) -> None:
    (tmp_path / "input.json").write_text(json.dumps({"dataframe_records": [{"text": text} for text in TEXTS]}))
    command = [sys.executable, "-m", "mlflow", "models", "predict", "-m", URI, "--env-manager", "local"]
    command += ["-i", str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "out.json")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=STARTUP_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    assert [p["probability"] for p in predictions] == pytest.approx([e["probability"] for e in expected], abs=1e-6)
