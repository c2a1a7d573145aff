import json
import shutil
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.classifier import (
    META_FILE,
    ClassifierConfig,
    GPTClassifier,
    classification_loss,
    classification_metrics,
    classify,
    export_merged,
    load_classifier,
    save_classifier,
)
from llm.config import get_preset
from llm.data.classification import collate_classification
from llm.errors import LLMError
from llm.lora import LoRAConfig, LoRALinear
from llm.model import GPT
from llm.model_dir import load_model, save_model
from llm.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "base"
    save_model(GPT(get_preset("cpu-tiny")), directory)
    return directory


def trained_like(base_dir: Path, config: ClassifierConfig) -> GPTClassifier:
    """A classifier whose trainable tensors are all changed, as training would."""
    torch.manual_seed(1)
    model = GPTClassifier(load_model(base_dir), config)
    model.apply_method()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


BATCH = collate_classification([([5, 6, 7], 0), ([8, 9, 10, 11, 12, 13], 1), ([14], 1)])


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def test_head_reads_last_real_token(base_dir: Path) -> None:
    model = trained_like(base_dir, ClassifierConfig())
    logits = model(BATCH.ids, BATCH.lengths)
    assert logits.shape == (3, 2)
    for row, n in enumerate(BATCH.lengths.tolist()):
        alone = model(BATCH.ids[row : row + 1, :n], BATCH.lengths[row : row + 1])
        torch.testing.assert_close(logits[row], alone[0], atol=1e-5, rtol=0)
    other_padding = BATCH.ids.masked_fill(~BATCH.pad_mask, 3)
    torch.testing.assert_close(model(other_padding, BATCH.lengths), logits, atol=1e-5, rtol=0)
    changed_last = BATCH.ids.clone()
    changed_last[0, 2] = 99
    assert not torch.allclose(model(changed_last, BATCH.lengths)[0], logits[0])


@pytest.mark.parametrize("method", ["lora", "last_blocks", "full"])
def test_methods_train_the_right_parameters(base_dir: Path, method: str) -> None:
    model = GPTClassifier(load_model(base_dir), ClassifierConfig(method=method, lora=LoRAConfig(r=2)))
    model.apply_method()
    model.train()
    classification_loss(model, BATCH).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    expected = {
        "lora": lambda n: "lora_" in n or n.startswith("gpt.lm_head."),
        "last_blocks": lambda n: n.startswith(("gpt.blocks.1.", "gpt.ln_f.", "gpt.lm_head.")),
        "full": lambda n: True,
    }[method]
    assert trainable == {name for name, _ in model.named_parameters() if expected(name)}
    assert has_lora(model) == (method == "lora")


@pytest.mark.parametrize("method", ["lora", "last_blocks"])
def test_save_load_roundtrip(base_dir: Path, tmp_path: Path, method: str) -> None:
    model = trained_like(base_dir, ClassifierConfig(method=method, labels=("ham", "spam")))
    out = base_dir.parent / f"classifier-{method}"
    save_classifier(model, out, base_dir)
    assert json.loads((out / META_FILE).read_text())["base"]["path"] == "../base"
    loaded = load_classifier(out)
    assert loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded(BATCH.ids, BATCH.lengths), model(BATCH.ids, BATCH.lengths), atol=0, rtol=0)


def test_merged_export_is_self_contained(base_dir: Path, tmp_path: Path) -> None:
    model = trained_like(base_dir, ClassifierConfig())
    expected = model(BATCH.ids, BATCH.lengths)
    export_merged(model, tmp_path / "merged")
    assert not has_lora(model)
    loaded = load_classifier(tmp_path / "merged")
    assert not has_lora(loaded)
    torch.testing.assert_close(loaded(BATCH.ids, BATCH.lengths), expected, atol=1e-5, rtol=0)


