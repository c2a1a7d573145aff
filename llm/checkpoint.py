"""Training checkpoints: everything needed to resume a run exactly.

A checkpoint is a directory `step-NNNNNNNN/` holding `model.safetensors` (every tensor of the model, shared
ones once), `best.safetensors` (the best trainable weights, with `restore_best`) and `state.pt` (optimizer,
loss scaler, step, tokens, best metric, metric history and the sha256 of the weight files; plain tensors and
containers, loaded with `torch.load(weights_only=True)`). It is written into a temporary directory that is
renamed into place, so a checkpoint directory is complete or absent (a full disk or an unwritable directory is an
LLMError naming the file or directory); one whose files fail their sha256 is
skipped with a warning, never loaded.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm.errors import LLMError
from llm.io import disk_full_is_an_error, sha256_file, temporary_dir
from llm.model_dir import WEIGHTS_FILE, read_safetensors, write_safetensors

STATE_FILE, BEST_FILE = "state.pt", "best.safetensors"


def save_checkpoint(
    checkpoint_dir: Path, model: nn.Module, state: dict[str, Any], *, best: dict[str, torch.Tensor]
) -> Path:
    """Write `checkpoint_dir/step-NNNNNNNN/` atomically (temp dir + rename); return its path."""
    final = checkpoint_dir / f"step-{state['step']:08d}"
    tmp = temporary_dir(checkpoint_dir, f".{final.name}.")
    try:
        files = {WEIGHTS_FILE: unique_state(model), **({BEST_FILE: best} if best else {})}
        for name, tensors in files.items():
            write_safetensors(tmp / name, tensors)
        state = {**state, "sha256": {name: sha256_file(tmp / name) for name in files}}
        with disk_full_is_an_error(final / STATE_FILE, tmp / STATE_FILE), open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. a resumed run interrupted at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are never listed)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def load_checkpoint(
    checkpoint_dir: Path, model: nn.Module
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """Load the newest intact checkpoint's weights into `model`; (path, state, best weights) or None.

    A checkpoint that cannot be read or fails its sha256 check is skipped with a warning.
    """
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            for name, digest in state["sha256"].items():
                if sha256_file(path / name) != digest:
                    raise LLMError(f"{name} does not match its sha256")
            weights = read_safetensors(path / WEIGHTS_FILE)
            best = read_safetensors(path / BEST_FILE) if BEST_FILE in state["sha256"] else {}
        except Exception as err:  # any damage: unreadable, truncated, missing keys
            print(f"warning: skipping damaged checkpoint {path}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        aliases = set(model.state_dict()) - set(unique_state(model))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if set(missing) - aliases or unexpected:
            raise LLMError(
                f"checkpoint {path} does not fit this model (missing {sorted(set(missing) - aliases)[:3]}, "
                f"unexpected {unexpected[:3]}): delete {checkpoint_dir} to start over"
            )
        return path, state, best
    return None


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tensors that share storage (a tied LM head) kept once, under the first name."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out
