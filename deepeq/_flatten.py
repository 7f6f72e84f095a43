"""Tuple/multiscale states <-> one flat ``(B, D)`` tensor, done once at the solver boundary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._types import State


@dataclass(frozen=True)
class Layout:
    """How to rebuild a state from its flat ``(B, D)`` form."""

    kind: type  # Tensor, tuple or list
    shapes: tuple[tuple[int, ...], ...]  # per-part shapes without the batch dim
    sizes: tuple[int, ...]  # per-part numel without the batch dim
    batch: int
    dtype: torch.dtype
    device: torch.device

    @property
    def dim(self) -> int:
        return sum(self.sizes)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    if isinstance(x, tuple | list):
        return f"{type(x).__name__} of {len(x)} [" + ", ".join(_describe(p) for p in x) + "]"
    return type(x).__name__


def layout_of(z0: State) -> Layout:
    """Validate ``z0`` and record its structure. Raises TypeError/ValueError on bad input."""
    if isinstance(z0, Tensor):
        parts, kind = [z0], Tensor
    elif isinstance(z0, tuple | list) and len(z0) > 0 and all(isinstance(p, Tensor) for p in z0):
        parts, kind = list(z0), type(z0)
    else:
        raise TypeError(
            f"z0 must be a tensor of shape (B, ...) or a non-empty tuple/list of such tensors; "
            f"got {_describe(z0)}."
        )
    first = parts[0]
    for i, p in enumerate(parts):
        where = "z0" if kind is Tensor else f"z0[{i}]"
        if not p.is_floating_point():
            raise TypeError(
                f"{where} must be a floating-point tensor; got dtype={p.dtype}. "
                f"Convert it, e.g. {where}.float()."
            )
        if p.dim() < 1 or p.shape[0] == 0:
            raise ValueError(
                f"{where} must have a non-empty leading batch dimension (B, ...); got shape "
                f"{tuple(p.shape)}. For a single sample use {where}.unsqueeze(0)."
            )
        if p.shape[0] != first.shape[0] or p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                f"all parts of z0 must share batch size, dtype and device; got {_describe(z0)}."
            )
    return Layout(
        kind=kind,
        shapes=tuple(tuple(p.shape[1:]) for p in parts),
        sizes=tuple(p[0].numel() for p in parts),
        batch=first.shape[0],
        dtype=first.dtype,
        device=first.device,
    )


def flatten(z: State, layout: Layout) -> Tensor:
    """State -> contiguous ``(B, D)``."""
    if layout.kind is Tensor:
        return z.reshape(z.shape[0], -1)  # type: ignore[union-attr]
    return torch.cat([p.reshape(p.shape[0], -1) for p in z], dim=1)


def unflatten(z: Tensor, layout: Layout) -> State:
    """``(b, D)`` -> state with the structure of z0 (b may be a subset of the batch)."""
    b = z.shape[0]
    if layout.kind is Tensor:
        return z.view(b, *layout.shapes[0])
    parts = torch.split(z, list(layout.sizes), dim=1)
    out = [p.reshape(b, *s) for p, s in zip(parts, layout.shapes, strict=True)]
    return layout.kind(out)


def check_output(fz: object, layout: Layout, batch: int, autocast: bool = False) -> None:
    """Raise a clear error if ``f(z)`` does not match the structure of ``z`` (``batch`` rows).
    ``autocast``: f ran under autocast, so a lower-precision floating dtype is accepted (the
    caller casts it back)."""
    if (
        layout.kind is Tensor
        and isinstance(fz, Tensor)
        and fz.shape[0] == batch
        and fz.shape[1:] == layout.shapes[0]
        and fz.dtype == layout.dtype
        and fz.device == layout.device
    ):
        return  # fast path: called once per solver step
    expected = _describe_layout(layout, batch)
    if layout.kind is Tensor:
        parts = [fz] if isinstance(fz, Tensor) else None
    elif isinstance(fz, tuple | list) and len(fz) == len(layout.shapes):
        parts = list(fz)
    else:
        parts = None
    if parts is None or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(
            f"f(z) must return the same structure as z: expected {expected}; got {_describe(fz)}."
        )
    for p, shape in zip(parts, layout.shapes, strict=True):
        if tuple(p.shape) != (batch, *shape):
            hint = ""
            if p.dim() >= 1 and p.shape[0] != batch and tuple(p.shape[1:]) == shape:
                hint = (
                    " The batch size differs: deepeq evaluates f only on still-active samples, so"
                    " per-sample tensors f needs must be passed through args=(...) rather than"
                    " captured in a closure, or pass independent=False."
                )
            raise ValueError(
                f"f(z) must have the same shape as z; expected {expected}, got {_describe(fz)}."
                + hint
            )
        if p.device != layout.device:
            raise ValueError(
                f"f(z) must stay on the device of z0 ({layout.device}); got {_describe(fz)}."
            )
        if p.dtype != layout.dtype and not (
            p.is_floating_point() and (autocast or torch.is_autocast_enabled(p.device.type))
        ):
            raise TypeError(
                f"f(z) must return the dtype of z0 ({layout.dtype}); got {_describe(fz)}. "
                f"Cast inside f or build z0 with the dtype f computes in."
            )


def _describe_layout(layout: Layout, batch: int) -> str:
    shapes = [(batch, *s) for s in layout.shapes]
    if layout.kind is Tensor:
        return f"Tensor(shape={shapes[0]}, dtype={layout.dtype}, device={layout.device})"
    return (
        f"{layout.kind.__name__} of tensors with shapes {shapes} ({layout.dtype}, {layout.device})"
    )
