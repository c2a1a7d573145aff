"""llm.registry: the stages' models logged to MLflow as pyfunc models (code, safetensors, no pickles), registered
and tagged, loaded by name, the champion alias, `models:/` URIs in the CLI, and the dvc.deps tags of a model
logged inside `dvc exp run --temp`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llm import cli
from llm.classifier import classify, load_classifier
from llm.data.instructions import Instruction, respond
from llm.generate import GenerationConfig, generate
from llm.model_dir import load_model
from llm.registry import RegistryParams, log_model, resolve_model, update_champion
from llm.tokenizer import EOT_ID, get_tokenizer
from llm.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["WINNER!! Claim your free prize now", "Are we still on for lunch?", "ok"]


def logged(kind: str, model_dirs: dict[str, Path], root: Path, registry: RegistryParams | None = None, **kw) -> str:
    """Run a stage's tracker in `root` that logs the `kind` model; the registered version."""
    stage = {"base": "pretrain", "classifier": "finetune_classifier", "instruct": "finetune_instructions"}[kind]
    base = model_dirs["base"] if kind == "classifier" else None
    with Tracker(stage, root=root) as tracker:
        version = log_model(tracker, kind, model_dirs[kind], registry or RegistryParams(), base_dir=base, **kw)
    assert version is not None
    return version


