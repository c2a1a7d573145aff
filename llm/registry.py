"""Models in the MLflow registry: log a stage's model directory as a pyfunc model and register a version, move the
`champion` alias, and resolve `models:/` URIs to local model directories.

- `log_model` logs the model directory a training stage wrote (safetensors, never a pickle) to the stage's run as
  an MLflow pyfunc model (the code is `llm/pyfunc/model.py`), with a signature and an input example, and registers
  a version of `RegistryParams.name` tagged `git.commit`, `git.dirty`, `dvc.exp_name`, `dvc.stage` and whatever
  tags the caller adds (the stages add `dvc.deps.<path>`: stages.lineage.dvc_deps_tags).
- `update_champion` (evaluate) moves the alias `champion` to an evaluated version that beats the current champion.
- `resolve_model` turns `models:/<name>/<version>` or `models:/<name>@<alias>` into a local model directory (one
  download per version, to `$LLM_MODEL_CACHE`, default `~/.cache/llm/models`); the CLI reads every `--model`
  through it. The store is `llm.mlflow_store.tracking_uri()`.

MLflow is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llm.errors import LLMError
from llm.mlflow_store import tracking_uri

if TYPE_CHECKING:
    from llm.generate import GenerationConfig
    from llm.tracking import Tracker

Kind = Literal["base", "classifier", "instruct"]
DEFAULT_NAMES: dict[str, str] = {"base": "llm-base", "classifier": "llm-classifier", "instruct": "llm-instruct"}
CHAMPION = "champion"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a registered model's name: safe in models:/ URIs
SCHEME = "models:/"
CODE_FILE = Path(__file__).parent / "pyfunc" / "model.py"
CACHE_ENV = "LLM_MODEL_CACHE"
ARTIFACT_PATH = "model"  # the logged model's name within its run
REQUIREMENTS = ("mlflow", "torch", "safetensors", "tiktoken", "numpy", "pandas")  # pinned to the installed versions
EXAMPLES: dict[str, dict[str, list[str]]] = {
    "base": {"text": ["Once upon a time"]},
    "classifier": {"text": ["Free entry! Text WIN to claim your prize", "See you at lunch?"]},
    "instruct": {"instruction": ["Rewrite the sentence in passive voice."], "input": ["The cat chased the mouse."]},
}
# MLflow predicts the example once when logging (a check that the logged model works): a few tokens suffice
EXAMPLE_PARAMS = {"max_new_tokens": 8}


@dataclass(frozen=True)
class RegistryParams:
    """A training stage's `registry` params. log_model: log the model to the stage's MLflow run and register a
    version (false: neither, saving the time and store space docs/models.md gives). name: the registered model;
    None = llm-base, llm-classifier or llm-instruct by the model's kind."""

    log_model: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not NAME.fullmatch(self.name):
            raise LLMError(f"registry.name {self.name!r}: use letters, digits, '.', '_' and '-' (it goes in URIs)")

    def log(self, tracker: Tracker, kind: Kind, model_dir: str | os.PathLike[str], **options: Any) -> str | None:
        """`log_model(tracker, kind, model_dir, self, **options)`, for code that holds the params but does not
        import this module (stages.common, which every stage imports, logs the training stages' models so)."""
        return log_model(tracker, kind, model_dir, self, **options)


