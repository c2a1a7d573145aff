"""What every stage shares: reading its typed params section and turning user errors into one clean line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llm.config import from_mapping, suggest
from llm.errors import LLMError

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")
# Every top-level section some stage reads; any other name (a typo such as `pretrian:`) is an error.
SECTIONS = (
    "data",
    "tokenize",
    "sample",
    "model",
    "pretrain",
    "finetune_classifier",
    "finetune_instructions",
    "evaluate",
)


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict (DVC substitutes nothing in it; stages read it directly); a section name
    outside SECTIONS is an error, so a misspelt section is never silently replaced by defaults."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise LLMError(f"{path} not found: run stages from the repository root") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LLMError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    if not isinstance(data, dict):
        raise LLMError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    for name in data:
        if name not in SECTIONS:
            raise LLMError(
                f"{path}: unknown section {name!r}{suggest(str(name), SECTIONS)}; valid sections: {', '.join(SECTIONS)}"
            )
    return data


def params_section(name: str, cls: type[T], params: dict[str, Any] | None = None) -> T:
    """Section `name` of params.yaml built as dataclass `cls`; unknown keys and wrong types are errors."""
    params = load_params() if params is None else params
    if name not in params:
        raise LLMError(f"{PARAMS_FILE}: section {name!r} is missing")
    return from_mapping(cls, params[name] or {}, where=f"{PARAMS_FILE}:{name}")


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main` (already under the best memory allocator: see stages/__init__.py); an LLMError becomes
    one line on stderr and exit status 1 (no traceback)."""
    try:
        main()
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
