"""The training engine: learning, accumulation, precision, early stopping, divergence, compile fallback and the
DVC-side tracking of a run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from llm.checkpoint import list_checkpoints, load_checkpoint
from llm.config import get_preset
from llm.errors import LLMError
from llm.model import GPT
from llm.tracking import Tracker
from llm.train_config import TrainConfig
from llm.training import loss_evaluator, train

V, T = 67, 16


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset("cpu-tiny", vocab_size=V, context_length=T, dropout=dropout))


def batch(i: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch i of a synthetic stream: random tokens seeded by i."""
    tokens = torch.randint(0, V, (rows, T + 1), generator=torch.Generator().manual_seed(i))
    return tokens[:, :-1], tokens[:, 1:]


def config(**changes: object) -> TrainConfig:
    base = {"max_steps": 8, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 0}
    return TrainConfig(**{"checkpoint_every": 0, "precision": "fp32", **base, **changes})  # type: ignore[arg-type]


def losses(result) -> list[float]:  # type: ignore[no-untyped-def]
    return [entry["loss"] for entry in result.state.history if "loss" in entry]


def test_overfits_one_fixed_batch() -> None:
    fixed = batch(0)
    result = train(
        tiny_model(),
        lambda i: fixed,
        config(max_steps=60, lr=1e-2, min_lr=1e-3, weight_decay=0.0),
        evaluate=loss_evaluator([fixed]),
    )
    assert result.metrics["val_loss"] < 0.1 < losses(result)[0]
    assert result.metrics["val_ppl"] == pytest.approx(math.exp(result.metrics["val_loss"]))


def test_grad_accumulation_equals_one_big_batch() -> None:
    def halves(i: int) -> tuple[torch.Tensor, ...]:  # micro-batch i = half of big batch i // 2
        x, y = batch(i // 2, rows=8)
        rows = slice(0, 4) if i % 2 == 0 else slice(4, 8)
        return x[rows], y[rows]

    big = train(tiny_model(), lambda i: batch(i, rows=8), config(batch_size=8))
    accumulated = train(tiny_model(), halves, config(batch_size=4, grad_accum=2))
    assert losses(accumulated) == pytest.approx(losses(big), abs=1e-5)
    assert accumulated.state.tokens == big.state.tokens == 8 * 8 * T


def test_clipping_bounds_the_update_and_logs_the_norm() -> None:
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    model(x, y).backward()
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    model.zero_grad()
    result = train(model, lambda i: (x, y), config(max_steps=1, warmup_steps=0, lr=1.0, min_lr=0.0, grad_clip=1e-3))
    assert result.state.history[0]["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    assert expected_norm > 1e-3
    # AdamW's first step moves each weight by about lr regardless of clipping; the decay term is tiny here
    moved = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True))
    assert moved == pytest.approx(1.0, rel=0.01)


def test_bf16_autocast_on_cpu_tracks_fp32() -> None:
    fp32 = train(tiny_model(), batch, config())
    bf16 = train(tiny_model(), batch, config(precision="bf16"))
    assert losses(bf16) == pytest.approx(losses(fp32), rel=0.02)
    assert losses(bf16) != losses(fp32)  # autocast really ran


def test_fp16_needs_a_gpu() -> None:
    with pytest.raises(LLMError, match="fp16 needs a CUDA GPU"):
        train(tiny_model(), batch, config(precision="fp16", device="cpu"))


def test_bad_settings_are_named() -> None:
    with pytest.raises(LLMError, match="min_lr <= lr"):
        config(lr=1e-4, min_lr=1e-3)
    with pytest.raises(LLMError, match="batch_size"):
        config(batch_size=0)
    with pytest.raises(LLMError, match="best_metric 'val_acc'"):
        train(tiny_model(), batch, config(max_steps=1, best_metric="val_acc"), evaluate=loss_evaluator([batch(0)]))


def test_early_stopping_restores_the_best_weights() -> None:
    curve = iter([3.0, 2.0, 1.0, 1.5, 2.5, 4.0, 5.0])
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_loss": next(curve)}

    model = tiny_model()
    result = train(model, batch, config(max_steps=20, eval_every=1, patience=2, restore_best=True), evaluate=evaluate)
    assert result.stopped_early and result.state.step == 5
    assert result.best["step"] == result.state.best_step == 3 and result.best["val_loss"] == 1.0
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, snapshots[2][name], rtol=0, atol=0)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    def poisoned(model: torch.nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = model(*b)
        return loss * math.nan if int(b[0][0, 0]) == poison else loss

    poison = int(batch(4)[0][0, 0])  # the first token of micro-batch 4 marks the bad step (step 5)
    assert all(int(batch(i)[0][0, 0]) != poison for i in range(4))
    model = tiny_model()
    with pytest.raises(LLMError, match=r"loss is nan at step 5 .*step-00000004"):
        train(model, batch, config(checkpoint_every=2), loss_fn=poisoned, checkpoint_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    fresh = tiny_model(seed=1)
    _, state, _ = load_checkpoint(tmp_path, fresh)
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in fresh.parameters())
    healthy = train(tiny_model(), batch, config())
    saved = [entry["loss"] for entry in state["train"]["history"]]
    assert saved == pytest.approx(losses(healthy)[:4], abs=1e-6)


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    class Broken(torch.nn.Module):
        def forward(self, *args: object) -> torch.Tensor:
            raise RuntimeError("inductor: no C compiler")

    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    eager = train(tiny_model(), batch, config())
    compiled = train(tiny_model(), batch, config(compile=True))
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-6)
    assert "torch.compile failed (RuntimeError: inductor: no C compiler); using eager mode" in capsys.readouterr().err


def test_zero_steps_only_evaluates() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, batch, config(max_steps=0), evaluate=loss_evaluator([batch(0)]))
    assert result.state.step == 0 and result.metrics["val_loss"] == pytest.approx(math.log(V), rel=0.1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_dvc_files_of_a_run(tmp_path: Path) -> None:
    with Tracker("pretrain", root=tmp_path, mlflow=False) as tracker:
        result = train(
            tiny_model(),
            batch,
            config(eval_every=4, peak_flops=1e12),
            evaluate=loss_evaluator([batch(0)]),
            tracker=tracker,
        )
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["val_loss"] == pytest.approx(result.metrics["val_loss"]) and 0 < metrics["mfu"] < 1
    with open(tmp_path / "plots" / "pretrain" / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses(result))
    with open(tmp_path / "plots" / "pretrain" / "val_loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 8]
    assert json.loads((tmp_path / "runs" / "pretrain.json").read_text()) == {"run_id": None, "tracking_uri": None}


def test_samples_decode_with_a_kv_cache_under_bf16_training() -> None:
    from llm.generate import generate

    texts: list[str] = []

    def sample(model: torch.nn.Module) -> str:
        texts.append(" ".join(map(str, generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0)[0])))
        return texts[-1]

    train(tiny_model(), batch, config(max_steps=4, sample_every=2, precision="bf16"), sample=sample)
    assert len(texts) == 2 and all(len(t.split()) == 4 for t in texts)