def test_mismatched_or_missing_base_is_a_clear_error(base_dir: Path, tmp_path: Path) -> None:
    model = trained_like(base_dir, ClassifierConfig())
    save_classifier(model, tmp_path / "clf", base_dir)
    torch.manual_seed(5)
    save_model(GPT(get_preset("cpu-tiny", n_layers=3)), tmp_path / "deeper")
    with pytest.raises(
        LLMError, match=r"base model .*deeper does not match the adapter .*n_layers=3 \(adapter expects 2\)"
    ):
        load_classifier(tmp_path / "clf", base=tmp_path / "deeper")
    save_model(GPT(get_preset("cpu-tiny")), tmp_path / "retrained")
    with pytest.raises(LLMError, match=r"other weights than the one the adapter .* was trained on"):
        load_classifier(tmp_path / "clf", base=tmp_path / "retrained")
    shutil.copytree(tmp_path / "clf", tmp_path / "moved" / "clf")  # without its base beside it
    with pytest.raises(LLMError, match=r"base model .* not found"):
        load_classifier(tmp_path / "moved" / "clf")
    (tmp_path / "clf" / META_FILE).write_text("{}")
    with pytest.raises(LLMError, match="not a classifier description"):
        load_classifier(tmp_path / "clf", base=base_dir)


def test_max_length_must_fit_the_context(base_dir: Path) -> None:
    with pytest.raises(LLMError, match="max_length 1000 exceeds the base model's context_length 128"):
        GPTClassifier(load_model(base_dir), ClassifierConfig(max_length=1000))


def test_classify_texts(base_dir: Path) -> None:
    model = trained_like(base_dir, ClassifierConfig())
    texts = ["Free entry! Call now", "see you at lunch", "ok"]
    results = classify(model, texts, get_tokenizer(), batch_size=2)
    tokenizer = get_tokenizer()
    for text, (label, prob) in zip(texts, results, strict=True):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            probs = torch.softmax(model(ids, torch.tensor([ids.shape[1]])), -1)[0]
        assert label == model.config.labels[int(probs.argmax())]
        assert prob == pytest.approx(float(probs.max()), abs=1e-5)
    with pytest.raises(LLMError, match="text 2 of 2 is empty"):
        classify(model, ["hi", ""], get_tokenizer())


def test_metrics_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs1 = np.array([0.1, 0.6, 0.3, 0.9, 0.6, 0.2, 0.8])  # predictions: 0 1 0 1 1 0 1
    m = classification_metrics(labels, np.stack([1 - probs1, probs1], axis=1))
    assert m["confusion"] == [[2, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    pairs = [(p, n) for p, n in product(probs1[labels == 1], probs1[labels == 0])]
    brute_auc = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert m["roc_auc"] == pytest.approx(brute_auc)
    perfect = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert perfect["accuracy"] == perfect["f1"] == perfect["roc_auc"] == 1.0
    assert np.isnan(classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]))["roc_auc"])


def test_multiclass_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4], [0.1, 0.2, 0.7]]
    )  # predictions: 0 1 1 1 0 2
    m = classification_metrics(labels, probs, ["cat", "dog", "eel"])
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]] and m["labels"] == ["cat", "dog", "eel"]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n"] == 6
    per_class = m["per_class"]
    assert per_class["cat"]["precision"] == pytest.approx(1 / 2) and per_class["cat"]["recall"] == pytest.approx(1 / 2)
    assert per_class["dog"]["precision"] == pytest.approx(2 / 3) and per_class["dog"]["recall"] == 1.0
    assert per_class["eel"]["precision"] == 1.0 and per_class["eel"]["recall"] == pytest.approx(1 / 2)
    f1s = [1 / 2, 0.8, 2 / 3]
    assert [per_class[k]["f1"] for k in ("cat", "dog", "eel")] == pytest.approx(f1s)
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 3) == pytest.approx(m["f1"])
    for k, name in enumerate(("cat", "dog", "eel")):  # one-vs-rest AUC, pair by pair
        pairs = list(product(probs[labels == k, k], probs[labels != k, k]))
        brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
        assert per_class[name]["roc_auc"] == pytest.approx(brute) and per_class[name]["n"] == 2
    assert m["roc_auc"] == pytest.approx(np.mean([per_class[k]["roc_auc"] for k in ("cat", "dog", "eel")]))
    binary = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["ham", "spam"])
    assert binary["f1"] == binary["per_class"]["spam"]["f1"] and set(binary["per_class"]) == {"ham", "spam"}
