"""Deterministic memory accounting: the bytes autograd saves for the backward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for backward meanwhile
    (unique storages, via ``torch.autograd.graph.saved_tensors_hooks``): deterministic, unlike
    peak RSS. Returns ``(bytes, fn())``.

    Examples:
        >>> import torch
        >>> from deepeq.analysis import saved_bytes
        >>> w = torch.ones(4, 4, requires_grad=True)
        >>> n, _ = saved_bytes(lambda: (torch.ones(2, 4) @ w).tanh())
        >>> n  # the (2, 4) input of the matmul and the (2, 4) tanh output, float32
        64
    """
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