def log_model(
    tracker: Tracker,
    kind: Kind,
    model_dir: str | os.PathLike[str],
    registry: RegistryParams,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    tokenizer_file: str | os.PathLike[str] | None = None,
    generation: GenerationConfig | None = None,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Log `model_dir` to `tracker`'s run as a pyfunc model and register it; returns the new version, or None when
    `registry.log_model` is off or the tracker has no MLflow run.

    kind: base or instruct (`model_dir` is a model directory) or classifier (a classifier directory; `base_dir`, its
    base model, is logged with it). tokenizer_file: the GPT-2 ranks file, logged so the model serves offline.
    generation: the default generation settings of base and instruct models (GenerationConfig's by default).
    tags: more tags for the registered version.
    A failing MLflow call is a warning, as for the tracker: the stage's outputs are written already.
    """
    if not registry.log_model or tracker.run_id is None:
        return None
    artifacts = {"model": str(model_dir)}
    if kind == "classifier":
        if base_dir is None:
            raise LLMError("log_model: a classifier needs the base_dir it was trained on")
        artifacts["base"] = str(base_dir)
        _check_base_beside(Path(model_dir), Path(base_dir))
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        artifacts["tokenizer"] = str(tokenizer_file)
    name = registry.name or DEFAULT_NAMES[kind]
    try:
        import mlflow
        import pandas as pd

        mlflow.set_tracking_uri(tracker.uri)
        mlflow.set_experiment(experiment_id=tracker.experiment_id)  # the logged model's: artifacts beside the store
        client = mlflow.MlflowClient(tracker.uri)
        run_tags = client.get_run(tracker.run_id).data.tags
        example = pd.DataFrame(EXAMPLES[kind])
        tags = {
            "git.commit": run_tags.get("mlflow.source.git.commit", ""),
            "git.dirty": run_tags.get("git.dirty", ""),
            "dvc.exp_name": run_tags.get("dvc.exp_name", ""),
            "dvc.stage": tracker.stage,
        } | dict(tags or {})
        info = mlflow.models.Model.log(
            artifact_path=None,
            name=ARTIFACT_PATH,
            flavor=mlflow.pyfunc,
            run_id=tracker.run_id,
            python_model=str(CODE_FILE),
            artifacts=artifacts,
            model_config={"kind": kind},
            signature=signature(kind, generation),
            input_example=example if kind == "classifier" else (example, EXAMPLE_PARAMS),
            pip_requirements=_requirements(),  # given, so MLflow does not load the model to infer them
            registered_model_name=name,
            tags=tags,
        )
    except LLMError:  # `Interrupted` (SIGTERM) among them: the stage stops
        raise
    except Exception as err:
        print(f"warning: model not logged to MLflow ({type(err).__name__}: {str(err)[:300]})", file=sys.stderr)
        return None
    return str(info.registered_model_version)


def signature(kind: Kind, generation: GenerationConfig | None = None) -> Any:
    """The MLflow signature of a `kind` model: DataFrame columns in and out (see llm/pyfunc/model.py) and, for
    base and instruct models, the generation params with `generation`'s values as defaults."""
    import dataclasses

    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from llm.generate import GenerationConfig

    if kind == "classifier":
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "probability")])
        return ModelSignature(Schema([ColSpec("string", "text")]), outputs)
    inputs = [ColSpec("string", "text")]
    if kind == "instruct":
        inputs = [ColSpec("string", "instruction"), ColSpec("string", "input", required=False)]
    defaults = dataclasses.asdict(generation or GenerationConfig(temperature=0.0 if kind == "instruct" else 1.0))
    types = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double", "seed": "long"}
    params = ParamSchema([ParamSpec(key, dtype, defaults[key]) for key, dtype in types.items()])
    output = "response" if kind == "instruct" else "continuation"
    return ModelSignature(Schema(inputs), Schema([ColSpec("string", output)]), params)


