"""The pretrain stage end to end on real text (The Verdict from the mirror): outputs, MLflow run, SIGTERM then
resume, load-only from a model directory, torchrun with two processes, and bad params."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llm.config import get_preset
from llm.model import GPT
from llm.model_dir import load_model, save_model
from llm.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "model": {"init": "scratch", "preset": "cpu-tiny", "overrides": {"n_layers": 1}},
    "pretrain": {
        "train": {
            "max_steps": 12, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 6,
            "sample_every": 6, "checkpoint_every": 3, "precision": "fp32",
        },
        "eval_windows": 8, "sample_tokens": 5,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def windows(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/windows from The Verdict: 4,000 train tokens, the rest val, context 32."""
    tokens = np.array(get_tokenizer().encode((mirror / "the-verdict.txt").read_text(encoding="utf-8")), np.uint16)
    out = tmp_path_factory.mktemp("windows")
    tokens[:4000].tofile(out / "train.bin")
    tokens[4000:].tofile(out / "val.bin")
    (out / "meta.json").write_text(json.dumps({"context_length": 32, "stride": 32}))
    return out


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def workdir(tmp_path: Path, windows: Path, **sections: dict) -> Path:
    """A stage working directory: params.yaml (PARAMS with the keys of `sections` replacing theirs, those of
    pretrain.train one by one) and data/windows/."""
    shutil.copytree(windows, tmp_path / "data" / "windows")
    params = {name: {**values, **sections.get(name, {})} for name, values in PARAMS.items()}
    params["pretrain"]["train"] = {**PARAMS["pretrain"]["train"], **sections.get("pretrain", {}).get("train", {})}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def start_stage(cwd: Path, mirror: Path, mlflow_uri: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLM_DATA_MIRROR": str(mirror), "OMP_NUM_THREADS": "1"}
    env |= {"MLFLOW_TRACKING_URI": mlflow_uri} if mlflow_uri else {"LLM_MLFLOW": "off"}
    args = [sys.executable, "-m", "stages.pretrain"]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_stage(cwd: Path, mirror: Path, mlflow_uri: str | None = None) -> subprocess.CompletedProcess[str]:
    process = start_stage(cwd, mirror, mlflow_uri)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def mlflow_client(uri: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def mlflow_runs(uri: str):  # type: ignore[no-untyped-def]
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def test_stage_writes_model_metrics_plots_and_mlflow_run(
    tmp_path: Path, windows: Path, mirror: Path, migrated_store: Path
) -> None:
    cwd = workdir(tmp_path, windows)
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_stage(cwd, mirror, uri)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_model(cwd / "models" / "base")
    assert model.config == get_preset("cpu-tiny", context_length=32, n_layers=1)
    metrics = json.loads((cwd / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 12 and metrics["tokens"] == 12 * 4 * 32
    assert metrics["val_loss"] < 10.8 and metrics["val_ppl"] == pytest.approx(np.exp(metrics["val_loss"]))
    assert metrics["best_val_loss"] <= metrics["val_loss"]
    assert (cwd / "plots" / "pretrain" / "loss.csv").read_text().count("\n") == 13
    assert not any((cwd / "checkpoints" / "pretrain").iterdir())  # removed after success
    run_id = json.loads((cwd / "runs" / "pretrain.json").read_text())["run_id"]
    row = mlflow_runs(uri).set_index("run_id").loc[run_id]
    assert row["status"] == "FINISHED" and row["tags.dvc.stage"] == "pretrain"
    assert row["params.pretrain.train.lr"] == "0.003" and row["params.model.init"] == "scratch"
    assert row["metrics.val_loss"] == pytest.approx(metrics["val_loss"])
    # the model's provenance: what made it, nothing that changes between identical runs (timings, run ids)
    training = json.loads((cwd / "models" / "base" / "config.json").read_text())["training"]
    assert training["stage"] == "pretrain" and training["steps"] == 12 and training["tokens"] == 12 * 4 * 32
    assert not [key for key in training if "seconds" in key or "per_s" in key or "run_id" in key]
    (version,) = mlflow_client(uri).search_model_versions("name = 'llm-base'")  # logged and registered
    assert version.run_id == run_id and version.tags["dvc.stage"] == "pretrain"


def test_registry_log_model_false_trains_the_same_and_registers_nothing(
    tmp_path: Path, windows: Path, mirror: Path, migrated_store: Path
) -> None:
    outputs = {}
    for log_model in (True, False):
        cwd = workdir(tmp_path / str(log_model), windows, pretrain={"registry": {"log_model": log_model}})
        shutil.copy(migrated_store, cwd / "mlflow.db")
        uri = f"sqlite:///{cwd / 'mlflow.db'}"
        done = run_stage(cwd, mirror, uri)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(mlflow_client(uri).search_model_versions("name = 'llm-base'")) == int(log_model)
        assert mlflow_runs(uri)["status"].tolist() == ["FINISHED"]
        outputs[log_model] = (
            (cwd / "models/base/model.safetensors").read_bytes(),
            json.loads((cwd / "metrics/pretrain.json").read_text())["val_loss"],
        )
    assert outputs[True] == outputs[False]  # logging the model changes no weight and no score


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(
    tmp_path: Path, windows: Path, mirror: Path, migrated_store: Path
) -> None:
    steps = {"train": {"max_steps": 24, "checkpoint_every": 3, "eval_every": 12, "sample_every": 0}}
    reference = workdir(tmp_path / "reference", windows, pretrain=steps)
    cwd = workdir(tmp_path / "interrupted", windows, pretrain=steps)
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    uninterrupted = start_stage(reference, mirror)
    victim = start_stage(cwd, mirror, uri)
    deadline = time.monotonic() + 120
    while not list((cwd / "checkpoints" / "pretrain").glob("*/step-*")):
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 1
    assert "error: interrupted by SIGTERM at step" in err and "run again to resume" in err, err[-2000:]
    assert list(mlflow_runs(uri)["status"]) == ["KILLED"]
    rerun = run_stage(cwd, mirror, uri)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoints/pretrain/" in rerun.stderr
    assert sorted(mlflow_runs(uri)["status"]) == ["FINISHED", "KILLED"]
    assert uninterrupted.wait(timeout=300) == 0
    resumed, expected = (json.loads((d / "metrics" / "pretrain.json").read_text()) for d in (cwd, reference))
    assert resumed["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-6)
    assert (cwd / "plots" / "pretrain" / "loss.csv").read_text() == (reference / "plots/pretrain/loss.csv").read_text()


def test_zero_steps_loads_a_model_directory_and_writes_it(tmp_path: Path, windows: Path, mirror: Path) -> None:
    torch.manual_seed(3)
    source = GPT(get_preset("cpu-tiny", context_length=64))
    save_model(source, tmp_path / "source")
    model = {"init": str(tmp_path / "source"), "overrides": {}}
    cwd = workdir(tmp_path / "work", windows, model=model, pretrain={"train": {"max_steps": 0}})
    done = run_stage(cwd, mirror)
    assert done.returncode == 0, done.stderr[-3000:]
    written = load_model(cwd / "models" / "base")
    assert written.config == source.config
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, written.state_dict()[name]), name
    metrics = json.loads((cwd / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 0 and metrics["val_loss"] > 10  # random weights: about ln(50257) = 10.8


def test_nproc_2_relaunches_under_torchrun(tmp_path: Path, windows: Path, mirror: Path) -> None:
    steps = {"batch_size": 2, "max_steps": 4, "sample_every": 0}
    cwd = workdir(tmp_path, windows, pretrain={"nproc": 2, "train": steps})
    done = run_stage(cwd, mirror)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((cwd / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens"] == 4 * 2 * 2 * 32  # both processes' batches counted
    assert (cwd / "models" / "base" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"pretrain": {"learning_rate": 0.1}}, "pretrain: unknown key 'learning_rate'"),
        ({"pretrain": {"train": {"learning_rate": 0.1}}}, "pretrain.train: unknown key 'learning_rate'"),
        ({"model": {"init": "gpt2", "overrides": {"n_layers": 2}}}, "model.overrides apply to init: scratch only"),
        ({"model": {"preset": "cpu-huge"}}, "unknown model preset 'cpu-huge'"),
        ({"model": {"overrides": {"context_length": 16}}}, "model 'scratch' has context_length 16, shorter than"),
    ],
)
def test_bad_params_fail_in_one_line(tmp_path: Path, windows: Path, mirror: Path, sections: dict, message: str) -> None:
    done = run_stage(workdir(tmp_path, windows, **sections), mirror)
    assert done.returncode == 1 and message in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
