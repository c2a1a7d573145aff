"""Inference weight formats: a loaded model converted to bfloat16 weights, or its linear layers to int8.

Decoding one sequence at a time reads every weight once per token, so fewer bytes per weight give more tokens/s
(BENCHMARKS.md, Generation, measures how many more and what it costs in quality). Both conversions are for
inference only (no training afterwards), change the model in place and pick kernels for the device the model is
on (convert after moving it):

- dtype `bf16`: every floating-point parameter and buffer in bfloat16, so activations, logits and the KV cache
  are bfloat16 too. On a CPU whose oneDNN does bf16 (AVX-512 and up) every linear layer becomes a
  `PackedLinear`: its weight reordered once into oneDNN's blocked layout, which oneDNN's matrix products
  (AVX-512 BF16 or AMX where the CPU has them) stream faster than F.linear's row-major weight.
- quantize `int8`: every linear layer (`nn.Linear`, the vocabulary head included) becomes an `Int8Linear`: int8
  weights (out, in) and one scale per output row, symmetric (weight ≈ int8 · scale, |int8| <= 127). Embeddings,
  layer norms and activations stay in `dtype`, which defaults to fp32 where fbgemm multiplies (x86 CPUs) and to
  bf16 elsewhere (see `resolve_format`). Which kernel multiplies depends on the device and the number of input
  rows (see `Int8Linear`).

fp32 without quantization (the defaults) leaves the model as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm.errors import LLMError
from llm.kernels import ONEDNN_LINEAR

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZATIONS = ("int8",)
FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines  # x86 CPU builds
ONEDNN_BF16 = ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 kernels on this CPU
# Int8Linear's inputs with at least this many rows convert the weights for one GEMM, by the kernel that would
# take fewer: from there on that kernel runs out of compute before memory (BENCHMARKS.md, Generation)
GEMM_ROWS = {"fbgemm": 128, "int8pack": 16}


class Int8Linear(nn.Module):
    """A linear layer with int8 weights: y = (x @ int8ᵀ) · scale + bias. Input (..., in) → output (..., out).

    weight: int8 (out, in); scale: (out,) in the activations' dtype; bias: (out,) or None.

    Fewer than GEMM_ROWS rows (decoding, small prompts) go through an int8 kernel: on an x86 CPU fbgemm's dynamic
    int8 GEMM (`quantized.linear_dynamic`, weights and bias packed once at conversion), which also rounds each
    input row to 7 bits on the fly (one scale per call: rows are first brought to the same largest magnitude, so a
    row's rounding does not depend on the others) and sums int8 products in int32; elsewhere PyTorch's weight-only
    `aten._weight_int8pack_mm` (CPU, CUDA, MPS). More rows convert the int8 weights to the activations' dtype for
    one F.linear GEMM, weight-only.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.packed = _fbgemm_pack(self.weight, scale, self.bias) if _fbgemm_on(self.weight.device) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.packed is not None and rows < GEMM_ROWS["fbgemm"] and x.device.type == "cpu":
            return _fbgemm_linear(x, self.packed, self.bias, rows)
        if self.packed is None and rows < GEMM_ROWS["int8pack"]:
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(rows, -1).contiguous(), self.weight, self.scale.to(x.dtype)
            )
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}"


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """fbgemm's packed form of int8 weights (out, in) with per-row fp32 scales (out,) and bias (out,) or None."""
    zero_points = torch.zeros(len(scale), dtype=torch.long)
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():  # torch deprecates quantized tensors, which are only the way in here
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero_points, 0)
    try:
        torch.backends.quantized.engine = "fbgemm"
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
    finally:
        torch.backends.quantized.engine = engine


def _fbgemm_linear(x: torch.Tensor, packed: torch.ScriptObject, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x (..., in) of `rows` rows times fbgemm-packed int8 weights, plus their packed `bias` → (..., out), in x's
    dtype. fbgemm rounds its input to 7 bits with one scale for all rows: several rows are first divided by their
    largest magnitudes (and the products multiplied back, the bias kept out of that), so each row's rounding is
    relative to itself, whatever the others hold."""
    x32 = x.float()
    if rows == 1:
        return torch.ops.quantized.linear_dynamic(x32, packed, True).to(x.dtype)
    magnitude = x32.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    y = torch.ops.quantized.linear_dynamic(x32 / magnitude, packed, True)
    if bias is None:
        return (y * magnitude).to(x.dtype)
    bias = bias.float()
    return ((y - bias) * magnitude + bias).to(x.dtype)


class PackedLinear(nn.Module):
    """A CPU linear layer whose weight oneDNN has reordered for its own matrix products (inference only).
    Input (..., in) → output (..., out), in the weight's dtype.

    packed: the weight (out, in) in oneDNN's blocked layout (an opaque `torch._mkldnn` tensor: not in the
    state dict, CPU only); bias: (out,) or None.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # laid out for 1 row
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def resolve_format(dtype: str | None, quantize: str | None, device: torch.device | str) -> tuple[str, str | None]:
    """(dtype, quantize) checked, with dtype's default filled in for a model on `device`: fp32, except with int8
    where fbgemm does not multiply (other than x86 CPUs): bf16, the activations `aten._weight_int8pack_mm` is made
    for."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise LLMError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZATIONS)} (or none)")
    if dtype is None:
        dtype = "bf16" if quantize and not _fbgemm_on(torch.device(device)) else "fp32"
    if dtype not in DTYPES:
        raise LLMError(f"unknown inference dtype {dtype!r}: choose {', '.join(DTYPES)}")
    return dtype, quantize


def _fbgemm_on(device: torch.device) -> bool:
    """Whether Int8Linear multiplies with fbgemm on `device`."""
    return FBGEMM and device.type == "cpu"


@torch.no_grad()
def for_inference(model: nn.Module, dtype: str | None = None, quantize: str | None = None) -> nn.Module:
    """`model` (in eval mode) with its weights in `dtype` (fp32, bf16; default: see `resolve_format`) and, with
    quantize="int8", every `nn.Linear` replaced by an `Int8Linear`; bf16 alone on a CPU with oneDNN's bf16 kernels
    replaces them by `PackedLinear`s. Converts in place and returns the model."""
    device = next(model.parameters()).device
    dtype, quantize = resolve_format(dtype, quantize, device)
    torch_dtype = DTYPES[dtype]
    if quantize == "int8":
        _replace_linears(model, lambda linear: Int8Linear(linear, torch_dtype))
    if torch_dtype is not torch.float32:
        model.to(torch_dtype)  # leaves the int8 weights alone: .to(dtype) converts floating-point tensors only
    if dtype == "bf16" and not quantize and ONEDNN_BF16 and device.type == "cpu":
        _replace_linears(model, PackedLinear)
    return model.eval()


def _replace_linears(model: nn.Module, new: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every `nn.Linear` of `model` by new(linear)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new(linear))