def update_champion(tracker: Tracker, name: str, stage: str, metric: str, score: float) -> dict[str, float] | None:
    """Record `score` (higher is better) as tag `score.<metric>` of the version of `name` that `stage`'s run
    (runs/<stage>.json) registered, and move the alias `champion` to it when it beats the champion's recorded
    score, or when there is no champion yet; a tie, a lower score or a champion without a recorded score (an
    alias set by hand) leaves the alias alone.

    Returns the comparison for the scoreboard (numbers only): this version and its score, and the champion after
    the call (champion_version, and champion_score when it has one recorded), so a rerun of evaluate on the same
    inputs writes the same scoreboard. None when the tracker has no MLflow run, `stage` registered no version of
    `name`, or MLflow fails (a warning).
    """
    if tracker.run_id is None:
        return None
    try:
        run_id = json.loads((tracker.root / "runs" / f"{stage}.json").read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracker.uri, registry_uri=tracker.uri)
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if not found:
            return None
        version = max(found, key=lambda v: int(v.version))
        client.set_model_version_tag(name, version.version, f"score.{metric}", str(score))
        comparison: dict[str, float] = {"version": int(version.version), "score": score}
        champion = _champion(client, name)
        if champion is not None:
            comparison["champion_version"] = int(champion.version)
            if (recorded := champion.tags.get(f"score.{metric}")) is not None:
                comparison["champion_score"] = float(recorded)
        beats = champion is None or ("champion_score" in comparison and score > comparison["champion_score"])
        promoted = beats and (champion is None or champion.version != version.version)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            comparison |= {"champion_version": int(version.version), "champion_score": score}
    except LLMError:  # `Interrupted` (SIGTERM) among them: the stage stops
        raise
    except Exception as err:
        print(f"warning: champion of {name} not updated ({type(err).__name__}: {str(err)[:300]})", file=sys.stderr)
        return None
    return comparison


def resolve_model(ref: str) -> str:
    """`ref` itself, unless it is a `models:/<name>/<version>` or `models:/<name>@<alias>` URI: then the local
    model directory of that version, downloaded once per version to the cache (`$LLM_MODEL_CACHE`, default
    `~/.cache/llm/models`, one `<name>-<version>-<digest of its artifact location>` directory per version). A
    classifier's base model lies beside it, where its classifier.json points."""
    if not ref.startswith(SCHEME):
        return ref
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    client = MlflowClient(uri, registry_uri=uri)
    name, at, alias = ref.removeprefix(SCHEME).partition("@")
    if not at:
        name, _, alias = name.rpartition("/")
    try:
        version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, alias)
        source = client.get_model_version_download_uri(name, version.version)
        cached = _cache_dir() / f"{name}-{version.version}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
        if not (cached / "MLmodel").is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.TemporaryDirectory(dir=cached.parent, prefix=".download-")
            with tmp, contextlib.suppress(OSError):  # the rename fails if another process cached it meanwhile
                os.rename(download_artifacts(artifact_uri=source, dst_path=tmp.name, tracking_uri=uri), cached)
    except MlflowException as err:
        raise LLMError(f"cannot resolve {ref} in the MLflow store {uri}: {err.message.splitlines()[0]}") from err
    return str(cached / _artifact_path(cached, "model"))


def _artifact_path(model: Path, artifact: str) -> str:
    """Where the pyfunc model in `model` keeps artifact `artifact` (relative path, read from its MLmodel file)."""
    import yaml

    flavors = yaml.safe_load((model / "MLmodel").read_text(encoding="utf-8"))["flavors"]
    return flavors["python_function"]["artifacts"][artifact]["path"]


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _check_base_beside(model_dir: Path, base_dir: Path) -> None:
    """A logged classifier finds its base as `artifacts/<base name>` beside `artifacts/<classifier name>`: its
    classifier.json must point there (as it does when both are siblings, e.g. models/classifier, models/base)."""
    from llm.classifier import META_FILE

    recorded = json.loads((model_dir / META_FILE).read_text(encoding="utf-8")).get("base", {}).get("path")
    if recorded != f"../{base_dir.name}" or model_dir.name == base_dir.name:
        raise LLMError(
            f"{model_dir} records its base at {recorded!r}: log_model needs it beside the classifier "
            f"(../{base_dir.name}, under another name), as save_classifier writes it for sibling directories"
        )


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm" / "models"
    return Path(os.environ.get(CACHE_ENV) or default).expanduser()


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in REQUIREMENTS]
