"""DDP: two CPU processes under torchrun (gloo) with the same global batch reproduce one process's run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, torch
from llm.config import get_preset
from llm.model import GPT
from llm.checkpoint import list_checkpoints
from llm.distributed import distributed_env
from llm.train_config import TrainConfig
from llm.training import loss_evaluator, train
from pathlib import Path

torch.set_num_threads(1)
rank, world, _ = distributed_env()
out, checkpoints = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
model = GPT(get_preset("cpu-tiny", vocab_size=67, context_length=16))
GLOBAL_ROWS = 8

def global_batch(i):
    tokens = torch.randint(0, 67, (GLOBAL_ROWS, 17), generator=torch.Generator().manual_seed(i))
    return tokens[:, :-1], tokens[:, 1:]

def shard(i):  # this process's rows of global micro-batch i
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    return tuple(t[rows] for t in global_batch(i))

config = TrainConfig(max_steps=8, batch_size=GLOBAL_ROWS // world, grad_accum=2, lr=3e-3, min_lr=3e-4,
                     warmup_steps=2, eval_every=4, checkpoint_every=4, precision="fp32")
result = train(model, shard, config, evaluate=loss_evaluator([global_batch(999)]), checkpoint_dir=checkpoints)
if rank == 0:
    json.dump({"history": result.state.history, "tokens": result.state.tokens,
               "checkpoints": [p.name for p in list_checkpoints(checkpoints)]}, open(out, "w"))
"""


def run(tmp_path: Path, name: str, nproc: int) -> dict:
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    args = [sys.executable, *launcher, str(script), str(tmp_path / f"{name}.json"), str(tmp_path / name)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if nproc > 1 and "gloo" in done.stderr and done.returncode:
        pytest.skip(f"torch.distributed gloo unavailable here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_two_processes_reproduce_one(tmp_path: Path) -> None:
    single, ddp = run(tmp_path, "single", 1), run(tmp_path, "ddp", 2)
    for key in ("loss", "grad_norm", "val_loss"):
        expected = [e[key] for e in single["history"] if key in e]
        assert [e[key] for e in ddp["history"] if key in e] == pytest.approx(expected, abs=1e-4), key
    assert ddp["tokens"] == single["tokens"] == 8 * 2 * 8 * 16
    assert ddp["checkpoints"] == ["step-00000004", "step-00000008"]
