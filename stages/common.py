"""What the stages share: the pipeline's paths, typed params sections, the tokenizer, a tracked training run with
resumable checkpoints, the one-line summary and clean errors. Kept light (no torch): every stage depends on it."""

import hashlib
import json
import shutil
import signal
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import tiktoken
import yaml

from llm.config import from_mapping, suggest
from llm.errors import LLMError
from llm.io import read_utf8
from llm.signals import STOP_SIGNALS
from llm.tokenizer import get_tokenizer
from llm.tracking import Tracker

if TYPE_CHECKING:
    from llm.generate import GenerationConfig
    from llm.registry import Kind, RegistryParams

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")
# Every top-level section some stage reads; any other name (a typo such as `pretrian:`) is an error.
SECTIONS = "data", "tokenize", "sample", "model", "pretrain", "finetune_classifier", "finetune_instructions", "evaluate"

# Files that one stage writes and another reads (dvc.yaml declares them as outs and deps).
RAW, WINDOWS = Path("data/raw"), Path("data/windows")
RANKS_FILE, INSTRUCTION_DATA = RAW / "tokenizer/r50k_base.tiktoken", RAW / "instruction-data.json"
BASE_MODEL, INSTRUCT_MODEL = Path("models/base"), Path("models/instruct")
RESPONSES, CLASSIFIER_METRICS = Path("reports/responses.json"), Path("metrics/finetune_classifier.json")
CHECKPOINTS = Path("checkpoints")  # checkpoints/<stage>/<key>/: git-ignored, never a DVC out (DVC never deletes them)
# The kind of model each training stage saves, as llm.registry logs and registers it in MLflow.
MODEL_KINDS: dict[str, "Kind"] = {"pretrain": "base", "finetune_classifier": "classifier"}
MODEL_KINDS["finetune_instructions"] = "instruct"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (not: the last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, Hashable) and lines.setdefault(key, line) != line:
                problem = f"key {key!r} is written twice (lines {lines[key]} and {line}); keep one"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The params file's sections; one outside SECTIONS, an empty one or a key written twice is an error (a typo
    never silently means defaults, nor another value)."""
    try:
        data = _UniqueKeyLoader(read_utf8(path, missing=": run stages from the repository root")).get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LLMError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    if not isinstance(data, dict):
        raise LLMError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    for name, section in data.items():
        if name not in SECTIONS:
            raise LLMError(
                f"{path}: unknown section {name!r}{suggest(str(name), SECTIONS)}; valid sections: {', '.join(SECTIONS)}"
            )
        if section is None:
            raise LLMError(f"{path}: section {name!r} is empty; give its settings, or `{name}: {{}}` for the defaults")
    return data


def params_section(name: str, cls: type[T], params: dict[str, Any] | None = None) -> T:
    """Section `name` as dataclass `cls`. Unknown keys, wrong types and the `train` keys the stage derives itself
    (`cls.derived_train_keys`) are errors naming the key's path, e.g. `params.yaml:pretrain.train.lr`."""
    params = load_params() if params is None else params
    if name not in params:
        raise LLMError(f"{PARAMS_FILE}: section {name!r} is missing")
    section, where = params[name], f"{PARAMS_FILE}:{name}"
    train = section.get("train") if isinstance(section, Mapping) else None
    for key in getattr(cls, "derived_train_keys", ()):
        if isinstance(train, Mapping) and key in train:
            raise LLMError(f"{where}.train.{key} is set by the stage; remove it")
    return from_mapping(cls, section, where=where)


def tokenizer() -> tiktoken.Encoding:
    """GPT-2 BPE from the fetched ranks file, else from llm.tokenizer's own sources (the data mirror, a cache)."""
    return get_tokenizer(RANKS_FILE if RANKS_FILE.is_file() else None)


def checkpoint_dir(stage: str, *identity: Any) -> Path:
    """checkpoints/<stage>/<hash of `identity`> (JSON: params, input hashes): where a rerun of the same resumes."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return CHECKPOINTS / stage / hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def tracked_run(
    stage: str,
    params: Mapping[str, Any],
    checkpoints: Path,
    *upstream: str,
    model: Path,
    registry: "RegistryParams",
    generation: "GenerationConfig | None" = None,
) -> Iterator[Tracker]:
    """The stage's tracked run, `params` logged; the body trains and saves the model folder `model`, which is then
    logged to the run and registered as `registry` says (llm.registry.log_model: a classifier with models/base,
    base and instruct models with `generation` as their default), and `checkpoints` are deleted."""
    with Tracker(stage, upstream=upstream) as tracker:
        tracker.log_params(params)
        yield tracker
        kind = MODEL_KINDS[stage]
        base = BASE_MODEL if kind == "classifier" else None
        registry.log(tracker, kind, model, base_dir=base, tokenizer_file=RANKS_FILE, generation=generation)
    shutil.rmtree(checkpoints, ignore_errors=True)


def summary(stage: str, values: Mapping[str, float], *outs: Path) -> None:
    """Print the stage's one-line result: `stage: name value, ... → out, ...` (floats to 4 significant digits)."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}" for k, v in values.items())
    print(f"{stage}: {shown} → {', '.join(map(str, outs))}")


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main`; an LLMError or an interrupt becomes one line on stderr and exit status 1 (no
    traceback). Then SIGINT and SIGTERM get their default actions back: one arriving during exit kills the
    process (a handler raising `Interrupted` there would print a traceback from an exit hook, with status 0)."""
    try:
        try:
            main()
        finally:
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
    except (LLMError, KeyboardInterrupt) as err:  # llm.errors.Interrupted included; a stray Ctrl-C has no words
        print(f"error: {str(err) or 'stopped by SIGINT'}", file=sys.stderr)
        sys.exit(1)
