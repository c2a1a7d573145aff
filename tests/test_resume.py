"""Exact resume: a run interrupted (signal, crash, SIGKILL) and resumed from its checkpoints reproduces the
uninterrupted run's losses; damaged or partial checkpoints are never loaded."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llm.checkpoint import list_checkpoints
from llm.config import get_preset
from llm.errors import Interrupted, LLMError
from llm.model import GPT
from llm.train_config import TrainConfig
from llm.training import loss_evaluator, train

ROOT = Path(__file__).resolve().parents[1]
V, T, STEPS = 67, 16, 12


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny", vocab_size=V, context_length=T, dropout=0.1))  # dropout: RNG must resume too


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(i))
    return tokens[:, :-1], tokens[:, 1:]


CONFIG = TrainConfig(
    max_steps=STEPS, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=4, checkpoint_every=3,
    keep_checkpoints=2, precision="fp32", restore_best=True,
)  # fmt: skip
EVALUATE = loss_evaluator([batch(10_000)])


def losses(history: list[dict[str, float]]) -> list[float]:
    return [entry["loss"] for entry in history]


@pytest.fixture(scope="module")
def reference() -> list[dict[str, float]]:
    return train(model(), batch, CONFIG, evaluate=EVALUATE).state.history


def test_signal_checkpoints_and_resume_is_exact(tmp_path: Path, reference: list[dict[str, float]]) -> None:
    def interrupting(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 4:  # during step 5: the step finishes, then a checkpoint is written
            os.kill(os.getpid(), signal.SIGINT)
        return batch(i)

    with pytest.raises(Interrupted, match=r"interrupted by SIGINT at step 5/12; checkpoint saved in .*step-00000005"):
        train(model(), interrupting, CONFIG, evaluate=EVALUATE, checkpoint_dir=tmp_path)
    resumed_model = model()
    result = train(resumed_model, batch, CONFIG, evaluate=EVALUATE, checkpoint_dir=tmp_path)
    assert losses(result.state.history) == pytest.approx(losses(reference), abs=1e-6)
    assert [e["val_loss"] for e in result.state.history if "val_loss" in e] == pytest.approx(
        [e["val_loss"] for e in reference if "val_loss" in e], abs=1e-6
    )
    # restore_best: the best weights survived the restart and are loaded at the end
    best_step = min((e for e in reference if "val_loss" in e), key=lambda e: e["val_loss"])["step"]
    assert result.state.best_step == best_step
    assert EVALUATE(resumed_model.eval())["val_loss"] == pytest.approx(result.best["val_loss"], abs=1e-6)


def crashing(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if i == 7:  # in step 8, after the checkpoints of steps 3 and 6
        raise RuntimeError("disk went away")
    return batch(i)


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path: Path, reference: list[dict[str, float]]) -> None:
    with pytest.raises(RuntimeError, match="disk went away"):
        train(model(), crashing, CONFIG, evaluate=EVALUATE, checkpoint_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000006"]
    result = train(model(), batch, CONFIG, evaluate=EVALUATE, checkpoint_dir=tmp_path)
    assert losses(result.state.history) == pytest.approx(losses(reference), abs=1e-6)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000009", "step-00000012"]  # keep the last 2


def test_damaged_and_partial_checkpoints_are_never_loaded(
    tmp_path: Path, reference: list[dict[str, float]], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(RuntimeError):
        train(model(), crashing, CONFIG, evaluate=EVALUATE, checkpoint_dir=tmp_path)
    newest = tmp_path / "step-00000006" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-100:] = bytes(100)  # same size, different weights: only the sha256 can tell
    newest.write_bytes(bytes(data))
    partial = tmp_path / ".step-00000009.abc.tmp"  # what a write killed half-way leaves
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x80garbage")
    result = train(model(), batch, CONFIG, evaluate=EVALUATE, checkpoint_dir=tmp_path)
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step-00000006" in err and "resuming from" in err
    assert "step-00000003 (step 3/12)" in err
    assert losses(result.state.history) == pytest.approx(losses(reference), abs=1e-6)


def test_other_settings_refuse_to_resume(tmp_path: Path) -> None:
    train(model(), batch, dataclasses.replace(CONFIG, max_steps=3), checkpoint_dir=tmp_path)
    with pytest.raises(LLMError, match=r"other settings \(max_steps 3 -> 12\)"):
        train(model(), batch, CONFIG, checkpoint_dir=tmp_path)


SCRIPT = """
import json, sys, time, torch
from llm.config import get_preset
from llm.model import GPT
from llm.train_config import TrainConfig
from llm.training import train

torch.set_num_threads(1)
checkpoints, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
model = GPT(get_preset("cpu-tiny", vocab_size=67, context_length=16, dropout=0.1))

def batch(i):
    time.sleep(delay)
    tokens = torch.randint(0, 67, (4, 17), generator=torch.Generator().manual_seed(i))
    return tokens[:, :-1], tokens[:, 1:]

config = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=0,
                     checkpoint_every=2, precision="fp32")
result = train(model, batch, config, checkpoint_dir=checkpoints)
json.dump([e["loss"] for e in result.state.history], open(out, "w"))
"""


def test_sigkill_mid_run_then_rerun_resumes_and_matches(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(name: str, delay: float) -> subprocess.Popen[str]:
        args = [sys.executable, str(script), str(tmp_path / name), str(tmp_path / f"{name}.json"), str(delay)]
        return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)

    uninterrupted, victim = start("reference", 0.0), start("killed", 0.25)
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "killed") or list_checkpoints(tmp_path / "killed")[-1].name < "step-00000004":
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed.json").exists()
    killed_at = int(list_checkpoints(tmp_path / "killed")[-1].name[5:])
    assert 4 <= killed_at < 12
    rerun = start("killed", 0.0)
    assert rerun.wait(timeout=120) == 0 and uninterrupted.wait(timeout=120) == 0
    assert f"resuming from {tmp_path / 'killed'}" in rerun.stderr.read()  # type: ignore[union-attr]
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert json.loads((tmp_path / "killed.json").read_text()) == pytest.approx(expected, abs=1e-6)
