"""What `llm serve` serves: a model and its kind, read from a model directory or a registered model's URI.

kind: `classifier` (a directory holding classifier.json, as `finetune_classifier` writes, served on
/v1/classifications), `instruct` (config.json written by the `finetune_instructions` stage: chat and
completions) or `base` (any other model directory, a Hugging Face GPT-2 directory or hub name: completions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from llm.classifier import META_FILE, load_classifier
from llm.hf import load_any
from llm.io import read_json
from llm.model_dir import CONFIG_FILE
from llm.quantize import for_inference
from llm.registry import resolve_model

Kind = Literal["base", "instruct", "classifier"]
INSTRUCT_STAGE = "finetune_instructions"  # the stage whose models answer Alpaca prompts
ENDPOINTS: dict[Kind, tuple[str, ...]] = {
    "base": ("completions",),
    "instruct": ("chat.completions", "completions"),
    "classifier": ("classifications",),
}


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id clients pass as `model`
    kind: Kind
    model: nn.Module  # a GPT, or a GPTClassifier for kind "classifier"; in eval mode


def model_kind(directory: Path) -> Kind:
    """The kind of the model in `directory`, from the files the pipeline's stages write there."""
    if (directory / META_FILE).is_file():
        return "classifier"
    if (directory / CONFIG_FILE).is_file():
        training = read_json(directory / CONFIG_FILE).get("training")
        if isinstance(training, dict) and training.get("stage") == INSTRUCT_STAGE:
            return "instruct"
    return "base"


def load_served(
    source: str,
    *,
    name: str | None = None,
    device: torch.device | str = "cpu",
    dtype: str | None = None,
    quantize: str | None = None,
) -> ServedModel:
    """The model at `source` (a model directory, a GPT-2 hub name or a `models:/` URI), named `name` (default: the
    directory's name, or the URI), in the weight format `dtype` / `quantize` (llm.quantize.for_inference)."""
    path = Path(resolve_model(source))
    kind = model_kind(path) if path.is_dir() else "base"
    model = load_classifier(path, device=device) if kind == "classifier" else load_any(str(path), device=device)
    default = source if source.startswith("models:/") else path.name or source
    return ServedModel(name or default, kind, for_inference(model, dtype, quantize))
