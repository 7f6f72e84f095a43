"""A per-example fixed-point cache: each training example's last equilibrium, the start of its
next solve (warm start across steps and epochs, for examples that recur)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class FixedPointCache:
    """Flat equilibria ``(D,)`` keyed by example id (an int), in CPU memory or a memory-mapped
    file, with a bounded size and least-recently-used eviction.

    ``DEQ(f, cache=FixedPointCache(...))`` with ``deq(x, cache_keys=ids)``: samples whose id is
    cached start their solve from the stored equilibrium (the others from the usual z0), and
    every solved sample's equilibrium is stored (detached) after the solve. Ids must identify an
    example and the state it is solved for (the training loop uses dataset indices for images,
    ``row * segments + segment`` for language-model segments). Only training-mode solves read and
    write it (evaluation keeps the model's own z0).

    Args:
        max_bytes: storage bound; the capacity in examples is ``max_bytes // (D * itemsize)``,
            fixed at the first store. When full, the least recently used examples are evicted.
        dtype: ``"float32"`` or ``"float16"`` (half the memory; the start is then rounded to
            ~1e-3 relative, far below a training tolerance).
        path: a file for a memory-mapped store (e.g. on a local disk for datasets whose
            equilibria do not fit in memory); None keeps it in memory.
    """

    def __init__(self, max_bytes: int, *, dtype: str = "float32", path: str | Path | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"FixedPointCache.max_bytes must be an int > 0; got {max_bytes!r}.")
        if dtype not in _DTYPES:
            raise ValueError(
                f"FixedPointCache.dtype must be one of {sorted(_DTYPES)}; got {dtype!r}."
            )
        self.max_bytes, self.dtype, self.path = max_bytes, _DTYPES[dtype], path
        self.store: Tensor | None = None
        self.slots: OrderedDict[int, int] = OrderedDict()  # id -> row of store, LRU order
        self.hits = self.misses = self.evictions = 0

    @property
    def capacity(self) -> int | None:
        return None if self.store is None else self.store.shape[0]

    def __len__(self) -> int:
        return len(self.slots)

    def _allocate(self, D: int) -> None:
        item = torch.finfo(self.dtype).bits // 8
        n = self.max_bytes // (D * item)
        if n < 1:
            raise ValueError(
                f"FixedPointCache: max_bytes={self.max_bytes} cannot hold one equilibrium of "
                f"{D} values ({D * item} bytes in {self.dtype}); raise it."
            )
        if self.path is None:
            self.store = torch.zeros(n, D, dtype=self.dtype)
        else:
            np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
            mm = np.lib.format.open_memmap(str(self.path), mode="w+", dtype=np_dtype, shape=(n, D))
            self.store = torch.from_numpy(mm)

    def lookup(self, keys: Tensor, z0: Tensor) -> tuple[Tensor, Tensor]:
        """``z0`` (flat ``(B, D)``) with the cached rows substituted; and the hit mask ``(B,)``."""
        keys = self._keys(keys, z0.shape[0])
        hit = torch.tensor([int(k) in self.slots for k in keys.tolist()], dtype=torch.bool)
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        if self.store is None or not bool(hit.any()):
            return z0, hit.to(z0.device)
        if self.store.shape[1] != z0.shape[1]:
            raise ValueError(
                f"FixedPointCache holds states of {self.store.shape[1]} values; this solve's have "
                f"{z0.shape[1]}. Use one cache per equilibrium shape (e.g. one per DEQ layer)."
            )
        rows = [self.slots[int(k)] for k in keys[hit].tolist()]
        for k in keys[hit].tolist():
            self.slots.move_to_end(int(k))
        cached = self.store[torch.tensor(rows)].to(device=z0.device, dtype=z0.dtype)
        z0 = z0.clone()
        z0[hit.to(z0.device)] = cached
        return z0, hit.to(z0.device)

    def update(self, keys: Tensor, z: Tensor) -> None:
        """Store the equilibria ``z`` (flat ``(B, D)``, detached) under ``keys``."""
        keys = self._keys(keys, z.shape[0])
        if self.store is None:
            self._allocate(z.shape[1])
        if z.shape[0] > self.store.shape[0]:
            raise ValueError(
                f"FixedPointCache holds {self.store.shape[0]} equilibria, fewer than one batch "
                f"({z.shape[0]}); raise max_bytes."
            )
        z = z.detach().to("cpu", self.dtype)
        rows = []
        for k in keys.tolist():
            k = int(k)
            if k in self.slots:
                self.slots.move_to_end(k)
                rows.append(self.slots[k])
                continue
            if len(self.slots) < self.store.shape[0]:
                slot = len(self.slots)
            else:  # evict the least recently used
                _, slot = self.slots.popitem(last=False)
                self.evictions += 1
            self.slots[k] = slot
            rows.append(slot)
        self.store[torch.tensor(rows)] = z

    @staticmethod
    def _keys(keys: Tensor, batch: int) -> Tensor:
        if not isinstance(keys, Tensor) or keys.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"cache_keys must be an int64 tensor (B,); got {keys!r}.")
        keys = keys.reshape(-1).cpu()
        if keys.numel() != batch:
            raise ValueError(f"cache_keys has {keys.numel()} ids for a batch of {batch}.")
        if len(set(keys.tolist())) != keys.numel():
            raise ValueError("cache_keys must be distinct within a batch.")
        return keys
