"""The kernels behind the model's linear layers, attention and training loss, and the one place each is chosen.

Every choice depends only on device, dtype, autograd/autocast/compile state and shapes, and every kernel computes
what the default computes (to the dtype's rounding; tests/test_speedups.py checks each against the default):

- `linear`: fp32 inference on CPU (no autograd, no autocast), where batch-1 decoding is bound by reading the
  weights once per token, runs oneDNN's linear op when eager; under torch.compile a single row runs
  `(weight * x).sum(-1)`, which inductor fuses into one streaming dot-product loop (inductor cannot lower the
  oneDNN op; F.linear would be a library GEMM call). Everything else is F.linear (bf16 and int8 inference
  replace the linear layers: `llm.quantize`).
- `attention`: causal bf16 attention on CPU without dropout and with at most MATMUL_ATTENTION_SCORES scores
  (B·H·T²) runs as two batched matmuls; everything else is F.scaled_dot_product_attention.
- `lm_loss`: the model's own vocabulary head (a bias-free `Linear`) takes the fused linear + cross-entropy
  (`llm.losses.linear_cross_entropy`, no (B·T, vocab) logits); any replacement head takes the plain logits path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.losses import linear_cross_entropy

# oneDNN's linear op in this torch build (x86 and arm64 CPU builds have it)
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MATMUL_ATTENTION_SCORES = 2**24  # CPU bf16 causal attention with at most this many scores (B·H·T²) uses matmuls


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight.T (out, in) + bias (out,) → (..., out)."""
    cpu_fp32_inference = (
        x.device.type == "cpu"
        and x.dtype is weight.dtype is torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )
    if cpu_fp32_inference and torch.compiler.is_compiling():
        if x.numel() == weight.shape[1]:  # one row
            y = (weight * x.reshape(1, -1)).sum(-1)
            return (y if bias is None else y + bias).view(*x.shape[:-1], -1)
    elif cpu_fp32_inference and ONEDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`. Input (..., in) → output (..., out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, dropout: float, causal: bool
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v → (B, H, T, D) for q (B, H, T, D) and k, v (B, H, S, D).

    mask: None, or bool (B|1, 1, T, S) with True = attend; causal: mask by position instead (then S = T).
    """
    B, H, T, _ = q.shape
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if causal and not dropout and cpu_bf16 and B * H * T * T <= MATMUL_ATTENTION_SCORES:
        return _causal_attention_by_matmuls(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def _causal_attention_by_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q kᵀ / sqrt(D)) v for (B, H, T, D) q, k, v as two batched matmuls, scores (B·H, T, T).

    The causal mask is an additive -inf bias summed inside the first matmul (baddbmm) and the scale is applied
    to q, so the scores get no extra pass in forward or backward.
    """
    B, H, T, D = q.shape
    with torch.autocast(q.device.type, enabled=False):  # already bf16; keep the softmax output bf16 too
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        scores = torch.baddbmm(mask, (q * D**-0.5).flatten(0, 1), k.flatten(0, 1).transpose(1, 2))
        return (scores.softmax(dim=-1) @ v.flatten(0, 1)).view(B, H, T, D)


def lm_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits head(h) (B, T, V) against targets (B, T); targets of -100 are ignored."""
    if isinstance(head, Linear) and head.bias is None:  # the vocabulary head: fused, no (B·T, V) logits
        return linear_cross_entropy(h.flatten(0, 1), head.weight, targets.flatten(), ignore_index=-100)
    return F.cross_entropy(head(h).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
