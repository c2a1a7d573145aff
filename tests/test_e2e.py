"""The whole pipeline end to end: `llm pipeline repro` runs every stage of dvc.yaml under the smoke profile
(params-smoke.yaml merged over params.yaml) in a temporary git copy of the repository, then every declared out,
metric and plot must exist, DVC must report the pipeline up to date, and MLflow must hold one finished run per
tracked stage, each a child of the pipeline's parent run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_data_stages import make_env

from llm.allocator import find_allocator

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, recursively for nested mappings (lists and scalars replace)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def smoke_params() -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return merge(params, yaml.safe_load((ROOT / "params-smoke.yaml").read_text(encoding="utf-8")))


def declared_files(pipeline: dict[str, Any]) -> list[str]:
    """Every path dvc.yaml declares as a stage out, metric or plot, and every file its top-level plots read."""
    paths = []
    for stage in pipeline["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            paths += [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(kind, [])]
    for entry in pipeline.get("plots", []):
        name, spec = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        y = (spec or {}).get("y")
        paths += list(y) if isinstance(y, dict) else [name]
    return sorted(set(paths))


def sh(*cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (
        f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    )
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, dict[str, str]]:
    """A temporary git copy of the working tree after `llm pipeline repro` with the smoke profile."""
    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file() and name != "dvc.lock":  # no lock: every stage runs
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False), encoding="utf-8")
    env = make_env(tmp, code=repo, LLM_DATA_MIRROR=str(mirror), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "smoke", cwd=repo, env=env)
    sh(sys.executable, "-m", "llm.cli", "pipeline", "repro", cwd=repo, env=env)
    return repo, env


@pytest.mark.slow
def test_every_declared_output_exists_and_dvc_is_up_to_date(pipeline_run: tuple[Path, dict[str, str]]) -> None:
    repo, env = pipeline_run
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    assert {"pretrain", "finetune_classifier", "finetune_instructions", "evaluate"} <= set(pipeline["stages"])
    missing = [p for p in declared_files(pipeline) if not (repo / p).exists()]
    empty = [p for p in declared_files(pipeline) if (repo / p).is_dir() and not any((repo / p).iterdir())]
    assert not missing and not empty, f"missing {missing}, empty {empty}"
    status = sh(str(BIN / "dvc"), "status", cwd=repo, env=env).stdout
    assert "up to date" in status, status
    shown = json.loads(sh(str(BIN / "dvc"), "metrics", "show", "--json", cwd=repo, env=env).stdout)
    assert "metrics/evaluate.json" in json.dumps(shown)


@pytest.mark.slow
def test_scoreboard_responses_and_report(pipeline_run: tuple[Path, dict[str, str]]) -> None:
    repo, env = pipeline_run
    board = json.loads((repo / "metrics/evaluate.json").read_text())
    assert board["base"]["heldout_perplexity"] > 1 and board["instruct"]["val_loss"] > 0
    assert 0 <= board["base"]["rouge_l"] <= 1 and 0 <= board["instruct"]["rouge_l"] <= 1
    assert 0 <= board["classifier"]["accuracy"] <= 1
    rows = json.loads((repo / "reports/responses.json").read_text())
    assert len(rows) == 110 and all(set(r) == {"instruction", "input", "reference", "response"} for r in rows)
    report = (repo / "reports/evaluation.md").read_text()
    assert "ROUGE-L" in report and "figures/rouge_l.png" in report and (repo / "reports/figures/rouge_l.png").is_file()
    answer = sh(
        sys.executable, "-m", "llm.cli", "instruct", "--max-new-tokens", "5", "Name a colour.", cwd=repo, env=env
    )
    assert answer.returncode == 0


@pytest.mark.slow
def test_one_mlflow_run_per_stage_under_the_parent(pipeline_run: tuple[Path, dict[str, str]]) -> None:
    import mlflow

    repo, env = pipeline_run
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    frame = mlflow.search_runs(search_all_experiments=True)
    (parent,) = frame.loc[frame["tags.llm.pipeline"] == "repro", "run_id"]
    expected_allocator = found[0] if (found := find_allocator()) else "system"
    assert set(frame["status"]) == {"FINISHED"}
    tracked = sorted(p.stem for p in (repo / "runs").glob("*.json"))
    assert {"pretrain", "finetune_classifier", "finetune_instructions", "evaluate"} <= set(tracked)
    for stage in tracked:
        runs = frame[frame["tags.dvc.stage"] == stage]
        assert len(runs) == 1, f"{stage}: {len(runs)} runs"
        assert runs["run_id"].item() == json.loads((repo / "runs" / f"{stage}.json").read_text())["run_id"]
        assert runs["tags.mlflow.parentRunId"].item() == parent
        assert runs["tags.system.allocator"].item() == expected_allocator  # the launcher's memory set-up
        assert runs["tags.system.huge_pages"].item() in ("on", "unavailable")  # requested
    assert len(frame) == len(tracked) + 1
    client = mlflow.MlflowClient()  # the reports each stage logs, read from the outputs it has not yet put in place
    for stage, report in (("finetune_classifier", "reports/misclassified.json"), ("evaluate", "reports/evaluation.md")):
        run_id = json.loads((repo / "runs" / f"{stage}.json").read_text())["run_id"]
        assert report in [a.path for a in client.list_artifacts(run_id, "reports")], stage


@pytest.mark.slow
def test_models_registered_tagged_and_the_champion_classifies_as_the_folder(
    pipeline_run: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    repo, env = pipeline_run
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    commit = sh("git", "rev-parse", "HEAD", cwd=repo, env=env).stdout.strip()
    stages = {"llm-base": "pretrain", "llm-classifier": "finetune_classifier", "llm-instruct": "finetune_instructions"}
    for name, stage in stages.items():
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert version.run_id == json.loads((repo / "runs" / f"{stage}.json").read_text())["run_id"]
        assert version.tags["git.commit"] == commit and version.tags["dvc.stage"] == stage
        assert version.tags.get("dvc.exp_name", "") == ""  # dvc repro, not an experiment
        tagged = {k: v for k, v in version.tags.items() if k.startswith("dvc.deps.")}
        assert tagged == {f"dvc.deps.{dep['path']}": dep["md5"] for dep in lock[stage]["deps"]}, name
    board = json.loads((repo / "metrics/evaluate.json").read_text())
    accuracy, rouge_l = board["classifier"]["accuracy"], board["instruct"]["rouge_l"]
    assert board["champion"] == {
        "classifier": {"version": 1, "score": accuracy, "champion_version": 1, "champion_score": accuracy},
        "instruct": {"version": 1, "score": rouge_l, "champion_version": 1, "champion_score": rouge_l},
    }
    assert client.get_model_version_by_alias("llm-classifier", "champion").tags["score.test_accuracy"] == str(accuracy)
    texts = ["WINNER!! Claim your free prize now, text WIN to 80086", "Are we still on for lunch tomorrow?", "ok"]
    cached = {**env, "LLM_MODEL_CACHE": str(tmp_path / "model-cache")}
    labels = {
        model: sh(sys.executable, "-m", "llm.cli", "classify", "--model", model, *texts, cwd=repo, env=cached).stdout
        for model in ("models:/llm-classifier@champion", "models/classifier")
    }
    assert labels["models:/llm-classifier@champion"] == labels["models/classifier"]
    assert len(labels["models/classifier"].splitlines()) == len(texts)


@pytest.mark.slow
def test_dvc_artifacts_get_fetches_a_model_from_the_remote(
    pipeline_run: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """After `dvc push` to a local remote and a version tag (`<artifact>@v<semver>`, what `dvc artifacts get`
    looks up), `dvc artifacts get` in an empty folder fetches models/classifier from a fresh clone (which has no
    DVC cache: the files come from the remote)."""
    repo, env = pipeline_run
    dvc, remote, clone, empty = str(BIN / "dvc"), tmp_path / "remote", tmp_path / "clone", tmp_path / "empty"
    sh(dvc, "remote", "add", "-d", "local", str(remote), cwd=repo, env=env)
    sh(dvc, "push", "models/base", "models/classifier", cwd=repo, env=env)
    sh("git", "add", "dvc.lock", ".dvc/config", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "lock and remote", cwd=repo, env=env)
    sh("git", "tag", "-a", "llm-classifier@v1.0.0", "-m", "llm-classifier v1.0.0", cwd=repo, env=env)
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    empty.mkdir()
    sh(dvc, "artifacts", "get", str(clone), "llm-classifier", "-o", "classifier", cwd=empty, env=env)
    wanted = sorted(p.relative_to(repo / "models/classifier") for p in (repo / "models/classifier").rglob("*"))
    assert sorted(p.relative_to(empty / "classifier") for p in (empty / "classifier").rglob("*")) == wanted
    for path in wanted:
        source = repo / "models/classifier" / path
        assert source.is_dir() or (empty / "classifier" / path).read_bytes() == source.read_bytes()
