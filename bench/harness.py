"""Shared machinery of the bench/ scripts.

Every contender runs in its own worker process, started under the memory allocator it is measured with
(an allocator can only be chosen when a process starts). The driver builds all workers first (train.py: anew
for each precision), then runs rounds: in each round every contender measures once, in a rotated order, so
slow drifts of a shared machine's load hit every contender alike. Results are medians with min-max over the
rounds; ratios are the ratio of medians with the range of the per-round ratios (round i against round i).

Allocator specs: `system` (glibc malloc, nothing preloaded), `best` (the memory set-up of the project's stages,
from `llm.allocator`: huge pages for torch's buffers, and jemalloc with memory return disabled, else tcmalloc,
else system), `inherit` (the
environment this script was started with, e.g. your own `LD_PRELOAD=... MALLOC_CONF=...`), or the path
of a malloc library to preload.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llm.allocator import (
    HUGE_PAGES_ENV,
    current_allocator,
    find_allocator,
    huge_pages,
    kernel_huge_pages,
    stage_environment,
)

REPO = Path(__file__).resolve().parent.parent
_MALLOC_VARS = ("LD_PRELOAD", "MALLOC_CONF", "LLM_ALLOCATOR", HUGE_PAGES_ENV)


def allocator_env(spec: str) -> dict[str, str]:
    """The environment for a worker running under allocator `spec` (see the module docstring)."""
    if spec == "inherit":
        return dict(os.environ)
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_VARS}
    env["LLM_ALLOCATOR"] = "system"  # so nothing in the worker re-executes itself under another allocator
    if spec == "system":
        return env
    if spec == "best":
        return stage_environment(env, find_allocator())
    if not Path(spec).is_file():
        raise SystemExit(f"allocator {spec!r}: expected system, best, inherit or the path of a malloc library")
    return {**env, "LD_PRELOAD": spec, **{k: os.environ[k] for k in ("MALLOC_CONF",) if k in os.environ}}


class Worker:
    """A child process running `script --worker`, answering one JSON request per line."""

    def __init__(self, script: Path, label: str, allocator: str) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=allocator_env(allocator),
            text=True,
            cwd=REPO,
        )

    def call(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} exited with code {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.label}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait()


def serve(handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Worker side: answer requests from stdin until it closes; library output goes to stderr."""
    out, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except Exception as err:  # reported to the driver, which names the worker
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def process_info() -> dict[str, Any]:
    """What a worker reports about itself: allocator (read from /proc/self/maps; "+ THP" with huge pages),
    threads, peak RSS."""
    import resource

    return {
        "allocator": current_allocator() + (" + THP" if huge_pages() == "on" else ""),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rounds(repeats: int, items: Sequence[Any]) -> list[list[Any]]:
    """`repeats` orderings of `items`, each rotated by one more place than the last."""
    return [[items[(r + i) % len(items)] for i in range(len(items))] for r in range(repeats)]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_range(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


def matmul_gflops(dtype: torch.dtype, n: int, device: str = "cpu", seconds: float = 0.5) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) matmul in `dtype` over repeats lasting about `seconds`."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def streaming_rate(numel: int) -> float:
    """Bytes/s of a plain streaming pass: the best of 5 sums over an fp32 buffer of `numel` elements."""
    buffer = torch.ones(numel)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return numel * 4 / best


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine_info() -> dict[str, Any]:
    """CPU, cores, bf16 support, memory, software versions, git commit and load average."""
    flags, model = set(), platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": default_threads(),
        "bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}) or "no native bf16",
        "isa": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": round(mem_gb, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": f"{commit}{' (dirty)' if dirty else ''}",
        "allocator_available": (found := find_allocator()) and f"{found[0]} ({found[1]})",
        "transparent_huge_pages": kernel_huge_pages(),
        "load_avg_1_5_15": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def print_machine(info: dict[str, Any]) -> None:
    for key, value in info.items():
        print(f"- {key}: {value}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_table(runs: Mapping[str, Sequence[float]], rows: Sequence[str], columns: Sequence[str]) -> str:
    """A Markdown table of speed ratios row / column from per-round speeds: the ratio of the medians, then the
    range of the per-round ratios (round i of the row against round i of the column). For two contenders
    measured in the same rounds, which run within minutes, that range shows how far the ratio moves with the
    machine's load."""

    def cell(row: str, column: str) -> str:
        per_round = [a / b for a, b in zip(runs[row], runs[column], strict=True)]
        ratio = statistics.median(runs[row]) / statistics.median(runs[column])
        return f"{ratio:.2f}x ({min(per_round):.2f}–{max(per_round):.2f})"

    return table(["", *columns], [[row] + [cell(row, column) for column in columns] for row in rows])


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        from llm.io import write_json as write

        write(Path(path), data)
