"""Thin DVC stage entry points: each reads its params, calls `llm`, writes its outs and metrics.

Run from the repository root as `python -m stages.<name>` (that is what dvc.yaml does). Launched that way, the
process first re-executes itself under the best memory allocator (see `llm.allocator`), here, before a stage
imports torch, pandas or mlflow, so the start-up is paid once; importing `stages` from other code does nothing.
"""

import itertools
import sys

from llm.allocator import reexec_with_best_allocator


def launched_as_a_stage(argv: list[str]) -> bool:
    """Whether `argv` (an interpreter's command line) runs `python [options] -m stages.<name>`."""
    return any(flag == "-m" and module.startswith("stages.") for flag, module in itertools.pairwise(argv))


if launched_as_a_stage(sys.orig_argv):
    reexec_with_best_allocator()
