import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.allocator import find_allocator, kernel_huge_pages

SCRIPT = """
import os
from llm.allocator import current_allocator, reexec_with_best_allocator
reexec_with_best_allocator()
print(current_allocator(), os.environ.get("LLM_ALLOCATOR"), os.environ.get("MALLOC_CONF"))
"""


def _run(**env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("LLM_ALLOCATOR", "LD_PRELOAD", "MALLOC_CONF")}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**full_env, **env}, capture_output=True, text=True, timeout=60
    )


def test_reexec_preloads_the_best_allocator_and_says_so() -> None:
    out = _run()
    assert out.returncode == 0, out.stderr
    found = find_allocator()
    if found is None:
        assert out.stdout.split()[:2] == ["system", "system"]
        assert "allocator: system malloc" in out.stderr
    else:
        name, path, _ = found
        assert out.stdout.split()[:2] == [name, name]
        assert f"allocator: {name} ({path})" in out.stderr
        if name == "jemalloc":
            assert out.stdout.split()[2] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def test_opt_out_keeps_system_malloc() -> None:
    out = _run(LLM_ALLOCATOR="system")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["system", "system"] and out.stderr == ""


def test_a_stage_re_executes_before_its_heavy_imports(tmp_path: Path) -> None:
    """`python -m stages.<name>` switches allocator while importing the `stages` package, before the stage module
    (and torch) is imported; the stage then runs in the new process (here it stops: no params.yaml)."""

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_ALLOCATOR", "LD_PRELOAD", "MALLOC_CONF")}
    env["PYTHONPATH"] = str(repo)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stages.pretrain"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "error: params.yaml not found" in out.stderr
    if find_allocator() is not None:
        before, _, after = out.stderr.partition("allocator: ")
        assert after and "| torch\n" not in before  # torch is first imported after the re-exec
        assert "| torch\n" in after
    imported = subprocess.run(
        [sys.executable, "-c", "import stages; print('imported')"], env=env, capture_output=True, text=True, timeout=60
    )
    assert imported.stdout == "imported\n" and "allocator" not in imported.stderr  # only `-m stages.<name>` switches


HUGE_PAGES_SCRIPT = """
import re
from pathlib import Path
from llm.allocator import huge_pages, reexec_with_best_allocator
reexec_with_best_allocator()
import torch
weights = torch.ones(16 * 2**20)  # 64 MB, like a weight matrix
huge_kb = int(re.search(r"AnonHugePages:\\s+(\\d+)", Path("/proc/self/smaps_rollup").read_text()).group(1))
print(huge_pages(), huge_kb)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux /proc")
def test_the_launcher_gives_torch_buffers_huge_pages_unless_opted_out() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_ALLOCATOR", "LD_PRELOAD", "MALLOC_CONF")}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    on = subprocess.run([sys.executable, "-c", HUGE_PAGES_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert on.returncode == 0, on.stderr
    state, huge_kb = on.stdout.split()
    if kernel_huge_pages() in ("always", "madvise"):
        assert state == "on" and int(huge_kb) > 0  # in 'madvise' mode only requested memory gets 2 MB pages
    else:
        assert state == "unavailable"
    off = subprocess.run(
        [sys.executable, "-c", HUGE_PAGES_SCRIPT], env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert off.returncode == 0, off.stderr
    state, huge_kb = off.stdout.split()
    assert state == "off"
    if kernel_huge_pages() == "madvise":
        assert int(huge_kb) == 0  # nothing asked for them
