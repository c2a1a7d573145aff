"""What a training stage's registered model version records of the pipeline: the kind of model the stage makes,
and what DVC knows of the stage's inputs (as tags: llm/ itself knows nothing of DVC)."""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm.registry import Kind

# The kind of model each training stage saves, as llm.registry logs and registers it in MLflow.
MODEL_KINDS: dict[str, "Kind"] = {"pretrain": "base", "finetune_classifier": "classifier"}
MODEL_KINDS["finetune_instructions"] = "instruct"


def dvc_deps_tags(stage: str) -> dict[str, str]:
    """`dvc.deps.<path>` -> the md5 DVC computes for each file or directory dep of `stage` (what `dvc.lock` records
    once the stage succeeds; a directory's ends in `.dir`); {} without a dvc.yaml, or with a warning if DVC fails."""
    if not Path("dvc.yaml").is_file():
        return {}
    try:
        from dvc.dependency.param import ParamsDependency
        from dvc.repo import Repo

        with Repo(".") as repo:
            (found,) = repo.stage.collect(stage)
            deps = [dep for dep in found.deps if not isinstance(dep, ParamsDependency) and dep.exists]
            return {f"dvc.deps.{dep.def_path}": dep.get_hash().value for dep in deps}
    except Exception as err:  # the tags are extra: the stage's model is logged without them
        print(f"warning: no dvc.deps tags ({type(err).__name__}: {str(err)[:200]})", file=sys.stderr)
        return {}
