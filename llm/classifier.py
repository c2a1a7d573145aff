"""Sequence classification with a GPT body: the head maps the final hidden state of each sequence's **last real
token** (never a pad position) to class logits.

A classifier directory holds `classifier.json` (labels, method, LoRA settings, the base model's config, path
and weights digest) and either `adapter.safetensors` (only the trained tensors: LoRA adapters and head, or the
unfrozen blocks; the base model is read from its own directory) or, for a merged export, `model.safetensors`
with every weight (self-contained).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from llm.config import GPTConfig, from_mapping
from llm.data.classification import collate_classification, encode_text
from llm.errors import LLMError
from llm.io import PathLike, read_json, sha256_file, write_json
from llm.lora import LoRAConfig, apply_lora, load_trainable, remove_lora, save_trainable
from llm.model import GPT
from llm.model_dir import WEIGHTS_FILE, load_model, read_safetensors, write_safetensors

META_FILE = "classifier.json"
ADAPTER_FILE = "adapter.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """What is trained and how inputs are cut.

    labels: the class names in class-index order; None (in params) takes them from the data, sorted.
    method: `lora` (adapters + head), `last_blocks` (the last `last_blocks` blocks, final LayerNorm and head,
    the book's chapter 6 recipe) or `full` (every weight). max_length: tokens kept from the start of a text.
    append_eot: end every text with <|endoftext|>, so the head always reads the same token (see encode_text).
    """

    labels: tuple[str, ...] | None = ("ham", "spam")
    method: Literal["lora", "last_blocks", "full"] = "lora"
    max_length: int = 128
    append_eot: bool = False
    last_blocks: int = 1
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise LLMError(f"classifier labels must be at least two distinct names, got {list(self.labels)}")
        if self.max_length <= 0 or self.last_blocks <= 0:
            raise LLMError("classifier max_length and last_blocks must be positive integers")


class GPTClassifier(nn.Module):
    """A GPT whose `lm_head` is replaced by a `len(labels)`-way linear head read at the last real token."""

    def __init__(self, gpt: GPT, config: ClassifierConfig) -> None:
        super().__init__()
        if config.labels is None:
            raise LLMError("a classifier needs its label names (ClassifierConfig.labels)")
        if config.max_length > gpt.config.context_length:
            raise LLMError(
                f"classifier max_length {config.max_length} exceeds the base model's context_length "
                f"{gpt.config.context_length}"
            )
        self.config = config
        self.gpt = gpt
        gpt.lm_head = nn.Linear(gpt.config.emb_dim, len(config.labels), device=gpt.tok_emb.weight.device)

    @property
    def head(self) -> nn.Module:
        return self.gpt.lm_head

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for right-padded ids (B, T) with `lengths` (B,) real tokens per row.

        Attention is causal, so real tokens never see the padding that follows them and no mask is needed.
        """
        hidden = self.gpt.hidden_states(ids)
        return self.head(hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1])

    def apply_method(self) -> list[str]:
        """Freeze and wrap per `config.method`; the head is always trainable. Returns the LoRA-wrapped layers."""
        config, wrapped = self.config, []
        if config.method == "full":
            self.requires_grad_(True)
        elif config.method == "lora":
            wrapped = apply_lora(self.gpt, config.lora.targets, config.lora.r, config.lora.alpha, config.lora.dropout)
        else:
            if config.last_blocks > len(self.gpt.blocks):
                raise LLMError(f"last_blocks {config.last_blocks} exceeds the model's {len(self.gpt.blocks)} blocks")
            self.requires_grad_(False)
            self.gpt.blocks[-config.last_blocks :].requires_grad_(True)
            self.gpt.ln_f.requires_grad_(True)
        self.head.requires_grad_(True)
        return wrapped


def classification_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a (ids, lengths, labels) batch; the training engine's `loss_fn` for classifiers."""
    ids, lengths, labels = batch
    return F.cross_entropy(model(ids, lengths).float(), labels)


