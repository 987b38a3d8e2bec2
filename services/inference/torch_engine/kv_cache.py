"""A preallocated key/value cache with one slot per running sequence.

Each layer keeps K and V buffers of shape [slots, kv_heads, capacity, head_dim]. Row r
of the running batch lives in slot r; its valid keys are the columns
[starts[r], ends[r]) and its next token is written at column ends[r]. Sequences join by
having their prompts prefilled straight into free slots, and leave by having the last
row moved into their slot, so running sequences are never recomputed or shifted when
others come and go, and a decode step writes only one new column per row.

The model's attention layers see this object as their `past_key_values`: they call
`update(key, value, layer_idx)` with the keys of the tokens being fed and attend over
what it returns, under the mask `begin_decode` builds from `starts` and `ends`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible`, the dtype's lowest value elsewhere. (CPU attention kernels run
    an additive float mask many times faster than a boolean one.)"""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int,
    ) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_slots = max_slots
        self.slots = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        # What the next forward pass does in `update` (set by begin_prefill/begin_decode).
        self._mode = ""
        self._dest: torch.Tensor | None = None
        self._src: torch.Tensor | None = None
        self._width = 0
        self._cols: torch.Tensor | None = None
        self._window = (0, 0)
        self._lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # -- capacity ---------------------------------------------------------------------

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows of `columns` columns, keeping what is stored.
        Grows geometrically, so a long run reallocates a logarithmic number of times."""
        if rows > self.max_slots:
            raise ValueError(f"{rows} rows exceed the cache's {self.max_slots} slots")
        if rows <= self.slots and columns <= self.capacity:
            return
        slots = self.slots if rows <= self.slots else min(self.max_slots, max(rows, 2 * self.slots))
        capacity = self.capacity if columns <= self.capacity else max(columns, 2 * self.capacity, 16)
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        for store in (self.k, self.v):
            for layer in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    old = store[layer]
                    fresh[: old.shape[0], :, : old.shape[2]] = old
                    store[layer] = fresh
                else:
                    store.append(fresh)
        self.slots, self.capacity = slots, capacity

    def release(self) -> int:
        """Free the buffers but keep the rows (their keys and values must be recomputed
        before the next forward; `reserve` allocates again). Returns the bytes freed."""
        freed = self.bytes_allocated
        self.k, self.v = [], []
        self.slots = self.capacity = 0
        return freed

    def clear(self) -> None:
        """Forget every row and free the buffers."""
        self.k, self.v = [], []
        self.slots = self.capacity = 0
        self.starts, self.ends = [], []

    # -- rows -------------------------------------------------------------------------

    def remove_rows(self, keep: Sequence[int]) -> list[int]:
        """Keep only the rows in `keep` (ascending), packing them into the first slots by
        moving rows from the end into the holes. Returns the old index of each row in
        its new place."""
        order = list(range(self.rows))
        kept = set(keep)
        if len(kept) == self.rows:
            return order
        if not kept:
            self.clear()
            return []
        holes = [r for r in range(len(kept)) if r not in kept]
        movers = [r for r in range(len(kept), self.rows) if r in kept]
        columns = max(self.ends)
        for hole, mover in zip(holes, movers):
            for store in (self.k, self.v):
                for buf in store:
                    buf[hole, :, :columns] = buf[mover, :, :columns]
            self.starts[hole], self.ends[hole] = self.starts[mover], self.ends[mover]
            order[hole] = mover
        del self.starts[len(kept) :], self.ends[len(kept) :], order[len(kept) :]
        return order

    # -- forward passes ---------------------------------------------------------------

    def begin_prefill(self, dest: Sequence[int], src: Sequence[int], lengths: Sequence[int], width: int) -> None:
        """The next forward runs `width` columns of left-padded prompts (prompt i has
        lengths[i] tokens); prompt src[j]'s keys fill row dest[j]. Rows may be new
        (appended in order) or existing ones being recomputed."""
        if dest:
            self.reserve(max(max(dest) + 1, self.rows), width)
        for d, s in zip(dest, src):
            if d == self.rows:
                self.starts.append(0)
                self.ends.append(0)
            self.starts[d], self.ends[d] = width - lengths[s], width
        self._mode, self._width = "prefill", width
        self._dest = torch.tensor(dest, dtype=torch.long, device=self.device)
        self._src = torch.tensor(src, dtype=torch.long, device=self.device)

    def begin_decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a step that feeds one token per row. Returns (position ids [rows, 1],
        additive attention mask [rows, 1, 1, window]: 0 where a row may attend)."""
        rows = self.rows
        self.reserve(rows, max(self.ends) + 1)
        lo, hi = min(self.starts), max(self.ends) + 1
        starts = torch.tensor(self.starts, dtype=torch.long, device=self.device)
        ends = torch.tensor(self.ends, dtype=torch.long, device=self.device)
        cols = torch.arange(lo, hi, device=self.device)
        visible = (cols[None, :] >= starts[:, None]) & (cols[None, :] <= ends[:, None])
        self._mode, self._cols, self._window = "decode", ends, (lo, hi)
        return (ends - starts)[:, None], additive_mask(visible, self.dtype)[:, None, None, :]

    def begin_extend(self, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a pass that feeds lengths[r] more tokens to every row r, right-padded
        to a common width m: column j of row r goes to cache column ends[r] + j and sees
        the row's cached keys and its own tokens up to j. (Padding columns write past the
        row's end, where its next tokens overwrite them, and are never visible to a real
        one.) Returns (position ids [rows, m], additive attention mask [rows, 1, m,
        window])."""
        rows, width = self.rows, max(lengths)
        self.reserve(rows, max(self.ends) + width)
        lo, hi = min(self.starts), max(self.ends) + width
        starts = torch.tensor(self.starts, dtype=torch.long, device=self.device)
        ends = torch.tensor(self.ends, dtype=torch.long, device=self.device)
        offsets = torch.arange(width, device=self.device)
        last = ends[:, None] + offsets[None, :]  # [rows, m]: the column each token goes to
        cols = torch.arange(lo, hi, device=self.device)
        visible = (cols[None, None, :] >= starts[:, None, None]) & (cols[None, None, :] <= last[:, :, None])
        self._mode, self._cols, self._window, self._lengths = "extend", last, (lo, hi), list(lengths)
        return (ends - starts)[:, None] + offsets[None, :], additive_mask(visible, self.dtype)[:, None]

    def end_forward(self) -> None:
        if self._mode == "decode":
            self.ends = [e + 1 for e in self.ends]
        elif self._mode == "extend":
            self.ends = [e + n for e, n in zip(self.ends, self._lengths)]
        self._mode, self._dest, self._src, self._cols = "", None, None, None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._mode == "prefill":
            assert self._dest is not None
            if self._dest.numel():
                width = self._width
                self.k[layer_idx][self._dest, :, :width] = key[self._src]
                self.v[layer_idx][self._dest, :, :width] = value[self._src]
            # A prompt attends to itself only: nothing precedes it.
            return key, value
        if self._mode == "decode":
            k_buf, v_buf = self.k[layer_idx], self.v[layer_idx]
            rows = self.rows
            index = torch.arange(rows, device=self.device)
            k_buf[index, :, self._cols] = key[:, :, 0]
            v_buf[index, :, self._cols] = value[:, :, 0]
            lo, hi = self._window
            return k_buf[:rows, :, lo:hi], v_buf[:rows, :, lo:hi]
        if self._mode == "extend":
            assert self._cols is not None
            k_buf, v_buf = self.k[layer_idx], self.v[layer_idx]
            rows = self.rows
            index = torch.arange(rows, device=self.device)[:, None]
            # [rows, heads, m, dim] -> the [rows, m] (row, column) places, heads and dim kept.
            k_buf[index, :, self._cols] = key.transpose(1, 2)
            v_buf[index, :, self._cols] = value.transpose(1, 2)
            lo, hi = self._window
            return k_buf[:rows, :, lo:hi], v_buf[:rows, :, lo:hi]
        raise RuntimeError("SlotKVCache.update called outside a prefill, decode or extend pass")

    # Model code may ask the cache how long it is; positions and masks are always passed
    # explicitly, so nothing depends on the answer.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    is_compileable = False
