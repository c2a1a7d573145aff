"""GPT-2 style decoder: token + learned position embeddings, pre-LayerNorm blocks with causal SDPA attention
and a tanh-GELU MLP, a final LayerNorm and a (swappable) head. Supports a pre-allocated KV cache and
left-padded batches for incremental decoding. The kernels computing the linear layers, attention and the
training loss are chosen in `llm.kernels`.

Shapes: B batch, T new tokens in this call, S = cached + new tokens, C = emb_dim, H heads, D = C // H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import GPTConfig
from llm.errors import LLMError
from llm.kernels import Linear, attention, lm_loss


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p is 0 (the same outputs, one less op per call when decoding)."""
    return nn.Dropout(p) if p else nn.Identity()


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
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        causal = mask is None and T > 1  # no mask: no past keys (S = T), or a single query that sees them all
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attention(q, k, v, mask, dropout=self.dropout if self.training else 0.0, causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


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
        self.drop = dropout_layer(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """The decoder. `lm_head` maps hidden states to vocabulary logits (no bias; its weight may be tied to the
    token embedding); replace it for other tasks."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop = dropout_layer(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.emb_dim)
        self.lm_head: nn.Module = Linear(config.emb_dim, config.vocab_size, bias=False)
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
        Padded positions attend only to themselves, get no position id of their own and are ignored by real tokens.
        cache: a KVCache; idx then holds only the new tokens, which are appended to it.
        """
        T = idx.shape[1]
        if cache is not None:
            pos, mask = cache.append(pad_mask, T)
        else:
            pos = _positions(0, pad_mask, T, idx.device)
            context = self.config.context_length
            longest = T if pad_mask is None or context >= T else int(pos.max()) + 1  # left padding takes no position
            if longest > context:
                raise LLMError(f"sequence of {longest} tokens exceeds the model's context_length {context}")
            mask = None if pad_mask is None else _attention_mask(pad_mask, T)  # None: plain causal attention
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer)
        return self.ln_f(x)

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
        return self.lm_head(h) if targets is None else lm_loss(self.lm_head, h, targets)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and dtype, for up to `max_len` (default: context) tokens."""
        weight = self.tok_emb.weight
        length = min(max_len or self.config.context_length, self.config.context_length)
        return KVCache(self.config, batch_size, length, weight.device, weight.dtype)


class KVCache:
    """Keys and values of past tokens for every layer, allocated once for `max_len` (<= context_length) positions.

    k, v: (n_layers, B, H, max_len, D). `length` counts filled positions (the same for every row);
    `real` (B, max_len) marks which filled positions hold real tokens (False for left padding) and
    `n_real` (B,) counts them, which gives each row's next position id.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        if max_len > config.context_length:
            raise LLMError(f"a KV cache of {max_len} positions exceeds context_length {config.context_length}")
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

    def append(self, pad_mask: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Take T new tokens (pad_mask: bool (B, T), False = padding; None: all real) after the filled positions.

        Returns their position ids (B, T) and the attention mask of their queries: None when one new token
        with no padding anywhere (it sees everything) or plain causal attention, else bool (B, 1, T, S).
        """
        past = self.length
        if past + T > self.max_len:
            raise LLMError(f"KV cache holds {self.max_len} positions; {past} used, {T} more requested")
        pos = _positions(self.n_real[:, None], pad_mask, T, self.n_real.device)
        if not self.has_padding and T == 1 and (pad_mask is None or bool(pad_mask.all())):
            mask = None  # one new token with no padding anywhere: it may see everything cached
        elif pad_mask is not None or past:
            real = pad_mask if pad_mask is not None else torch.ones_like(self.real[:, :T])
            mask = _attention_mask(torch.cat([self.real[:, :past], real], dim=1), T)
        else:
            mask = None  # plain causal attention
        if pad_mask is None:
            self.n_real += T
        else:
            self.real[:, past : past + T] = pad_mask
            self.n_real += pad_mask.sum(1)
            self.has_padding |= not bool(pad_mask.all())
        self.length += T
        return pos, mask

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (the next update overwrites their keys and values)."""
        self.length = length
        self.n_real.copy_(self.real[:, :length].sum(1))
        self.has_padding = not bool(self.real[:, :length].all())

    @torch.compiler.disable  # eager, in place: a compiled graph copied the whole cache for each slice written
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the (B, H, T, D) keys/values of the T tokens last appended; return all (B, H, S, D) so far."""
        start, end = self.length - k.shape[2], self.length
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


def _positions(seen: torch.Tensor | int, pad_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """Position ids of T new tokens after `seen` (int, or (B, 1)) real ones: (T,) or (B, T); padding repeats
    the previous real token's (or 0)."""
    if pad_mask is None:  # positions follow from the shapes alone: no host sync on the hot path
        return seen + torch.arange(T, device=device)
    return (seen + pad_mask.long().cumsum(1) - 1).clamp(min=0)


def _attention_mask(keys_real: torch.Tensor, T: int) -> torch.Tensor:
    """Bool (B, 1, T, S) mask of the last T of S positions (keys_real (B, S), False = padding): causal, no
    attention to padding, every query sees at least itself."""
    S = keys_real.shape[1]
    q_pos = torch.arange(S - T, S, device=keys_real.device)[:, None]
    k_pos = torch.arange(S, device=keys_real.device)[None, :]
    mask = (k_pos <= q_pos)[None] & keys_real[:, None, :]  # causal, real keys only
    mask |= k_pos == q_pos  # padded queries attend to themselves (avoids an all-masked row)
    return mask[:, None]