def save_classifier(model: GPTClassifier, directory: PathLike, base_dir: PathLike) -> None:
    """Write the trained tensors and `classifier.json` to `directory`; `base_dir` is the model it was built on.

    The base path is stored relative to `directory`, so the two directories can move together.
    """
    directory, base_dir = Path(directory), Path(base_dir)
    save_trainable(model, directory / ADAPTER_FILE)
    base = {
        "path": os.path.relpath(base_dir, directory),
        "weights_sha256": sha256_file(base_dir / WEIGHTS_FILE),
    }
    _write_meta(directory, model, merged=False, base=base)


def export_merged(model: GPTClassifier, directory: PathLike) -> None:
    """Write a self-contained classifier (LoRA folded into the weights, no base model needed) to `directory`.

    The model is modified in place: its LoRA layers are merged and removed.
    """
    directory = Path(directory)
    remove_lora(model)
    write_safetensors(directory / WEIGHTS_FILE, model.state_dict())
    _write_meta(directory, model, merged=True, base={})


def _write_meta(directory: Path, model: GPTClassifier, *, merged: bool, base: dict[str, Any]) -> None:
    config = dataclasses.asdict(model.config)
    write_json(
        directory / META_FILE,
        {"classifier": config, "merged": merged, "base": {"model": model.gpt.config.to_dict(), **base}},
    )


def load_classifier(
    directory: PathLike, *, base: PathLike | None = None, device: torch.device | str | None = None
) -> GPTClassifier:
    """The classifier saved in `directory`, in eval mode on `device` (default CPU).

    An adapter directory also needs its base model: `base`, or else the path recorded at save time. The base's
    config and weights must be the ones the adapter was trained on.
    """
    directory = Path(directory)
    meta = read_json(directory / META_FILE)
    where = f"{directory / META_FILE}"
    try:
        config = from_mapping(ClassifierConfig, meta["classifier"], where=f"{where}: classifier")
        base_config = from_mapping(GPTConfig, meta["base"]["model"], where=f"{where}: base.model")
        merged = bool(meta["merged"])
    except (KeyError, TypeError) as err:
        raise LLMError(f"{where} is not a classifier description (missing {err})") from err
    if merged:
        with torch.device("meta"):
            model = GPTClassifier(GPT(base_config), config)
        state = read_safetensors(directory / WEIGHTS_FILE)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise LLMError(f"{directory / WEIGHTS_FILE} does not match {where}: {str(err).splitlines()[0]}") from err
    else:
        base_dir = Path(base) if base is not None else directory / meta["base"]["path"]
        if not (base_dir / WEIGHTS_FILE).is_file():
            raise LLMError(f"base model {base_dir} of the classifier in {directory} not found (pass its directory)")
        gpt = load_model(base_dir)
        if gpt.config != base_config:
            diffs = [
                f"{k}={v} (adapter expects {base_config.to_dict()[k]})"
                for k, v in gpt.config.to_dict().items()
                if v != base_config.to_dict()[k]
            ]
            raise LLMError(f"base model {base_dir} does not match the adapter in {directory}: {', '.join(diffs)}")
        digest = sha256_file(base_dir / WEIGHTS_FILE)
        if digest != meta["base"].get("weights_sha256"):
            raise LLMError(
                f"base model {base_dir} has other weights than the one the adapter in {directory} was trained on "
                f"(sha256 {digest[:12]}…, expected {str(meta['base'].get('weights_sha256'))[:12]}…): "
                "retrain the classifier or pass the original base"
            )
        model = GPTClassifier(gpt, config)
        model.apply_method()
        load_trainable(model, directory / ADAPTER_FILE)
    return model.requires_grad_(False).eval().to(device or "cpu")


