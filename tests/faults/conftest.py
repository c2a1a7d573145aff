"""Fault injection: a temporary git + DVC copy of the pipeline on a tiny profile, whose stages are interrupted by
signals at random points.

`pipeline` (module scope) runs every stage of dvc.yaml once, uninterrupted, and records the outputs and each
stage's duration; `Pipeline.interrupt` then re-runs one stage and sends a signal to its process (only that
process: DVC survives and records the failure) after a delay drawn from that duration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_data_stages import make_env
from test_e2e import merge, smoke_params

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
WATCHED = ("data", "models", "metrics", "reports", "plots")  # where pipeline outputs live
TEMPORARY = re.compile(r"^\..*\.tmp$|^\.fetch-|^\.step-")  # names of files being written (never outputs)
# Values that legitimately differ between two runs of the same stage: wall time, throughput, MLflow run ids and
# the model registry's state (evaluate's `champion` section: version numbers grow with every rerun that registers).
VOLATILE = re.compile(r"seconds|per_s|mfu|run_id|wall|timestamp|champion")
SMALL_BOOK = "corpus/pg00902_the_happy_prince_and_other_tales.txt"
# On top of params.yaml and the smoke profile: one small book and even smaller training stages, so that the whole
# fault suite (every stage run about four times) stays within a few minutes of CPU.
TINY: dict[str, Any] = {
    "sample": {"context_length": 32, "chunk_tokens": 2048},
    "model": {"overrides": {"emb_dim": 32, "n_heads": 2, "n_layers": 1}},
    "pretrain": {"train": {"batch_size": 2}, "eval_windows": 4, "sample_tokens": 4},
    "finetune_classifier": {"classifier": {"max_length": 16}, "train": {"batch_size": 64}, "eval_batch_size": 256},
    # 32-token windows hold no response after an Alpaca prompt, so train on the whole sequence here
    "finetune_instructions": {
        "train": {"batch_size": 2},
        "mask_prompt": False,
        "eval_batch_size": 64,
        "response_batch_size": 64,
    },
    "evaluate": {"heldout_max_tokens": 256, "batch_size": 16},
}


def tiny_params() -> dict[str, Any]:
    """The smoke profile (params.yaml + params-smoke.yaml), then TINY; the corpus cut to one small book."""
    params = merge(smoke_params(), TINY)
    sources = params["data"]["sources"]
    params["data"]["sources"] = [s for s in sources if not s["path"].startswith("corpus/") or s["path"] == SMALL_BOOK]
    return params


@dataclass
class Run:
    """One `dvc` invocation: exit status, output, and whether the signal reached a live stage process."""

    returncode: int
    stdout: str
    stderr: str
    signalled: bool = False
    seconds: float = 0.0  # from the stage process's start to its exit

    def ran(self) -> list[str]:
        return re.findall(r"Running stage '([^']+)'", self.stdout)


@dataclass
class Pipeline:
    repo: Path
    env: dict[str, str]
    stages: list[str]
    reference: dict[str, bytes] = field(default_factory=dict)  # outputs of the uninterrupted run
    durations: dict[str, float] = field(default_factory=dict)  # seconds from stage start to exit, uninterrupted

    def dvc(self, *args: str) -> Run:
        """Run `dvc <args>`, which must succeed."""
        out = subprocess.run([DVC, *args], cwd=self.repo, env=self.env, capture_output=True, text=True)
        assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return Run(out.returncode, out.stdout, out.stderr)

    def interrupt(self, stage: str, signum: int | None, delay: float, env: dict[str, str] | None = None) -> Run:
        """Force-run `stage` alone and send `signum` to its process `delay` seconds after it starts (no signal:
        let it finish; `Run.seconds` is then the stage process's lifetime)."""
        logs = self.repo.parent / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "stdout", "w+") as out, open(logs / "stderr", "w+") as err:
            proc = subprocess.Popen(
                [DVC, "repro", "--force", "--single-item", stage],
                cwd=self.repo, env=env or self.env, stdout=out, stderr=err, start_new_session=True,
            )  # fmt: skip
            pid, started = _wait_for_stage(proc, stage)
            signalled = False
            if pid is not None and signum is not None:
                time.sleep(max(0.0, started + delay - time.monotonic()))
                signalled = _signal(pid, signum)
            while pid is not None and _alive(pid):
                time.sleep(0.02)
            seconds = time.monotonic() - started
            proc.wait(timeout=600)
            out.seek(0)
            err.seek(0)
            return Run(proc.returncode, out.read(), err.read(), signalled, seconds)

    def outputs(self) -> dict[str, bytes]:
        """Every file under the output folders (DVC's .gitignore files and temporary files excluded)."""
        files = [p for d in WATCHED for p in (self.repo / d).rglob("*") if p.is_file()]
        return {
            p.relative_to(self.repo).as_posix(): p.read_bytes()
            for p in sorted(files)
            if p.name != ".gitignore" and not any(TEMPORARY.match(part) for part in p.parts)
        }

    def leftovers(self) -> list[str]:
        """Temporary files or folders under the output folders (left behind by an interrupted write)."""
        return sorted(
            p.relative_to(self.repo).as_posix()
            for d in WATCHED
            for p in (self.repo / d).rglob("*")
            if TEMPORARY.match(p.name)
        )

    def forget(self, stage: str) -> None:
        """Drop `stage` from dvc.lock, as if it had never run: its next `dvc repro --no-run-cache` really runs it
        (a stage that ran before with the same inputs would just be restored from the DVC cache, and its outputs
        are `persist`: one that an interruption left as they were would be up to date)."""
        lock = yaml.safe_load((self.repo / "dvc.lock").read_text(encoding="utf-8"))
        lock["stages"].pop(stage, None)
        (self.repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")

    def status(self, *targets: str) -> dict[str, Any]:
        return json.loads(self.dvc("status", "--json", *targets).stdout or "{}")

    def mlflow_runs(self) -> list[tuple[str, str, int]]:
        """(run name, status, start time in ms) of every MLflow run in the store."""
        db = self.repo.parent / "mlflow.db"
        if not db.exists():
            return []
        with sqlite3.connect(db) as con:
            return con.execute("SELECT name, status, start_time FROM runs").fetchall()


def _wait_for_stage(proc: subprocess.Popen[str], stage: str, timeout: float = 300) -> tuple[int | None, float]:
    """The pid of `python -m stages.<stage>` started by `proc` (same session), and when it was found."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _is_stage(entry, stage, proc.pid):
                return int(entry.name), time.monotonic()
        time.sleep(0.02)
    return None, time.monotonic()


def _is_stage(entry: Path, stage: str, session: int) -> bool:
    try:
        args = (entry / "cmdline").read_bytes().split(b"\0")
        stat = (entry / "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[3]) == session and f"stages.{stage}".encode() in args


PF_EXITING = 0x4  # linux/sched.h: the process is tearing down (a signal sent now is not acted on)


def _alive(pid: int) -> bool:
    """Whether `pid` is running (not exiting, not exited, not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, *fields = stat[stat.rindex(")") + 2 :].split()
    return state not in ("Z", "X") and not int(fields[5]) & PF_EXITING  # fields[5]: the 9th field, flags


def _signal(pid: int, signum: int) -> bool:
    if not _alive(pid):
        return False
    try:
        os.kill(pid, signum)
    except OSError:
        return False
    return True


def fault_env(tmp: Path, mirror: Path, repo: Path) -> dict[str, str]:
    return make_env(
        tmp,
        code=repo,  # the copy's llm package, not the checkout's
        LLM_DATA_MIRROR=str(mirror),
        LLM_ALLOCATOR="system",  # no allocator re-exec: one interpreter start per stage (CPU budget)
        LLM_MLFLOW="off",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
    )


def make_repo(repo: Path, env: dict[str, str]) -> list[str]:
    """A git + DVC repository holding the pipeline (code, dvc.yaml, tiny params); returns its stage names."""
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("llm", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).is_file():
            shutil.copyfile(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False), encoding="utf-8")
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return list(yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Pipeline:
    """The tiny pipeline after one uninterrupted `dvc repro`, stage by stage (MLflow on: its store exists)."""
    tmp = tmp_path_factory.mktemp("faults")
    env = fault_env(tmp, mirror, tmp / "repo")
    pipe = Pipeline(tmp / "repo", env, make_repo(tmp / "repo", env))
    for stage in pipe.stages:
        run = pipe.interrupt(stage, None, 0.0, {**env, "LLM_MLFLOW": "on"})
        assert run.returncode == 0 and run.ran() == [stage], run.stdout + run.stderr
        pipe.durations[stage] = run.seconds
    pipe.reference = pipe.outputs()
    assert pipe.status() == {} and pipe.leftovers() == []
    return pipe
