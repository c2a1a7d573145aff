"""Inference weight formats: a loaded model converted to bfloat16 weights, or its linear layers to int8.

Decoding one sequence at a time reads every weight once per token, so fewer bytes per weight give more tokens/s
(BENCHMARKS.md, Generation, measures how many more and what it costs in quality). Both conversions are for
inference only (no training afterwards) and change the model in place:

- dtype `bf16`: every floating-point parameter and buffer in bfloat16, so activations, logits and the KV cache
  are bfloat16 too.
- quantize `int8`: weight-only quantization of every linear layer (`nn.Linear`, the vocabulary head included):
  int8 weights (out, in) and one scale per output row, symmetric (weight ≈ int8 · scale, |int8| <= 127), computed
  by PyTorch's `aten._weight_int8pack_mm` (kernels on CPU, CUDA and MPS) for up to GEMM_ROWS - 1 rows (decoding);
  from GEMM_ROWS rows on (a prompt, a large batch), where that kernel runs out of compute before memory, the
  weights are converted to the activations' dtype for one F.linear GEMM and its output scaled. Embeddings, layer
  norms and activations stay in `dtype`, which defaults to bf16 with int8: the CPU kernel is made for bfloat16
  activations.

fp32 without quantization (the defaults) leaves the model as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.errors import LLMError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZATIONS = ("int8",)
GEMM_ROWS = 16  # Int8Linear's inputs with at least this many rows convert the weights for one GEMM


class Int8Linear(nn.Module):
    """A linear layer with int8 weights: y = (x @ int8ᵀ) · scale + bias. Input (..., in) → output (..., out).

    weight: int8 (out, in); scale: (out,) in the activations' dtype; bias: (out,) or None.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = x.reshape(-1, x.shape[-1]), self.scale.to(x.dtype)
        if rows.shape[0] >= GEMM_ROWS:
            y = F.linear(rows, self.weight.to(x.dtype)) * scale
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight, scale)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}"


def resolve_format(dtype: str | None, quantize: str | None) -> tuple[str, str | None]:
    """(dtype, quantize) checked, with dtype's default filled in: bf16 with quantize int8, else fp32."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise LLMError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZATIONS)} (or none)")
    if dtype is None:
        dtype = "bf16" if quantize else "fp32"
    if dtype not in DTYPES:
        raise LLMError(f"unknown inference dtype {dtype!r}: choose {', '.join(DTYPES)}")
    return dtype, quantize


@torch.no_grad()
def for_inference(model: nn.Module, dtype: str | None = None, quantize: str | None = None) -> nn.Module:
    """`model` (in eval mode) with its weights in `dtype` (fp32, bf16; default: see `resolve_format`) and, with
    quantize="int8", every `nn.Linear` replaced by an `Int8Linear`. Converts in place and returns the model."""
    dtype, quantize = resolve_format(dtype, quantize)
    torch_dtype = DTYPES[dtype]
    if quantize == "int8":
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in linears:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear(linear, torch_dtype))
    if torch_dtype is not torch.float32:
        model.to(torch_dtype)  # leaves the int8 weights alone: .to(dtype) converts floating-point tensors only
    return model.eval()
