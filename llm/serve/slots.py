"""The KV cache of the sequences being decoded together: one `llm.model.KVCache` of `capacity` rows, whose first
`size` rows are the active sequences. Sequences join and leave between decoding steps.

Every row is right-aligned at column `length`: a sequence of n tokens fills columns [length - n, length) and
its left is padding (`real` False), which the model masks; positions come from each row's `n_real`, so a row's
keys and values do not depend on where its columns sit. A joining sequence is prefilled in a cache of its own
and its real columns are copied in; a leaving one is replaced by the last row. When a joining prompt is longer
than `length`, or the columns run out (length = context) although every row is shorter, the rows are shifted.
"""

from __future__ import annotations

import copy

from llm.model import GPT, KVCache


class SlotCache:
    def __init__(self, model: GPT, capacity: int) -> None:
        self.cache = model.new_cache(capacity)  # (n_layers, capacity, H, context, D)
        self.size = 0  # active rows: 0 .. size-1
        self.length = 0  # filled columns, the same for every row

    @property
    def capacity(self) -> int:
        return self.cache.k.shape[1]

    @property
    def columns(self) -> int:
        return self.cache.max_len

    def lengths(self) -> list[int]:
        """Tokens held by each active row (its next position id)."""
        return self.cache.n_real[: self.size].tolist()

    def add(self, prefill: KVCache, row: int) -> int:
        """Copy row `row` of a filled `prefill` cache (left-padded, like generate's prompts) into a new active row;
        returns its index."""
        if self.size == self.capacity:
            raise ValueError("SlotCache is full")
        real = prefill.real[row, : prefill.length]
        n = int(real.sum())
        if n > self.length:
            self._align(n)
        slot, start = self.size, self.length - n
        cache = self.cache
        cache.k[:, slot, :, start : self.length] = prefill.k[:, row, :, : prefill.length][:, :, real]
        cache.v[:, slot, :, start : self.length] = prefill.v[:, row, :, : prefill.length][:, :, real]
        cache.real[slot, : self.length] = False
        cache.real[slot, start : self.length] = True
        cache.n_real[slot] = n
        self.size += 1
        return slot

    def remove(self, slot: int) -> None:
        """Drop active row `slot`; the last active row moves into its place."""
        last = self.size - 1
        if slot != last:
            cache = self.cache
            cache.k[:, slot], cache.v[:, slot] = cache.k[:, last], cache.v[:, last]
            cache.real[slot], cache.n_real[slot] = cache.real[last], cache.n_real[last]
        self.size -= 1
        if self.size == 0:
            self.length = 0

    def view(self) -> KVCache:
        """A KVCache over the active rows (views of this storage) for one decoding step of one token per row;
        call `advance()` after the step. Shifts the rows left first if no column is free."""
        if self.length == self.columns:
            self._align(max(self.lengths()))
        cache = self.cache
        cache.real[: self.size, self.length] = True  # the column the step writes
        rows = copy.copy(cache)
        rows.k, rows.v = cache.k[:, : self.size], cache.v[:, : self.size]
        rows.real, rows.n_real = cache.real[: self.size], cache.n_real[: self.size]
        rows.length = self.length
        rows.has_padding = not bool(rows.real[:, : self.length].all())
        return rows

    def advance(self) -> None:
        """Count the column a decoding step on `view()` has filled."""
        self.length += 1

    def _align(self, length: int) -> None:
        """Shift the active rows so they end at column `length` (>= every row's token count)."""
        old, n = self.length, self.size
        cache = self.cache
        for store in (cache.k, cache.v):
            if length > old:
                store[:, :n, :, length - old : length] = store[:, :n, :, :old].clone()
            else:
                store[:, :n, :, :length] = store[:, :n, :, old - length : old].clone()
        if length > old:
            cache.real[:n, length - old : length] = cache.real[:n, :old].clone()
            cache.real[:n, : length - old] = False
        else:
            cache.real[:n, :length] = cache.real[:n, old - length : old].clone()
        self.length = length
