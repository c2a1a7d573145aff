"""Fused linear + cross-entropy: the language-model loss without materializing the (N, vocab) fp32 logits.

The output layer dominates a small GPT's training step: for N = B·T tokens and a 50,257-way vocabulary the
plain path writes the logits, copies them to fp32, takes a log-softmax, and in backward walks tensors of the
same size three more times. Here rows are processed in chunks: a chunk's logits become probabilities in one
softmax, which give the loss and, in the same pass, the gradient (softmax - one-hot), multiplied at once into
the gradients of the hidden states and of the weight. Nothing of size N x V outlives a chunk and backward is a
scalar multiply. The vocabulary is zero-padded to a multiple of `PAD_VOCAB` for the matmuls (odd sizes such as
50,257 run markedly slower); padded columns get -inf logits, so no probability and no gradient.
The FLOPs are those of the plain path: three N x C x V matmuls.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

PAD_VOCAB = 64  # matmuls see the vocabulary rounded up to a multiple of this
CHUNK_ELEMENTS = 2**25  # logits per chunk (rows = CHUNK_ELEMENTS // padded vocab): 128 MB of fp32 probabilities


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` against `targets`, as `F.cross_entropy` computes it.

    h: (N, C) hidden states; weight: (V, C) output layer without bias; targets: (N,) class ids, positions equal
    to `ignore_index` excluded from the mean (nan when all are). Under autocast the matmuls run in the autocast
    dtype and the softmax in fp32, like the plain autocast path. chunk_rows: rows per chunk (default from
    CHUNK_ELEMENTS). Returns a scalar (fp32, or fp64 for fp64 inputs); gradients flow to h and weight.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    padded = -(-weight.shape[0] // PAD_VOCAB) * PAD_VOCAB
    rows = chunk_rows or _balanced_rows(h.shape[0], max(1, CHUNK_ELEMENTS // padded))
    needs = (torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, padded, rows, dtype, needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass; backward scales the stored gradients by grad_output."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        padded: int,
        chunk_rows: int,
        dtype: torch.dtype,
        needs: tuple[bool, bool],
    ) -> torch.Tensor:
        vocab = weight.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # softmax and loss precision: fp32 (fp64 for fp64 inputs)
        x = h.to(dtype)
        w = weight.new_empty((padded, weight.shape[1]), dtype=dtype) if padded != vocab else weight.to(dtype)
        if padded != vocab:  # one copy, which also does the autocast cast
            w[:vocab], w[vocab:] = weight, 0
        valid = targets != ignore_index
        row_weight = (valid.to(acc) / valid.sum())[:, None]  # 1/n for counted rows, 0 for ignored ones
        safe_targets = torch.where(valid, targets, 0)[:, None]
        loss = torch.zeros((), device=h.device, dtype=acc)
        grad_h = torch.empty(x.shape, device=x.device, dtype=acc) if needs[0] else None
        grad_w = None  # fp32 sum of the chunks' weight gradients, started by the first chunk
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = x[rows] @ w.T  # (n, padded)
            logits[:, vocab:] = float("-inf")
            probs = torch.softmax(logits, dim=1, dtype=acc)
            target_probs = probs.gather(1, safe_targets[rows])
            # -log p(target); p >= tiny keeps the loss finite (capped near 87 where the exact value is larger)
            loss -= (target_probs.clamp_min(torch.finfo(acc).tiny).log() * row_weight[rows]).sum()
            if not any(needs):
                continue
            # d loss / d logits = row_weight * (softmax - onehot); the row weight is applied on the (n, C) sides
            grad = probs.scatter_(1, safe_targets[rows], target_probs - 1).to(dtype)
            if grad_h is not None:
                grad_h[rows] = (grad @ w) * row_weight[rows]
            if needs[1]:
                part = (grad.T @ (x[rows] * row_weight[rows]).to(dtype))[:vocab]
                # A fresh tensor, not a view of `part`: autograd may then add the other gradient of a tied weight
                # (the token embedding's) into it in place instead of allocating a third (V, C) tensor.
                grad_w = part.to(acc, copy=True) if grad_w is None else grad_w.add_(part)
        if needs[1] and grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, device=w.device, dtype=acc)
        # Kept on ctx rather than saved: backward hands them to autograd as its only references (see above).
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's backward ran twice; its gradients are computed once, in forward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h.mul_(grad_loss).to(h_dtype)
        grad_w = None if grad_w is None else grad_w.mul_(grad_loss).to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def _balanced_rows(n: int, max_rows: int) -> int:
    """Rows per chunk when `n` rows are split into as few chunks of at most `max_rows` as possible, all of
    (nearly) equal size: 1024 rows at most 667 per chunk become 512 + 512 rather than 667 + 357, which keeps
    every matmul large."""
    chunks = max(1, -(-n // max_rows))
    return max(1, -(-n // chunks))  # at least 1 (a range step) for no rows
