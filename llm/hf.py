"""OpenAI GPT-2 weights in the Hugging Face layout: import (local directory or hub name) and export.

The HF layout is a directory with `config.json` (GPT2Config fields) and `model.safetensors` (or shards
listed in `model.safetensors.index.json`). Its Conv1D weights are stored (in, out), the transpose of our
nn.Linear (out, in); `c_attn` fuses query, key and value exactly like our `qkv`. Tensor names may carry
a `transformer.` prefix; the causal-mask buffers `attn.bias` / `attn.masked_bias` are ignored. Only
safetensors are read (never pickles). `transformers` itself is not needed; `huggingface_hub` is imported
only to download.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm.config import GPTConfig
from llm.errors import LLMError
from llm.io import PathLike, read_json, sha256_file, write_json
from llm.model import GPT
from llm.model_dir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_model,
    model_from_state,
    read_safetensors,
    write_safetensors,
)
from llm.tokenizer import EOT_ID

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_ORG = "openai-community"
INDEX_FILE = "model.safetensors.index.json"
_HF_PREFIX = "transformer."  # GPT2LMHeadModel's body; OpenAI's hub files omit it
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our model uses


def load_any(name_or_dir: PathLike, *, device: torch.device | str | None = None) -> GPT:
    """A GPT from our model directory, a local HF GPT-2 directory, or a hub name (`gpt2`, `gpt2-medium`, ...)."""
    path = Path(name_or_dir)
    if path.is_dir() and "model" in read_json(path / CONFIG_FILE):
        return load_model(path, device=device)
    return import_hf(name_or_dir, device=device)


def import_hf(src: PathLike, *, device: torch.device | str | None = None) -> GPT:
    """OpenAI GPT-2 from a local HF directory or a hub name (downloaded once, then cached), in eval mode."""
    directory = _resolve(src)
    hf_config = read_json(directory / CONFIG_FILE)
    config = _config_from_hf(hf_config, where=str(directory / CONFIG_FILE))
    files = _weight_files(directory)
    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        hf_state |= {k.removeprefix(_HF_PREFIX): v for k, v in read_safetensors(file, device).items()}
    source = str(files[0] if len(files) == 1 else directory / INDEX_FILE)
    names = _hf_names(config)
    wanted = set(names.values())
    missing = sorted(wanted - hf_state.keys())
    unexpected = sorted(k for k in hf_state.keys() - wanted if not _IGNORED.search(k) and k != "lm_head.weight")
    if missing or unexpected:
        raise LLMError(f"{source} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    state = {ours: _convert(ours, hf_state.pop(hf)) for ours, hf in names.items()}  # pop: one copy at a time
    return model_from_state(config, state, source=source)


def export_hf(model: GPT, out_dir: PathLike) -> None:
    """Write `model` as an HF GPT-2 directory that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None or head.out_features != model.config.vocab_size:
        raise LLMError("export_hf needs a language-model head (Linear emb_dim -> vocab_size without bias)")
    config = model.config
    tied = head.weight is model.tok_emb.weight
    state = model.state_dict()
    if not config.qkv_bias:  # HF's Conv1D always has a bias: zeros compute the same function
        for i in range(config.n_layers):
            state[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * config.emb_dim, dtype=head.weight.dtype)
    names = _hf_names(config.replace(tie_weights=tied, qkv_bias=True))
    differing = sorted((set(state) ^ set(names)) - {"lm_head.weight"})
    if differing:
        raise LLMError(f"export_hf supports plain GPT models only (merge adapters first); differing: {differing[:3]}")
    tensors = {
        hf if hf == "lm_head.weight" else _HF_PREFIX + hf: _convert(ours, state[ours]) for ours, hf in names.items()
    }
    write_safetensors(Path(out_dir) / WEIGHTS_FILE, tensors)
    write_json(Path(out_dir) / CONFIG_FILE, _config_to_hf(config, tied, head.weight.dtype))


def hub_repo(name: str) -> str | None:
    """`openai-community/<name>` for a known GPT-2 hub name (with or without the org), else None."""
    base = name.removeprefix(f"{HUB_ORG}/")
    return f"{HUB_ORG}/{base}" if base in HUB_MODELS else None


def _resolve(src: PathLike) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    repo = hub_repo(str(src))
    if repo is None:
        raise LLMError(f"{src} is neither a model directory nor a known hub name ({', '.join(HUB_MODELS)})")
    return _download(repo)


