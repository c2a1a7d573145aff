"""dvc.yaml lists, as each stage's code deps, exactly the modules of `llm/` and `stages/` that `python -m stages.<name>`
imports, transitively (package `__init__.py` files included: importing a module runs them). Found by reading the
import statements (ast; nothing is imported), at any depth in a file, except under `if TYPE_CHECKING:`.

`python tests/test_dvc_deps.py` prints the code deps of every stage; `--write` puts them into dvc.yaml in place of
the listed ones (data deps and comments stay as they are).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm", "stages")


def module_file(module: str) -> Path | None:
    """The file of module `module` (a name in PACKAGES) relative to ROOT, or None if it is not one of ours."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = Path(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if (ROOT / path).is_file():
            return path
    return None


def executed_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` except the body of `if TYPE_CHECKING:` (imports only type checkers see)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            stack += node.orelse
        else:
            stack += ast.iter_child_nodes(node)


def imported_modules(path: Path) -> set[str]:
    """Every module the file at ROOT/`path` imports, with the packages on the way (a.b.c → a, a.b, a.b.c)."""
    package = path.parent.parts  # what `from . import x` is relative to, in a module and in an __init__.py alike
    names: set[str] = set()
    for node in executed_nodes(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[: len(package) - node.level + 1] if node.level else ()
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def code_deps(stage: str) -> list[str]:
    """The files of `llm/` and `stages/` that `python -m stages.<stage>` runs, as posix paths relative to ROOT."""
    seen: set[Path] = set()
    todo = [path for name in ("stages", f"stages.{stage}") if (path := module_file(name))]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [found for name in imported_modules(path) if (found := module_file(name))]
    return sorted((p.as_posix() for p in seen), key=lambda p: (not p.startswith("stages/"), p))


def listed_code_deps(pipeline: dict) -> dict[str, list[str]]:
    """Per stage run as `python -m stages.<name>`: the deps dvc.yaml lists under llm/ and stages/."""
    return {
        spec["cmd"].removeprefix("python -m stages."): [d for d in spec.get("deps", []) if d.startswith(PACKAGES)]
        for spec in pipeline["stages"].values()
        if spec["cmd"].startswith("python -m stages.")
    }


def test_every_stage_lists_exactly_the_modules_it_imports() -> None:
    listed = listed_code_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8")))
    assert set(listed) >= {"fetch", "tokenize", "sample", "pretrain", "finetune_classifier", "evaluate"}
    drift = {}
    for stage, deps in listed.items():
        expected = code_deps(stage)
        missing, extra = sorted(set(expected) - set(deps)), sorted(set(deps) - set(expected))
        if missing or extra:
            drift[stage] = {"missing": missing, "not imported": extra}
    assert not drift, f"dvc.yaml code deps drifted (fix: python tests/test_dvc_deps.py --write): {drift}"


def test_imports_are_found_transitively_and_type_checking_imports_are_not() -> None:
    deps = code_deps("evaluate")
    assert deps[:2] == ["stages/__init__.py", "stages/common.py"]  # the package runs first; then the stage's import
    assert {"llm/__init__.py", "llm/allocator.py", "llm/data/__init__.py", "llm/model.py"} <= set(deps)
    assert "stages/pretrain.py" not in deps  # no stage imports another stage
    assert "llm/cli.py" not in code_deps("fetch")


def rewrite(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml `text` with the code deps of each stage in `deps` replaced by `deps[stage]` (after its data deps)."""
    out, stage, in_deps, indent = [], "", False, ""
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage, in_deps = stripped[:-1], False
        elif stripped == "deps:" and stage in deps:
            in_deps, indent = True, line[: len(line) - len(line.lstrip())] + "  "
            out.append(line)
            continue
        elif in_deps and not stripped.startswith("- "):
            out += [f"{indent}- {dep}\n" for dep in deps[stage]]
            in_deps = False
        if in_deps and stripped.removeprefix("- ").startswith(PACKAGES):
            continue
        out.append(line)
    return "".join(out)


if __name__ == "__main__":
    dvc_yaml = ROOT / "dvc.yaml"
    text = dvc_yaml.read_text(encoding="utf-8")
    expected = {stage: code_deps(stage) for stage in listed_code_deps(yaml.safe_load(text))}
    if sys.argv[1:] == ["--write"]:
        dvc_yaml.write_text(rewrite(text, expected), encoding="utf-8")
    else:
        print(yaml.safe_dump(expected, sort_keys=False), end="")
