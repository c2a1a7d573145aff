"""What the stages share: the pipeline's paths, typed params sections, the tokenizer, a tracked training run with
resumable checkpoints, the one-line summary and clean errors. Kept light (no torch): every stage depends on it."""

import hashlib
import json
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import tiktoken

from llm.errors import LLMError
from llm.io import after_commit, as_written, outputs_together
from llm.params import read_params, read_section
from llm.signals import STOP_SIGNALS
from llm.tokenizer import get_tokenizer
from llm.tracking import Tracker
from stages.lineage import MODEL_KINDS, dvc_deps_tags

if TYPE_CHECKING:
    from llm.generate import GenerationConfig
    from llm.registry import RegistryParams

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")
# Every top-level section some stage reads; any other name (a typo such as `pretrian:`) is an error.
SECTIONS = "data", "tokenize", "sample", "model", "pretrain", "finetune_classifier", "finetune_instructions", "evaluate"

# Files that one stage writes and another reads (dvc.yaml declares them as outs and deps).
RAW, WINDOWS, RANKS_FILE = Path("data/raw"), Path("data/windows"), Path("data/raw/tokenizer/r50k_base.tiktoken")
BASE_MODEL, INSTRUCT_MODEL = Path("models/base"), Path("models/instruct")
RESPONSES, CLASSIFIER_METRICS = Path("reports/responses.json"), Path("metrics/finetune_classifier.json")
CHECKPOINTS = Path("checkpoints")  # checkpoints/<stage>/<key>/: git-ignored, never a DVC out (DVC never deletes them)


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The params file's sections (llm.params.read_params: only SECTIONS, none empty, no key written twice)."""
    return read_params(path, SECTIONS)


def params_section(name: str, cls: type[T], params: dict[str, Any] | None = None) -> T:
    """Section `name` as dataclass `cls` (llm.params.read_section), e.g. errors at `params.yaml:pretrain.train.lr`."""
    return read_section(load_params() if params is None else params, name, cls, PARAMS_FILE)


def tokenizer() -> tiktoken.Encoding:
    """GPT-2 BPE from the fetched ranks file, else from llm.tokenizer's own sources (the data mirror, a cache)."""
    return get_tokenizer(RANKS_FILE if RANKS_FILE.is_file() else None)


def checkpoint_dir(stage: str, *identity: Any) -> Path:
    """checkpoints/<stage>/<hash of `identity`> (JSON: params, input hashes): where a rerun of the same resumes."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return CHECKPOINTS / stage / hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def tracked_run(
    stage: str, params: Mapping[str, Any], checkpoints: Path, *upstream: str, model: Path, registry: "RegistryParams",
    generation: "GenerationConfig | None" = None,
) -> Iterator[Tracker]:
    """The stage's tracked run, `params` logged; the body trains and saves the model folder `model`, which is then
    logged to the run and registered as `registry` says (llm.registry.log_model: a classifier with models/base,
    base and instruct models with `generation` as their default; tagged with dvc_deps_tags), and `checkpoints` are
    deleted once the stage's outputs are in place."""
    with Tracker(stage, upstream=upstream) as tracker:
        tracker.log_params(params)
        yield tracker
        kind, tags = MODEL_KINDS[stage], dvc_deps_tags(stage) if registry.log_model else {}  # for the registry
        base = BASE_MODEL if kind == "classifier" else None
        with as_written(model) as new:  # the new model, which takes its place when the stage ends
            registry.log(tracker, kind, new, base_dir=base, tokenizer_file=RANKS_FILE, generation=generation, tags=tags)
    after_commit(lambda: shutil.rmtree(checkpoints, ignore_errors=True))


def summary(stage: str, values: Mapping[str, float], *outs: Path) -> None:
    """Print the stage's one-line result: `stage: name value, ... → out, ...` (floats to 4 significant digits)."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}" for k, v in values.items())
    print(f"{stage}: {shown} → {', '.join(map(str, outs))}")


def run(main: Callable[[], None]) -> None:
    """Run a stage's `main`; an LLMError or an interrupt is one line on stderr and exit status 1 (no traceback).
    Then SIGINT and SIGTERM get their default actions back: one arriving during exit kills the process."""
    try:
        try:
            with outputs_together():  # every output of the stage changes at once, at the end, and only on success
                main()
        finally:
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
    except (LLMError, KeyboardInterrupt) as err:  # llm.errors.Interrupted included; a stray Ctrl-C has no words
        print(f"error: {str(err) or 'stopped by SIGINT'}", file=sys.stderr)
        sys.exit(1)
