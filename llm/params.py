"""Read a YAML params file strictly: a key written twice is an error with both line numbers, a section outside the
known names or an empty one is an error, and a section parses into a typed dataclass (llm.config.from_mapping) with
errors naming the full key path, e.g. `params.yaml:pretrain.train.lr`."""

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llm.config import from_mapping, suggest
from llm.errors import LLMError
from llm.io import read_utf8

T = TypeVar("T")


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


def read_params(path: Path, sections: Sequence[str]) -> dict[str, Any]:
    """The params file's sections; one outside `sections`, an empty one or a key written twice is an error (a typo
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
        if name not in sections:
            raise LLMError(
                f"{path}: unknown section {name!r}{suggest(str(name), sections)}; valid sections: {', '.join(sections)}"
            )
        if section is None:
            raise LLMError(f"{path}: section {name!r} is empty; give its settings, or `{name}: {{}}` for the defaults")
    return data


def read_section(params: Mapping[str, Any], name: str, cls: type[T], path: Path) -> T:
    """Section `name` of `params` (read from `path`) as dataclass `cls`. Unknown keys, wrong types and the `train`
    keys the caller derives itself (`cls.derived_train_keys`) are errors naming the key's path."""
    if name not in params:
        raise LLMError(f"{path}: section {name!r} is missing")
    section, where = params[name], f"{path}:{name}"
    train = section.get("train") if isinstance(section, Mapping) else None
    for key in getattr(cls, "derived_train_keys", ()):
        if isinstance(train, Mapping) and key in train:
            raise LLMError(f"{where}.train.{key} is set by the stage; remove it")
    return from_mapping(cls, section, where=where)