def test_classifier_is_logged_registered_tagged_and_predicts_by_name(
    store: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import mlflow

    assert logged("classifier", model_dirs, tmp_path) == "1"
    client = mlflow.MlflowClient(store)
    version = client.get_model_version("llm-classifier", "1")
    run_id = json.loads((tmp_path / "runs" / "finetune_classifier.json").read_text())["run_id"]
    assert version.run_id == run_id
    assert version.tags["dvc.exp_name"] == "exp-lr3" and version.tags["dvc.stage"] == "finetune_classifier"
    assert {"git.commit", "git.dirty"} <= version.tags.keys()
    location = client.get_model_version_download_uri("llm-classifier", "1")  # in the run's experiment, beside the store
    assert location.startswith(f"{(tmp_path / 'mlartifacts').resolve().as_uri()}/models/m-")
    assert not any(key.startswith("dvc.deps.") for key in version.tags)  # no dvc.yaml in tmp_path

    model = mlflow.pyfunc.load_model("models:/llm-classifier/1")
    out = model.predict(pd.DataFrame({"text": TEXTS}))
    expected = classify(load_classifier(model_dirs["classifier"]), TEXTS, get_tokenizer())
    assert list(out["label"]) == [label for label, _ in expected]
    assert list(out["probability"]) == pytest.approx([p for _, p in expected], abs=1e-6)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text"]
    assert [c.name for c in model.metadata.get_output_schema().inputs] == ["label", "probability"]

    files = Path(mlflow.artifacts.download_artifacts("models:/llm-classifier/1", dst_path=str(tmp_path / "dl")))
    names = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    assert {"model.py", "artifacts/classifier/adapter.safetensors", "artifacts/base/model.safetensors"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))], names
    flavor = yaml.safe_load((files / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("model.py") and "python_model" not in flavor


def test_instruct_and_base_models_generate_with_params(store: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import mlflow

    defaults = GenerationConfig(max_new_tokens=5, temperature=0.0)
    assert logged("instruct", model_dirs, tmp_path, generation=defaults) == "1"
    assert logged("base", model_dirs, tmp_path, registry=RegistryParams(name="my-base")) == "1"
    tokenizer = get_tokenizer()

    instruct = mlflow.pyfunc.load_model("models:/llm-instruct/1")
    entries = [Instruction("Name a colour.", "", ""), Instruction("Add the numbers.", "2 and 3", "")]
    frame = pd.DataFrame({"instruction": [e.instruction for e in entries], "input": [e.input for e in entries]})
    net = load_model(model_dirs["instruct"])
    assert list(instruct.predict(frame)["response"]) == respond(net, entries, tokenizer, defaults, progress=False)
    shorter = respond(net, entries, tokenizer, GenerationConfig(max_new_tokens=2, temperature=0.0), progress=False)
    assert list(instruct.predict(frame, params={"max_new_tokens": 2})["response"]) == shorter
    without_input = instruct.predict(pd.DataFrame({"instruction": ["Name a colour."]}))  # `input` is optional
    assert list(without_input["response"]) == respond(net, entries[:1], tokenizer, defaults, progress=False)
    params = {p.name: p.default for p in instruct.metadata.get_params_schema().params}
    assert params == {"max_new_tokens": 5, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None}

    base = mlflow.pyfunc.load_model("models:/my-base/1")
    out = base.predict(pd.DataFrame({"text": ["Once upon", ""]}), params={"max_new_tokens": 4, "temperature": 0.0})
    prompts = [tokenizer.encode("Once upon"), [EOT_ID]]
    greedy = generate(load_model(model_dirs["base"]), prompts, max_new_tokens=4, temperature=0.0, eos_id=EOT_ID)
    assert list(out["continuation"]) == [tokenizer.decode(ids) for ids in greedy]


def test_switch_off_or_no_mlflow_logs_nothing(store: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import mlflow

    with Tracker("pretrain", root=tmp_path) as tracker:
        assert log_model(tracker, "base", model_dirs["base"], RegistryParams(log_model=False)) is None
    experiment = str(tracker.experiment_id)
    with Tracker("pretrain", root=tmp_path, mlflow=False) as tracker:
        assert log_model(tracker, "base", model_dirs["base"], RegistryParams()) is None
    client = mlflow.MlflowClient(store)
    assert client.search_registered_models() == []
    assert list(client.search_logged_models(experiment_ids=[experiment])) == []


def test_champion_moves_only_to_a_version_that_beats_it(
    store: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import mlflow

    client = mlflow.MlflowClient(store)

    def evaluate(score: float) -> dict[str, float] | None:
        with Tracker("evaluate", root=tmp_path) as tracker:
            return update_champion(tracker, "llm-classifier", "finetune_classifier", "test_accuracy", score)

    with Tracker("evaluate", root=tmp_path) as tracker:  # no classifier run yet
        assert update_champion(tracker, "llm-classifier", "finetune_classifier", "test_accuracy", 0.9) is None
    logged("classifier", model_dirs, tmp_path)
    assert evaluate(0.9) == {"version": 1, "score": 0.9, "champion_version": 1, "champion_score": 0.9}
    logged("classifier", model_dirs, tmp_path)
    assert evaluate(0.8) == {"version": 2, "score": 0.8, "champion_version": 1, "champion_score": 0.9}
    logged("classifier", model_dirs, tmp_path)
    assert evaluate(0.9)["champion_version"] == 1  # a tie does not take the alias
    assert str(client.get_model_version_by_alias("llm-classifier", "champion").version) == "1"
    promoted = {"version": 3, "score": 0.95, "champion_version": 3, "champion_score": 0.95}
    assert evaluate(0.95) == promoted
    assert evaluate(0.95) == promoted  # re-evaluating the champion keeps it, and the same scoreboard
    champion = client.get_model_version_by_alias("llm-classifier", "champion")
    assert str(champion.version) == "3" and champion.tags["score.test_accuracy"] == "0.95"
    assert client.get_model_version("llm-classifier", "2").tags["score.test_accuracy"] == "0.8"
    out = mlflow.pyfunc.load_model("models:/llm-classifier@champion").predict(pd.DataFrame({"text": TEXTS}))
    assert len(out) == len(TEXTS)


def test_cli_takes_models_uris(
    store: str, model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    logged("classifier", model_dirs, tmp_path)
    logged("base", model_dirs, tmp_path)
    mlflow.MlflowClient(store).set_registered_model_alias("llm-classifier", "champion", "1")

    def output(*args: str) -> str:
        assert cli.main(list(args)) == 0
        return capsys.readouterr().out

    labels = output("classify", "--model", str(model_dirs["classifier"]), *TEXTS)
    assert output("classify", "--model", "models:/llm-classifier@champion", *TEXTS) == labels
    assert output("classify", "--model", "models:/llm-classifier/1", "--base", "models:/llm-base/1", *TEXTS) == labels
    greedy = ("--prompt", "Once upon", "--temperature", "0", "--max-new-tokens", "4")
    assert output("generate", "--model", "models:/llm-base/1", *greedy) == output(
        "generate", "--model", str(model_dirs["base"]), *greedy
    )
    cached = resolve_model("models:/llm-classifier/1")
    assert resolve_model("models:/llm-classifier@champion") == cached  # one download per version
    assert Path(cached).parent.parent.parent == tmp_path / "cache" and len(list((tmp_path / "cache").iterdir())) == 2

    assert cli.main(["classify", "--model", "models:/llm-classifier/7", "hi"]) == 1
    assert "error: cannot resolve models:/llm-classifier/7" in capsys.readouterr().err


def test_model_logged_in_a_temp_experiment_survives_and_carries_the_lock_md5s(
    migrated_store: Path, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_dirs["base"].parent, repo / "models")
    (repo / "stage.py").write_text(
        "from llm.registry import RegistryParams, log_model\n"
        "from llm.tracking import Tracker\n"
        "from stages.lineage import dvc_deps_tags\n"
        "tags = dvc_deps_tags('finetune_classifier')\n"
        "with Tracker('finetune_classifier') as tracker:\n"
        "    log_model(tracker, 'classifier', 'models/classifier', RegistryParams(), base_dir='models/base',\n"
        "              tags=tags)\n"
    )
    deps = ["models/base", "models/classifier", "stage.py"]
    stage = {"cmd": f"{sys.executable} stage.py", "deps": deps, "outs": [{"runs": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"finetune_classifier": stage}}))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    shutil.copy(migrated_store, repo / "mlflow.db")  # the default store: <repo>/mlflow.db, absolute
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "LLM_MLFLOW"))}
    env |= {"PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site")}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@example.com", "LLM_MODEL_CACHE": str(tmp_path / "cache")}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", ".")
    run("git", "commit", "-q", "-m", "toy pipeline")
    run(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "exp-temp")
    ref = run("git", "for-each-ref", "--format=%(refname)", "refs/exps").split()[0]
    lock = yaml.safe_load(run("git", "show", f"{ref}:dvc.lock"))["stages"]["finetune_classifier"]

    import mlflow

    uri = f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    version = mlflow.MlflowClient(uri).get_model_version("llm-classifier", "1")
    assert {k: v for k, v in version.tags.items() if k.startswith("dvc.deps.")} == {
        f"dvc.deps.{dep['path']}": dep["md5"] for dep in lock["deps"]
    }
    assert version.tags["dvc.exp_name"] == "exp-temp"
    assert version.tags["git.commit"] == run("git", "rev-parse", "HEAD").strip()
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("tmp*"))  # the temporary copy is gone, the model is not
    location = mlflow.MlflowClient(uri).get_model_version_download_uri("llm-classifier", "1")
    assert location.startswith((repo / "mlartifacts").resolve().as_uri() + "/")
    assert (repo / "mlartifacts").is_dir() and not (repo / "mlruns").exists()
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.pyfunc.load_model("models:/llm-classifier/1").predict(pd.DataFrame({"text": TEXTS}))) == 3
