"""The memory allocator as part of the product.

PyTorch on the CPU frees and re-allocates large activation buffers every step; with glibc malloc each step
then pays hundreds of thousands of page faults. jemalloc with memory return disabled, or tcmalloc, keeps
those pages mapped (faster CPU training; see BENCHMARKS.md).
An allocator can only be chosen before the process starts, so `reexec_with_best_allocator()` re-executes
the current command once with it preloaded. `LLM_ALLOCATOR=system` opts out.

The same launcher asks PyTorch for transparent huge pages (`request_huge_pages`): batch-1 decoding reads every
weight once per token, which 2 MB pages instead of 4 KB ones speed up (see BENCHMARKS.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

ALLOCATOR_ENV = "LLM_ALLOCATOR"
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch's CPU allocator once, at its first allocation
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
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


def request_huge_pages() -> None:
    """Have PyTorch back its CPU buffers of 2 MB and more with transparent huge pages (2 MB-aligned, madvised).

    Only takes effect before torch's first CPU allocation; `THP_MEM_ALLOC_ENABLE=0` opts out. Harmless where the
    kernel has no transparent huge pages.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def kernel_huge_pages() -> str:
    """The kernel's transparent huge page mode: 'always', 'madvise', 'never', or 'absent' (not Linux, no THP)."""
    try:
        return _THP_MODE.read_text().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "absent"


def huge_pages() -> str:
    """Whether this process asked PyTorch for huge pages and the kernel can give them: 'on', 'off' or
    'unavailable' (requested, but the kernel's transparent huge pages are 'never' or absent)."""
    if os.environ.get(HUGE_PAGES_ENV) != "1":
        return "off"
    return "on" if kernel_huge_pages() in ("always", "madvise") else "unavailable"


def memory_tags() -> dict[str, str]:
    """The memory set-up of this process, for run metadata: {'allocator': ..., 'huge_pages': ...}."""
    return {"allocator": current_allocator(), "huge_pages": huge_pages()}


def stage_environment(env: Mapping[str, str], found: tuple[str, Path, dict[str, str]] | None) -> dict[str, str]:
    """`env` with the stages' memory set-up: huge pages requested (unless `env` opts out) and allocator `found`
    (from `find_allocator`) preloaded ahead of any other preload, with its settings; `LLM_ALLOCATOR` names it
    ('system' for None)."""
    if found is None:
        return {HUGE_PAGES_ENV: "1", **env, ALLOCATOR_ENV: "system"}
    name, path, extra = found
    preload = " ".join(filter(None, [str(path), env.get("LD_PRELOAD", "")]))
    return {HUGE_PAGES_ENV: "1", **env, **extra, ALLOCATOR_ENV: name, "LD_PRELOAD": preload}


def reexec_with_best_allocator() -> None:
    """Request huge pages, then re-execute this process with the best allocator preloaded (Linux only; once;
    no re-execution when no better allocator is installed).

    Prints which allocator is used. Sets `LLM_ALLOCATOR` so the new process (and its children) don't loop.
    """
    request_huge_pages()
    if os.environ.get(ALLOCATOR_ENV) or not sys.platform.startswith("linux"):
        return
    found = find_allocator()
    if found is None:
        os.environ[ALLOCATOR_ENV] = "system"
        print("allocator: system malloc (install libjemalloc2 for faster CPU training)", file=sys.stderr)
        return
    print(f"allocator: {found[0]} ({found[1]})", file=sys.stderr, flush=True)
    os.execve(sys.executable, sys.orig_argv, stage_environment(os.environ, found))