def _download(repo: str) -> Path:
    """The cached snapshot directory of `repo` holding config.json and model.safetensors; fetched if missing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot(local_files_only: bool) -> Path:
        paths = [hf_hub_download(repo, name, local_files_only=local_files_only) for name in (CONFIG_FILE, WEIGHTS_FILE)]
        check_hub_blob(Path(paths[-1]))
        return Path(paths[-1]).parent

    try:  # cached files need no network (OpenAI's GPT-2 weights never change)
        return snapshot(local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # one error line below instead of a warning per connection retry
    try:
        return snapshot(local_files_only=False)
    except LLMError:
        raise
    except Exception as err:  # the hub raises many types (HTTP, offline, connection, cache errors)
        raise LLMError(
            f"could not download {repo} from the Hugging Face hub ({type(err).__name__}); "
            "offline? pass a local directory holding config.json and model.safetensors"
        ) from err
    finally:
        hub_log.setLevel(level)


def check_hub_blob(path: Path) -> None:
    """Check a file of the Hugging Face cache against the sha256 the hub served it under (every load, cached or not).

    The cache stores a large (LFS) file as `blobs/<sha256 of its content>` and links the snapshot's file to it, so
    a download that was cut short or altered, or a cache file damaged since, is caught before it is read. This
    trusts the hub's own hash (fetched over HTTPS); it is not a pin chosen by us (SECURITY.md, finding 1).
    """
    blob = path.resolve().name
    if not _SHA256.fullmatch(blob):  # a cache without symlinks (e.g. on Windows) keeps no hash to check against
        print(f"warning: {path} is not checked: the Hugging Face cache holds no sha256 for it", file=sys.stderr)
        return
    actual = sha256_file(path)
    if actual != blob:
        raise LLMError(
            f"{path} does not match the sha256 the Hugging Face hub gave for it (expected {blob}, got {actual}): "
            f"delete {path.resolve()} and download again"
        )


def _weight_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / INDEX_FILE).is_file():
        weight_map = read_json(directory / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LLMError(f"{directory / INDEX_FILE} has no 'weight_map'")
        return [directory / name for name in sorted(set(weight_map.values()))]
    raise LLMError(f"{directory} has no {WEIGHTS_FILE} (only safetensors weights are read, never pickles)")


def _config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """Our GPTConfig for an HF GPT2Config dict; variants our model does not compute are refused."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise LLMError(f"{where}: model_type {hf['model_type']!r} is not gpt2")
    n_embd = hf.get("n_embd", 768)
    checks = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", _LAYER_NORM_EPS), (_LAYER_NORM_EPS,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for key, (value, supported) in checks.items():
        if value not in supported:
            raise LLMError(f"{where}: {key}={value!r} is not supported (supported: {supported})")
    try:
        return _gpt_config(hf)
    except LLMError as err:
        raise LLMError(f"{where}: {err}") from err


def _gpt_config(hf: dict[str, Any]) -> GPTConfig:
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        emb_dim=hf.get("n_embd", 768),
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        dropout=hf.get("resid_pdrop", 0.1),
        qkv_bias=True,
        tie_weights=hf.get("tie_word_embeddings", True),
    )


def _config_to_hf(config: GPTConfig, tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    eot = EOT_ID if config.vocab_size > EOT_ID else None  # GPT-2 BPE's <|endoftext|>, when the vocab has it
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": _LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _hf_names(config: GPTConfig) -> dict[str, str]:
    """Our tensor names -> HF names (without the `transformer.` prefix) for a model of shape `config`."""
    names = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight"}
    blocks = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2"}
    blocks |= {"mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(config.n_layers):
        for ours, hf in blocks.items():
            for param in ("weight", "bias"):
                if ours != "attn.qkv" or param == "weight" or config.qkv_bias:
                    names[f"blocks.{i}.{ours}.{param}"] = f"h.{i}.{hf}.{param}"
    names |= {"ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
    if not config.tie_weights:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _is_conv1d(name: str) -> bool:
    """Whether our tensor `name` is a Linear weight that HF stores transposed as a Conv1D weight."""
    return name.startswith("blocks.") and name.endswith(".weight") and ".ln" not in name


def _convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our tensor `name` in the other layout (the Conv1D/Linear transpose is its own inverse)."""
    return tensor.t().contiguous() if _is_conv1d(name) else tensor
