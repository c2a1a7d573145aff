"""Importing the library stays cheap: no MLflow, DVC, transformers or Hugging Face hub at import time."""

import subprocess
import sys
from pathlib import Path

HEAVY = ("mlflow", "dvc", "transformers", "huggingface_hub")
CHECK = """
import importlib, pkgutil, sys
import llm
modules = [m.name for m in pkgutil.walk_packages(llm.__path__, "llm.")]
for name in modules:
    importlib.import_module(name)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(len(modules), ",".join(heavy))
"""


def test_no_heavy_imports() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK, *HEAVY],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    count, heavy = result.stdout.split()[0], result.stdout.strip().partition(" ")[2]
    assert int(count) >= 5 and heavy == "", f"imported at package import: {heavy}"


def test_cli_help_needs_no_torch() -> None:
    code = "import sys; from llm import cli; cli.build_parser().format_help(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
