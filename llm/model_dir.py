"""Model directories: `config.json` ({"model": GPTConfig fields, ...extra}) + `model.safetensors`.

Weights are only ever read with safetensors (never unpickled); every write is atomic. A tied LM head is
stored once, under `tok_emb.weight`. The helpers below (`read_safetensors`, `write_safetensors`,
`model_from_state`) are shared with the Hugging Face converter in `llm.hf` and the training checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llm.config import GPTConfig, from_mapping
from llm.errors import LLMError
from llm.io import PathLike, atomic_path, read_json, write_json
from llm.model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def provenance(stage: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The `training` entry of a trained model's config.json: the stage and its `summary` (steps, epochs, best
    loss, ...) without wall times, throughput or run ids, so the same weights always come with the same bytes
    (a rerun that reproduces them leaves DVC's downstream stages up to date). Timings live in the metrics."""
    volatile = ("seconds", "per_s", "run_id")
    return {"training": {"stage": stage, **{k: v for k, v in summary.items() if not any(w in k for w in volatile)}}}


def save_model(model: GPT, directory: PathLike, *, extra: Mapping[str, Any] | None = None) -> None:
    """Write `model` to `directory` (created if needed): weights first, then config.json.

    extra: more JSON-serialisable top-level config entries (e.g. training metadata); "model" is reserved.
    """
    if extra and "model" in extra:
        raise LLMError("save_model: the 'model' key of config.json is reserved for the GPTConfig")
    state = model.state_dict()
    if model.lm_head.weight is model.tok_emb.weight:
        del state["lm_head.weight"]
    directory = Path(directory)
    write_safetensors(directory / WEIGHTS_FILE, state)
    try:
        write_json(directory / CONFIG_FILE, {"model": model.config.to_dict(), **(extra or {})})
    except OSError as err:
        raise LLMError(f"cannot write {directory / CONFIG_FILE}: {err.strerror or err}") from err


def read_config(directory: PathLike) -> dict[str, Any]:
    """The whole config.json of a model directory; its "model" entry holds the GPTConfig fields."""
    data = read_json(_model_dir(directory) / CONFIG_FILE)
    if not isinstance(data.get("model"), dict):
        raise LLMError(f"{Path(directory) / CONFIG_FILE} has no 'model' section: not an llm model directory")
    return data


def load_model(directory: PathLike, *, device: torch.device | str | None = None) -> GPT:
    """The GPT saved in `directory`, in eval mode, on `device` (default CPU), in the dtype it was saved in."""
    directory = _model_dir(directory)
    config = from_mapping(GPTConfig, read_config(directory)["model"], where=f"{directory / CONFIG_FILE}: model")
    path = directory / WEIGHTS_FILE
    return model_from_state(config, read_safetensors(path, device), source=str(path))


def model_from_state(config: GPTConfig, state: Mapping[str, torch.Tensor], *, source: str) -> GPT:
    """A GPT of shape `config` holding exactly the tensors in `state` (no random init, no copies).

    A tied head may be omitted from `state`. Missing, unexpected or mis-shaped tensors raise an LLMError
    naming `source` (the file they came from).
    """
    with torch.device("meta"):
        model = GPT(config)
    expected = dict(model.state_dict())
    if config.tie_weights:
        del expected["lm_head.weight"]
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise LLMError(
            f"{source} does not match its config ({config.n_layers} layers): "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise LLMError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the config expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def read_safetensors(path: Path, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on `device` (default CPU); a damaged file is an LLMError."""
    if not path.is_file():
        raise LLMError(f"{path} not found")
    try:
        return load_file(path, device=str(device or "cpu"))
    except (SafetensorError, OSError) as err:
        raise LLMError(f"{path} is not a valid safetensors file, it may be truncated or corrupt ({err})") from err


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Atomically write `tensors` (moved to CPU, made contiguous) with the {"format": "pt"} metadata; a full disk or
    an unwritable directory is an LLMError naming `path`."""
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        with atomic_path(path, needed=needed) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    except OSError as err:
        raise LLMError(f"cannot write {path}: {err.strerror or err}") from err


def _model_dir(directory: PathLike) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise LLMError(f"model directory {path} not found")
    return path


def _few(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