@torch.no_grad()
def predict_proba(model: GPTClassifier, batches: Iterable[Sequence[torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probabilities (N, num_classes)) over (ids, lengths, labels) batches, in order.

    The model is put in eval mode; batches are moved to its device.
    """
    model.eval()
    device = next(model.parameters()).device
    labels, probs = [], []
    for ids, lengths, batch_labels in batches:
        logits = model(ids.to(device), lengths.to(device))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        labels.append(batch_labels)
    return torch.cat(labels).numpy(), torch.cat(probs).numpy()


def classification_evaluator(batches: Sequence[Sequence[torch.Tensor]]) -> Callable[[nn.Module], dict[str, float]]:
    """The training engine's `evaluate` for a classifier, over fixed (ids, lengths, labels) `batches`.

    It returns val_loss (mean negative log-probability of the actual class, in nats; probabilities floored at
    1e-12) and val_accuracy (the fraction of argmax predictions that are right, in [0, 1]).
    """

    def evaluate(model: nn.Module) -> dict[str, float]:
        labels, probs = predict_proba(model, batches)
        actual = probs[np.arange(len(labels)), labels]
        return {
            "val_loss": float(-np.log(np.maximum(actual, 1e-12)).mean()),
            "val_accuracy": float((probs.argmax(1) == labels).mean()),
        }

    return evaluate


def classify(
    model: GPTClassifier, texts: Sequence[str], tokenizer: tiktoken.Encoding, batch_size: int = 32
) -> list[tuple[str, float]]:
    """(label, probability of that label) for each text."""
    items = [(encode_text(tokenizer, t, model.config.max_length, model.config.append_eot), 0) for t in texts]
    empty = [i for i, (ids, _) in enumerate(items) if not ids]
    if empty:
        raise LLMError(f"text {empty[0] + 1} of {len(texts)} is empty: nothing to classify")
    _, probs = predict_proba(model, DataLoader(items, batch_size=batch_size, collate_fn=collate_classification))
    return [(model.config.labels[int(p.argmax())], float(p.max())) for p in probs]


def classification_metrics(labels: np.ndarray, probs: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, ROC-AUC, the confusion matrix and per-class scores of N predictions.

    labels: (N,) class indices; probs: (N, K) probabilities. With two classes,
    precision/recall/F1/ROC-AUC are those of class 1 (the positive class, e.g. spam); with more, their macro
    averages (ROC-AUC one-vs-rest, over the classes that occur and are absent somewhere). names: the K label
    names (default "0", "1", ...). Also: `n`, `macro_f1`
    (the mean F1 over all K classes), `confusion` (K, K counts, rows actual, columns predicted, in `labels` order),
    `labels` (the names) and `per_class` ({name: precision, recall, f1, roc_auc (null if undefined), n}).
    """
    n_classes = probs.shape[1]
    names = [str(k) for k in range(n_classes)] if names is None else names
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_pos = np.diag(confusion).astype(float)
    precision = np.divide(true_pos, confusion.sum(0), out=np.zeros(n_classes), where=confusion.sum(0) > 0)
    recall = np.divide(true_pos, confusion.sum(1), out=np.zeros(n_classes), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes), where=precision + recall > 0)
    auc = np.array([_roc_auc(labels == k, probs[:, k]) for k in range(n_classes)])
    pick = slice(1, 2) if n_classes == 2 else slice(None)
    defined_auc = auc[pick][~np.isnan(auc[pick])]
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "n": int(n)}
        | ({"roc_auc": float(a)} if not np.isnan(a) else {})
        for name, p, r, f, a, n in zip(names, precision, recall, f1, auc, confusion.sum(1), strict=True)
    }
    return {
        "accuracy": float(true_pos.sum() / max(len(labels), 1)),
        "precision": float(precision[pick].mean()),
        "recall": float(recall[pick].mean()),
        "f1": float(f1[pick].mean()),
        "roc_auc": float(defined_auc.mean()) if defined_auc.size else float("nan"),
        "confusion": confusion.tolist(),
        "n": len(labels),
        "macro_f1": float(f1.mean()),
        "labels": list(names),
        "per_class": per_class,
    }


def _roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties count half)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties sharing their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
