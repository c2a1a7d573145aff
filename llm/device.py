"""Where and in which precision to compute: device choice (cuda, mps, cpu) and the autocast dtype.

Precision names: "fp32" (no autocast), "bf16" (bfloat16 autocast, fp32 weights and optimizer), "fp16" (float16
autocast with a gradient scaler; CUDA only) and "auto": bf16 on CUDA GPUs that support it, else fp16; bf16 on
CPUs with native bfloat16 dot products (AVX512-BF16 or AMX), where it trains faster than fp32 at equal loss
(see BENCHMARKS.md); fp32 elsewhere (MPS and older CPUs).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch

from llm.errors import LLMError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for `name` ("auto", "cpu", "cuda", "cuda:1", "mps"); "auto" prefers cuda, then mps.

    A bare "cuda" becomes `cuda:<local_rank>` so each process of a multi-GPU run takes its own GPU. A device this
    machine cannot allocate on is an LLMError.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise LLMError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMError(f"device {name!r} requested but CUDA is not available on this machine")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LLMError(f"device {name!r} requested but MPS is not available on this machine")
    try:
        torch.empty(0, device=device)  # e.g. a GPU index this machine lacks
    except (RuntimeError, AssertionError) as err:
        raise LLMError(f"device {name!r} is not usable here ({str(err).splitlines()[0]})") from err
    return device


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision not in DTYPES:
        raise LLMError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise LLMError(f"precision fp16 needs a CUDA GPU (device is {device}); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LLMError("this GPU has no bfloat16 support; use precision fp16 (with loss scaling) or fp32")
    return DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """Autocast to `dtype` on `device`; a no-op context for fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (Linux: AVX512-BF16 or AMX-BF16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
