"""The memory allocator as part of the product.

PyTorch on the CPU frees and re-allocates large activation buffers every step; with glibc malloc each step
then pays hundreds of thousands of page faults. jemalloc with memory return disabled, or tcmalloc, keeps
those pages mapped (1.4–2× faster small-model training on our 2-core machines; see BENCHMARKS.md).
An allocator can only be chosen before the process starts, so `reexec_with_best_allocator()` re-executes
the current command once with it preloaded. `LLM_ALLOCATOR=system` opts out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "LLM_ALLOCATOR"
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# name -> (shared library file names, extra environment)
_CANDIDATES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "jemalloc": (("libjemalloc.so.2", "libjemalloc.so"), {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), {}),
}


def find_allocator() -> tuple[str, Path, dict[str, str]] | None:
    """The best allocator installed on this machine: (name, library path, environment to set), or None."""
    for name, (files, env) in _CANDIDATES.items():
        for directory in _LIB_DIRS:
            for file in files:
                path = Path(directory) / file
                if path.is_file():
                    return name, path, env
    return None


def current_allocator() -> str:
    """Which allocator this process runs under: 'jemalloc', 'tcmalloc' or 'system' (read from its maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name, (files, _) in _CANDIDATES.items():
        if any(file.split(".so")[0] in maps for file in files):
            return name
    return "system"


def reexec_with_best_allocator() -> None:
    """Re-execute this process with the best allocator preloaded (Linux only; once; no-op when unavailable).

    Prints which allocator is used. Sets `LLM_ALLOCATOR` so the new process (and its children) don't loop.
    """
    if os.environ.get(ALLOCATOR_ENV) or not sys.platform.startswith("linux"):
        return
    found = find_allocator()
    if found is None:
        os.environ[ALLOCATOR_ENV] = "system"
        print("allocator: system malloc (install libjemalloc2 for faster CPU training)", file=sys.stderr)
        return
    name, path, extra = found
    env = {**os.environ, **extra, ALLOCATOR_ENV: name}
    env["LD_PRELOAD"] = " ".join(filter(None, [str(path), os.environ.get("LD_PRELOAD", "")]))
    print(f"allocator: {name} ({path})", file=sys.stderr, flush=True)
    os.execve(sys.executable, sys.orig_argv, env)
