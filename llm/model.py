"""GPT-2 style decoder: token + learned position embeddings, pre-LayerNorm blocks with causal SDPA attention
and a tanh-GELU MLP, a final LayerNorm and a (swappable) head. Supports a pre-allocated KV cache and
left-padded batches for incremental decoding.

Shapes: B batch, T new tokens in this call, S = cached + new tokens, C = emb_dim, H heads, D = C // H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import GPTConfig
from llm.errors import LLMError
from llm.losses import linear_cross_entropy

# oneDNN's linear op in this torch build (x86 and arm64 CPU builds have it); used for fp32 inference on CPU
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MATMUL_ATTENTION_SCORES = 2**24  # CPU bf16 causal attention with at most this many scores (B·H·T²) uses matmuls


class KVCache:
    """Keys and values of past tokens for every layer, allocated once for `max_len` positions.

    k, v: (n_layers, B, H, max_len, D). `length` counts filled positions (the same for every row);
    `real` (B, max_len) marks which filled positions hold real tokens (False for left padding) and
    `n_real` (B,) counts them, which gives each row's next position id.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.real = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.n_real = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.has_padding = False
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (the next update overwrites their keys and values)."""
        self.length = length
        self.n_real.copy_(self.real[:, :length].sum(1))
        self.has_padding = not bool(self.real[:, :length].all())

    @torch.compiler.disable  # eager, in place: a compiled graph copied the whole cache for each slice written
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values after the current `length`; return all (B, H, S, D) so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Linear(nn.Linear):
    """nn.Linear with faster fp32 inference on CPU (no autograd, no autocast), where batch-1 decoding is bound by
    reading the weights once per token:
    - eager: oneDNN's linear op instead of the default GEMM. It streams the weights about twice as fast (27
      against 13 GB/s on our CPUs); with more rows it is 10-25% faster.
    - under torch.compile, a single row: (weight * x).sum(-1), which inductor turns into a fused streaming
      dot-product loop, faster still at GPT-2's shapes (24-33 against oneDNN's 21-28 GB/s); F.linear would be
      a GEMM call there (inductor cannot lower the oneDNN op).
    Training, autocast, other dtypes and other devices use F.linear. All agree to fp32 rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        cpu_fp32_inference = (
            x.device.type == "cpu"
            and x.dtype is w.dtype is torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        )
        if cpu_fp32_inference and torch.compiler.is_compiling():
            if x.numel() == self.in_features:  # one row
                y = (w * x.reshape(1, -1)).sum(-1)
                return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)
        elif cpu_fp32_inference and ONEDNN_LINEAR:
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.proj = Linear(config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        """x: (B, T, C); mask: None for plain causal attention, else bool (B|1, 1, T, S), True = attend."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        causal = mask is None and T > 1  # no mask: no past keys (S = T), or a single query that sees them all
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        if causal and not dropout and cpu_bf16 and B * self.n_heads * T * T <= MATMUL_ATTENTION_SCORES:
            y = _causal_attention_by_matmuls(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def _causal_attention_by_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v for (B, H, T, D) q, k, v as two batched matmuls, scores (B·H, T, T).

    The causal mask is an additive -inf bias summed inside the first matmul (baddbmm) and the scale is applied
    to q, so the scores get no extra pass in forward or backward. On CPUs in bf16 this is ~45% faster
    (forward + backward) than the fused SDPA kernel at GPT-2 sizes.
    """
    B, H, T, D = q.shape
    with torch.autocast(q.device.type, enabled=False):  # already bf16; keep the softmax output bf16 too
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        scores = torch.baddbmm(mask, (q * D**-0.5).flatten(0, 1), k.flatten(0, 1).transpose(1, 2))
        return (scores.softmax(dim=-1) @ v.flatten(0, 1)).view(B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.emb_dim, 4 * config.emb_dim)
        self.proj = Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.emb_dim)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.emb_dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class VocabHead(Linear):
    """The language-model output layer: emb_dim -> vocab_size logits, no bias (its weight may be tied)."""

    def __init__(self, emb_dim: int, vocab_size: int) -> None:
        super().__init__(emb_dim, vocab_size, bias=False)


class GPT(nn.Module):
    """The decoder. `lm_head` maps hidden states to vocabulary logits; replace it for other tasks."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.emb_dim)
        self.lm_head: nn.Module = VocabHead(config.emb_dim, config.vocab_size)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Distinct parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def hidden_states(
        self, idx: torch.Tensor, *, cache: KVCache | None = None, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for token ids idx (B, T).

        pad_mask: optional bool (B, T), False marks padding (left padding when decoding with a cache).
        Padded positions attend only to themselves, get no position id and are ignored by real tokens.
        cache: a KVCache; idx then holds only the new tokens, which are appended to it.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise LLMError(f"KV cache holds {cache.max_len} positions; {past} used, {T} more requested")
        seen = cache.n_real[:, None] if cache is not None else 0
        if pad_mask is None:  # positions follow from the shapes alone: no host sync on the hot path
            pos = seen + torch.arange(T, device=idx.device)
            longest = past + T
        else:
            pos = (seen + pad_mask.long().cumsum(1) - 1).clamp(min=0)
            longest = past + T if past + T <= self.config.context_length else int(pos.max()) + 1
        if longest > self.config.context_length:
            raise LLMError(
                f"sequence of {longest} tokens exceeds the model's context_length {self.config.context_length}"
            )
        if cache is not None and not cache.has_padding and T == 1 and (pad_mask is None or bool(pad_mask.all())):
            mask = None  # one new token with no padding anywhere: it may see everything cached
        elif pad_mask is not None or past:
            real = pad_mask if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=idx.device)
            mask = self._attention_mask(real, cache, past)
        else:
            mask = None  # plain causal attention
        if cache is not None:
            if pad_mask is None:
                cache.n_real += T
            else:
                cache.real[:, past : past + T] = pad_mask
                cache.n_real += pad_mask.sum(1)
                cache.has_padding |= not bool(pad_mask.all())
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    @staticmethod
    def _attention_mask(real: torch.Tensor, cache: KVCache | None, past: int) -> torch.Tensor:
        """Bool (B, 1, T, S) mask: causal, no attention to padding, every query sees at least itself."""
        T = real.shape[1]
        keys_real = torch.cat([cache.real[:, :past], real], dim=1) if cache is not None else real
        q_pos = torch.arange(past, past + T, device=real.device)[:, None]
        k_pos = torch.arange(past + T, device=real.device)[None, :]
        mask = (k_pos <= q_pos)[None] & keys_real[:, None, :]  # causal, real keys only
        mask |= k_pos == q_pos  # padded queries attend to themselves (avoids an all-masked row)
        return mask[:, None]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for idx (B, T); with targets (B, T), the mean cross-entropy instead.

        Target positions equal to -100 are ignored in the loss.
        """
        h = self.hidden_states(idx, cache=cache, pad_mask=pad_mask)
        if targets is None:
            return self.lm_head(h)
        if type(self.lm_head) is VocabHead:  # the language-model head (not a replacement): fused loss
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index=-100)
        return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and dtype, for up to `max_len` (default: context) tokens."""
        weight = self.tok_emb.weight
        length = min(max_len or self.config.context_length, self.config.context_length)
        return KVCache(self.config, batch_size, length, weight.device, weight.dtype)
