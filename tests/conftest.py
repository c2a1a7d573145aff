"""Shared fixtures: the real data mirror beside the checkout, small configs, deterministic torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llm.paths import find_mirror
from llm.registry import CACHE_ENV
from llm.tracking import PARENT_RUN_ENV

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = find_mirror(Path(__file__).parent)
    if path is None:
        pytest.fail("data mirror not found: expected ../shared/data beside the checkout or $LLM_DATA_MIRROR")
    return path


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with its schema created once (that takes ~6 s); tests copy it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(migrated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store for one test, in MLFLOW_TRACKING_URI; git and DVC experiment context of a real run; an empty
    cache of downloaded models."""
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lr3")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return uri


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models as the training stages write them: models/base, models/classifier (LoRA adapter and head
    on that base, labels ham/spam) and models/instruct, over the full GPT-2 vocabulary (any text encodes)."""
    from llm.classifier import ClassifierConfig, GPTClassifier, save_classifier
    from llm.config import GPTConfig
    from llm.model import GPT
    from llm.model_dir import load_model, save_model

    root = tmp_path_factory.mktemp("stage-models") / "models"
    dirs = {kind: root / kind for kind in ("base", "classifier", "instruct")}
    torch.manual_seed(0)
    for kind in ("base", "instruct"):
        save_model(GPT(GPTConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=1)), dirs[kind])
    classifier = GPTClassifier(load_model(dirs["base"]), ClassifierConfig(max_length=16))
    classifier.apply_method()
    with torch.no_grad():
        for parameter in classifier.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)  # as training would change them
    save_classifier(classifier, dirs["classifier"], dirs["base"])
    return dirs
