"""Start-up costs: `import llm` (fresh interpreters) and a `dvc repro` with nothing to do.

    python bench/startup.py                 # both, in this checkout
    python bench/startup.py --skip-dvc      # import time only

`dvc repro` is timed only when `dvc status` reports the pipeline up to date (otherwise it would run stages);
run `dvc repro` once first. Each measurement is a fresh process; medians with min-max over the repeats.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize`: look in this folder after the stdlib.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import argparse
import os
import subprocess
import time
from typing import Any

import harness

IMPORT_SNIPPET = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def import_seconds(module: str) -> float:
    """Seconds `import module` takes in a fresh interpreter (measured inside it)."""
    code = IMPORT_SNIPPET.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=harness.REPO)
    return float(out.stdout)


def wall_seconds(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per measurement")
    parser.add_argument("--repo", type=Path, default=harness.REPO, help="DVC project for the no-op repro")
    parser.add_argument("--skip-dvc", action="store_true", help="only time the imports")
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    args = parser.parse_args()
    info = harness.machine_info()
    print("# Start-up\n")
    harness.print_machine(info)
    bin_dir = Path(sys.executable).parent
    jobs: dict[str, Any] = {
        "import llm (in-process s)": lambda: import_seconds("llm"),
        "import llm.model (in-process s)": lambda: import_seconds("llm.model"),
        "python -c 'import llm' (wall s)": lambda: wall_seconds([sys.executable, "-c", "import llm"], harness.REPO),
        "python -c pass (wall s)": lambda: wall_seconds([sys.executable, "-c", "pass"], harness.REPO),
    }
    if (bin_dir / "llm").is_file():
        jobs["llm --help (wall s)"] = lambda: wall_seconds([str(bin_dir / "llm"), "--help"], harness.REPO)
    if not args.skip_dvc:
        dvc = str(bin_dir / "dvc")
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        status = subprocess.run([dvc, "status", "--quiet"], cwd=args.repo, capture_output=True, env=env)
        if status.returncode != 0:
            raise SystemExit(f"{args.repo}: `dvc status` reports changes; run `dvc repro` first (or --skip-dvc)")
        jobs["dvc repro, nothing to do (wall s)"] = lambda: wall_seconds([dvc, "repro"], args.repo)
        jobs["dvc status (wall s)"] = lambda: wall_seconds([dvc, "status"], args.repo)
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for order in harness.rounds(args.repeats, list(jobs)):
        for name in order:
            samples[name].append(jobs[name]())
    print(f"\nload average after: {os.getloadavg()}\n")
    rows = [[name, harness.fmt_range(harness.summary(values), 3)] for name, values in samples.items()]
    print(harness.table(["measurement", "seconds median (min–max)"], rows))
    harness.write_json(args.json, {"machine": info, "samples": samples, "load_after": os.getloadavg()})


if __name__ == "__main__":
    main()
