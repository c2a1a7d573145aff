"""Model FLOPs per trained token, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

from torch import nn

from llm.config import GPTConfig


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention (PaLM appendix B)."""
    n_params = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    attention = 12 * config.n_layers * config.emb_dim * seq_len if isinstance(config, GPTConfig) else 0
    return 6.0 * n_params + attention
