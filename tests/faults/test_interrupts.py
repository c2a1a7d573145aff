"""Every stage of dvc.yaml, interrupted at random points by SIGKILL and by SIGTERM, then `dvc repro` again.

After each interruption: no output under data/, models/, metrics/, reports/ or plots/ is half-written (every file
there equals the one of the uninterrupted run, compared bitwise except wall times, throughput and run ids), so
`dvc status` cannot call an incomplete output complete; after SIGTERM no MLflow run is left RUNNING. Then a plain
`dvc repro` completes, reruns only that stage, leaves no temporary files, and reproduces the uninterrupted
run's outputs.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from faults.conftest import ROOT, VOLATILE, Pipeline, Run, signal_name

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
SEEDS = {signal.SIGKILL: (1, 2), signal.SIGTERM: (1,)}


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
    """Output files that are missing, unexpected, or differ (comparably) from the reference."""
    changed = [p for p in outputs.keys() & reference.keys() if comparable(p, outputs[p]) != comparable(p, reference[p])]
    return sorted(changed) + [f"unexpected {p}" for p in sorted(outputs.keys() - reference.keys())]


def check_interrupted(pipeline: Pipeline, stage: str, run: Run, since_ms: int) -> None:
    """What an interruption may leave: fewer outputs, never a half-written one, and no MLflow run RUNNING."""
    if run.signalled:
        assert run.returncode != 0, f"dvc reported success after the stage was killed:\n{run.stdout}"
    outputs = pipeline.outputs()
    assert differences(outputs, pipeline.reference) == [], f"incomplete outputs visible after {stage} was interrupted"
    if pipeline.status(stage) == {}:  # DVC says the stage is complete: then its outputs must all be there
        assert outputs.keys() == pipeline.reference.keys()
    stuck = [
        (name, status) for name, status, start in pipeline.mlflow_runs() if start >= since_ms and status == "RUNNING"
    ]
    assert stuck == [], f"MLflow runs left RUNNING: {stuck}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", list(SEEDS), ids=signal_name)
@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_stage_reruns_to_the_same_outputs(pipeline: Pipeline, stage: str, signum: int) -> None:
    mlflow = "on" if signum == signal.SIGTERM else "off"  # a SIGKILLed process cannot end its run
    for seed in SEEDS[signum]:
        delay = random.Random(f"{stage}/{signum}/{seed}").uniform(0.05, 0.9) * pipeline.durations[stage]
        for _ in range(4):  # the stage may run faster than it did uninterrupted: then signal it sooner
            since = int(time.time() * 1000)
            run = pipeline.interrupt(stage, signum, delay, env={**pipeline.env, "LLM_MLFLOW": mlflow})
            check_interrupted(pipeline, stage, run, since)
            if run.signalled:
                break
            delay /= 3
        assert run.signalled, f"{stage} always finished before the signal"
        if signum == signal.SIGTERM:
            assert "Traceback" not in run.stderr, run.stderr  # a clean stop
        again = pipeline.dvc("repro", "--no-run-cache")  # really rerun (resume), don't restore the reference
        assert set(again.ran()) <= {stage}, again.stdout
        assert pipeline.leftovers() == [], f"temporary files left after {stage} was interrupted and rerun"
        assert differences(pipeline.outputs(), pipeline.reference) == []
        assert pipeline.status() == {}
