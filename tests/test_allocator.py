import os
import subprocess
import sys

from llm.allocator import find_allocator

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
