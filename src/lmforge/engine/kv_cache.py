"""A preallocated KV cache with one slot per sequence, sized by a memory budget.

Each sequence owns a slot (a row) and its own length, so sequences of different lengths decode in
one batched step and can join or leave between steps (continuous batching). The cache holds
`rows` slots of `max_len` positions; the engine picks that shape so that rows x max_len never
exceeds the tokens its memory budget holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import LMForgeError
from ..model.config import ModelConfig
from ..quant import DecodeKVStore

# The KV cache budget when none is given. It holds thousands of tokens of a small model (11,650 of
# SmolLM2-135M in fp32, more than its full 8,192-token context) while staying well inside a laptop's
# memory. A model whose one full-context sequence needs more gets that much instead (see
# `default_kv_memory`), so that every request its context allows can run.
DEFAULT_KV_MEMORY = 512 * 2**20


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values that one token takes in the cache (all layers; an encoder-decoder's decoder's)."""
    return 2 * (cfg.decoder_layers or cfg.n_layers) * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def default_kv_memory(cfg: ModelConfig, context: int, dtype: torch.dtype) -> int:
    """The default budget: DEFAULT_KV_MEMORY, or one sequence of the full context if that is more."""
    return max(DEFAULT_KV_MEMORY, context * kv_bytes_per_token(cfg, dtype))


class KVCache(DecodeKVStore):
    """The model's KV store (`model.blocks.KVStore`), which the C decode attention also writes into in place
    (`quant.DecodeKVStore`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        rows: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (cfg.decoder_layers or cfg.n_layers, rows, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows, self.max_len = rows, max_len
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._cols: slice | torch.Tensor = slice(0, 0)
        self._kv_len = 0
        self.decode_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, positions) of a decode step

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bind(self, slots: list[int] | None, start: list[int], t: int) -> int:
        """Say where the next forward's ``t`` tokens of each row go; returns the key length to attend."""
        b = len(start)
        rows = list(range(b)) if slots is None else list(slots)
        kv_len = max(start) + t
        if kv_len > self.max_len:
            raise LMForgeError(f"sequence of {kv_len} tokens does not fit the KV cache of {self.max_len}")
        dev = self.k.device
        contiguous = rows == list(range(rows[0], rows[0] + b))
        self._gather = not contiguous
        self._rows = slice(rows[0], rows[0] + b) if contiguous else torch.tensor(rows, device=dev)
        if contiguous and len(set(start)) == 1:
            self._cols = slice(start[0], start[0] + t)
            self._scatter = False
        else:
            self._cols = torch.tensor(start, device=dev)[:, None] + torch.arange(t, device=dev)[None, :]
            self._row_idx = torch.tensor(rows, device=dev)[:, None]
            self._scatter = True
        self._kv_len = kv_len
        # A one-token step (decode) on CPU fp32 stores and attends in one C call, per row, in place.
        self.decode_rows = None
        if t == 1 and self.k.dtype == torch.float32 and dev.type == "cpu":
            self.decode_rows = (torch.tensor(rows, dtype=torch.int64), torch.tensor(start, dtype=torch.int64))
        return kv_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.k[layer], self.v[layer]
        if self._scatter:
            # Advanced indices around a slice put the [b, t] index dims first.
            ck[self._row_idx, :, self._cols] = k.transpose(1, 2)
            cv[self._row_idx, :, self._cols] = v.transpose(1, 2)
        else:
            ck[self._rows, :, self._cols] = k
            cv[self._rows, :, self._cols] = v
        n = self._kv_len
        return ck[self._rows, :, :n], cv[self._rows, :, :n]


class CrossKVCache(KVCache):
    """An encoder-decoder's cache (`model.blocks.CrossKVStore`): the decoder's self-attention keys/values in
    the slots above, and per slot each decoder layer's cross-attention keys/values of its source, made once
    (at the sequence's prefill) and read by every decode step. Their width grows to the longest source held."""

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(cfg, rows, max_len, device, dtype)
        self.cross_shape = (cfg.decoder_layers, rows, cfg.n_kv_heads, 0, cfg.head_dim)
        self.cross_k = torch.zeros(self.cross_shape, device=device, dtype=dtype)
        self.cross_v = torch.zeros(self.cross_shape, device=device, dtype=dtype)
        self.fresh = False  # the bound rows' cross keys/values are made by this forward (a prefill)
        self.src_len = 0  # source positions the bound rows attend to

    @property
    def nbytes(self) -> int:
        return super().nbytes + 2 * self.cross_k.numel() * self.cross_k.element_size()

    def bind_source(self, src_len: int, fresh: bool) -> None:
        """Before a forward: the bound rows' longest source, and whether the forward makes their cross keys."""
        self.src_len, self.fresh = src_len, fresh
        if src_len > self.cross_k.shape[3]:
            grow = list(self.cross_shape)
            grow[3] = src_len
            k, v = self.cross_k.new_zeros(grow), self.cross_v.new_zeros(grow)
            old = self.cross_k.shape[3]
            k[:, :, :, :old], v[:, :, :, :old] = self.cross_k, self.cross_v
            self.cross_k, self.cross_v = k, v

    def cross(self, layer: int, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cross_k[layer], self.cross_v[layer]
        if self.fresh:
            k, v = make()
            ck[self._rows, :, : k.shape[2]] = k
            cv[self._rows, :, : v.shape[2]] = v
            return k, v
        return ck[self._rows, :, : self.src_len], cv[self._rows, :, : self.src_len]

    def saved_cross(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of these slots' cross keys/values (to carry into a reshaped cache: `restore_cross`)."""
        idx = torch.tensor(slots, device=self.k.device)
        return self.cross_k[:, idx], self.cross_v[:, idx]

    def restore_cross(self, slots: list[int], saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        k, v = saved
        self.bind_source(k.shape[3], False)
        idx = torch.tensor(slots, device=self.k.device)
        self.cross_k[:, idx, :, : k.shape[3]], self.cross_v[:, idx, :, : v.shape[3]] = k, v
