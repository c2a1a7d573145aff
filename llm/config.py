"""Model configuration: the `GPTConfig` dataclass, named presets, and strict construction from mappings."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from llm.errors import LLMError

T = TypeVar("T")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 style decoder.

    vocab_size: number of real token ids (50,257 for GPT-2 BPE).
    context_length: maximum sequence length in tokens (size of the positional embedding).
    emb_dim: width of the residual stream; n_heads must divide it.
    n_heads, n_layers: attention heads per block, number of transformer blocks.
    dropout: dropout probability on embeddings, attention weights and residual branches, in [0, 1).
    qkv_bias: whether the query/key/value projections have a bias (True for OpenAI's GPT-2).
    tie_weights: share the token embedding matrix with the LM head (True for OpenAI's GPT-2).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LLMError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise LLMError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise LLMError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LLMError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)


# OpenAI's GPT-2 family (Radford et al. 2019) and small presets that train in minutes on a laptop CPU.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
    "cpu-small": GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4),
    "cpu-tiny": GPTConfig(context_length=128, emb_dim=64, n_heads=2, n_layers=2),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """Return the preset `name`, optionally with some fields replaced (e.g. `dropout=0.1`)."""
    if name not in PRESETS:
        raise LLMError(f"unknown model preset {name!r}{suggest(name, PRESETS)}; valid: {', '.join(PRESETS)}")
    return from_mapping(GPTConfig, {**PRESETS[name].to_dict(), **overrides}, where=f"preset {name}")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str, base: T | None = None) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys, wrong types and bad values with a message
    that starts with `where` (e.g. `params.yaml:pretrain`). No integer setting may be negative, and no
    `*batch_size` zero.

    Keys missing from `data` keep the value in `base`, else the field's default. A nested dataclass field given
    in part keeps the rest from that field's own default (so `generation: {max_new_tokens: 4}` keeps a
    section's greedy `temperature: 0`). Ints are accepted where floats are expected.
    """
    if not isinstance(data, Mapping):
        raise LLMError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        raise LLMError(f"{where}: unknown key {key!r}{suggest(str(key), fields)}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        hint, default = hints[key], getattr(base, key) if base is not None else _field_default(fields[key])
        if dataclasses.is_dataclass(hint) and dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            values[key] = from_mapping(hint, value, f"{where}.{key}", base=default)  # type: ignore[arg-type]
        else:
            values[key] = _coerce(value, hint, f"{where}.{key}")
        if key.endswith("batch_size") and isinstance(values[key], int) and values[key] < 1:
            raise LLMError(f"{where}: {key} must be at least 1, got {values[key]}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)  # type: ignore[type-var]
    except (LLMError, ValueError, TypeError) as err:
        raise LLMError(f"{where}: {err}") from err


def _field_default(field: dataclasses.Field[Any]) -> Any:
    """The value a dataclass field gets when it is not given (None when it is required)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except LLMError as err:
                errors.append(str(err))
        raise LLMError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise LLMError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise LLMError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict and not isinstance(value, Mapping):
        raise LLMError(f"{where}: expected a mapping of settings, got {value!r}")
    if origin is dict or hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LLMError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LLMError(f"{where}: expected an integer, got {value!r}")
    if hint is int and value < 0:  # counts, sizes, steps, seeds: no setting takes a negative number
        raise LLMError(f"{where} must be >= 0, got {value!r}")
    if hint in (bool, str) and not isinstance(value, hint):
        raise LLMError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
