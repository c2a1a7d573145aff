"""Every stage of dvc.yaml, interrupted at random points by SIGKILL (twice) and SIGTERM, then `dvc repro` again.

Each interruption hits a fresh or a resumed run of the stage (the previous one was interrupted too). After each:
no output under data/, models/, metrics/, reports/ or plots/ is lost or half-written (every file there equals the one
of the uninterrupted run, compared bitwise except wall times, throughput and run ids), so `dvc status` cannot
call an incomplete output complete; a SIGTERM stops the stage cleanly (no traceback) and leaves no MLflow run
RUNNING. Finally `dvc repro <stage>` completes (resuming where the last run stopped), leaves no temporary files,
and reproduces the uninterrupted run's outputs. Downstream stages are not rerun: volatile metadata (training
time, run ids) in a stage's outputs changes their hashes even when the outputs proper are bitwise identical.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from faults.conftest import ROOT, VOLATILE, Pipeline, Run

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
# In this order, each at a seeded random point within the given share of the stage's uninterrupted duration;
# SIGTERM comes late enough to find the MLflow run open and the training loop running, most of the time.
SIGNALS = ((signal.SIGKILL, (0.05, 0.75)), (signal.SIGKILL, (0.05, 0.75)), (signal.SIGTERM, (0.4, 0.8)))


def comparable(path: str, data: bytes) -> Any:
    """What must be identical between two runs: the bytes, except volatile JSON values and volatile plot series."""
    if path.endswith(".json"):
        return _stable(json.loads(data))
    if path.startswith("plots/") and VOLATILE.search(Path(path).stem):
        return None
    return data


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def differences(outputs: dict[str, bytes], reference: dict[str, bytes]) -> list[str]:
    """Output files that differ (comparably) from the reference, or that it does not have."""
    changed = [p for p in outputs.keys() & reference.keys() if comparable(p, outputs[p]) != comparable(p, reference[p])]
    return sorted(changed) + [f"unexpected {p}" for p in sorted(outputs.keys() - reference.keys())]


def interrupt(pipeline: Pipeline, stage: str, signum: int, share: tuple[float, float], seed: int) -> Run:
    """Run `stage` and send `signum` at a seeded random point of its uninterrupted duration (sooner if it ends
    before that: a resumed run is shorter). MLflow is on under SIGTERM: the run must end KILLED or FAILED."""
    delay = random.Random(f"{stage}/{seed}").uniform(*share) * pipeline.durations[stage]
    env = {**pipeline.env, "LLM_MLFLOW": "on" if signum == signal.SIGTERM else "off"}
    for _ in range(4):
        since = int(time.time() * 1000)
        run = pipeline.interrupt(stage, signum, delay, env)
        check_interrupted(pipeline, stage, run, since)
        if run.signalled:
            return run
        delay /= 3
    raise AssertionError(f"{stage} always finished before the signal")


def check_interrupted(pipeline: Pipeline, stage: str, run: Run, since_ms: int) -> None:
    """What an interruption may leave: every output of the last good run (nothing lost: the outs are `persist`),
    none half-written, and no MLflow run RUNNING."""
    if run.signalled:
        assert run.returncode != 0, f"dvc reported success after the stage was killed:\n{run.stdout}"
    outputs = pipeline.outputs()
    assert outputs.keys() == pipeline.reference.keys(), sorted(outputs.keys() ^ pipeline.reference.keys())
    wrong = differences(outputs, pipeline.reference)
    assert wrong == [], f"incomplete outputs visible after {stage} was interrupted: {wrong}\n{run.stderr[-2000:]}"
    if pipeline.status(stage) == {}:  # DVC says the stage is complete: then its outputs must all be there
        assert outputs.keys() == pipeline.reference.keys()
    ended = [status for _, status, start in pipeline.mlflow_runs() if start >= since_ms]
    # KILLED or FAILED (FINISHED if the signal came after the run ended)
    assert "RUNNING" not in ended, f"{ended}\n{run.stderr[-2000:]}"
    saved = re.search(r"checkpoint saved in (\S+);", run.stderr)  # a training stage stopped by SIGTERM
    assert saved is None or (pipeline.repo / saved[1] / "state.pt").is_file(), saved


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_stage_reruns_to_the_same_outputs(pipeline: Pipeline, stage: str) -> None:
    pipeline.forget(stage)  # the interrupted runs are its first: rerunning resumes, nothing is restored from cache
    for seed, (signum, share) in enumerate(SIGNALS):
        run = interrupt(pipeline, stage, signum, share, seed)
        if signum == signal.SIGTERM:
            assert "Traceback" not in run.stderr, run.stderr  # a clean stop
    pipeline.forget(stage)  # a retry that finished before its signal recorded the stage in dvc.lock
    again = pipeline.dvc("repro", "--no-run-cache", stage)  # upstream is up to date: only `stage` reruns
    assert again.ran() == [stage], again.stdout
    assert pipeline.status(stage) == {}
    assert pipeline.leftovers() == [], f"temporary files left after {stage} was interrupted and rerun"
    wrong = differences(pipeline.outputs(), pipeline.reference)
    assert wrong == [], f"outputs differ from the uninterrupted run's after {stage} was rerun: {wrong}"
