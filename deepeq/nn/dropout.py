"""Variational dropout: one mask per DEQ forward, shared by every solver iteration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._context import sample_index


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per DEQ forward and reused by every call of f in it: all
    solver iterations, the tracked call and (through it) the backward solve (Gal & Ghahramani
    2016; DEQ paper §E). Without this, every iteration would see a different f and there would
    be no fixed point to find.

    The mask has size 1 along ``shared_dims`` (the same mask at every position there):

    * sequences ``(B, T, D)``: ``shared_dims=(1,)`` (one mask per sample and channel);
    * images ``(B, C, H, W)``: ``shared_dims=(2, 3)`` (2d / channel dropout);
    * attention weights ``(B, heads, T, T)``: ``shared_dims=()`` (a full mask, fixed per forward).

    The mask is drawn at the first call after a reset, on the full batch, scaled by ``1/(1-p)``.
    When the engine evaluates f on a subset of samples, the rows of the mask that belong to them
    are used (``deepeq.nn.sample_index``), so a sample always keeps its own mask. In eval
    mode, or with ``p = 0``, the module is the identity.

    Reset: ``deepeq.DEQ`` calls ``reset_deq_state`` on every submodule of f at the start
    of each forward, so a fresh mask is drawn per forward automatically. Used outside a DEQ, call
    ``deepeq.nn.reset_deq_state(model)`` when a new mask is wanted.

    Args:
        p: drop probability in ``[0, 1)``.
        shared_dims: dimensions (of the input, batch is 0) along which the mask is shared.

    Examples:
        >>> import torch, deepeq
        >>> drop = deepeq.nn.VariationalDropout(0.5, shared_dims=(1,))
        >>> x = torch.ones(2, 4, 3)
        >>> y1, y2 = drop(x), drop(x)
        >>> torch.equal(y1, y2), torch.equal(y1[:, 0], y1[:, 3])  # same mask, shared over dim 1
        (True, True)
    """

    def __init__(self, p: float, shared_dims: Sequence[int] = (1,)):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise ValueError(f"VariationalDropout.p must be a float in [0, 1); got {p!r}.")
        if any(not isinstance(d, int) or d < 1 for d in shared_dims):
            raise ValueError(
                f"VariationalDropout.shared_dims must be non-batch dimensions (ints >= 1); got "
                f"{tuple(shared_dims)!r}."
            )
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)
        self.mask: Tensor | None = None
        self.draws = 0  # masks drawn so far (useful in tests and logs)

    def reset_deq_state(self) -> None:
        """Forget the mask; the next training-mode call draws a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        idx = sample_index()
        if self.mask is None:
            if idx is not None:
                raise RuntimeError(
                    "VariationalDropout: the first call after a reset covers a subset of the "
                    "samples, so the full-batch mask cannot be drawn. Reset it before the solve "
                    "(deepeq.DEQ does this automatically)."
                )
            shape = [1 if d in self.shared_dims else n for d, n in enumerate(x.shape)]
            keep = torch.rand(shape, device=x.device) >= self.p
            self.mask = keep.to(x.dtype) / (1.0 - self.p)
            self.draws += 1
        mask = self.mask if idx is None else self.mask[idx]
        expected = [1 if d in self.shared_dims else n for d, n in enumerate(x.shape)]
        if list(mask.shape) != expected:
            raise RuntimeError(
                f"VariationalDropout: the mask was drawn for inputs shaped like "
                f"{tuple(self.mask.shape)} (shared dims {self.shared_dims}); got input "
                f"{tuple(x.shape)}. Call deepeq.nn.reset_deq_state(module) between forwards "
                f"with different shapes (deepeq.DEQ does it automatically)."
            )
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


def reset_deq_state(module: nn.Module) -> None:
    """Call ``reset_deq_state()`` on every submodule of ``module`` that defines it (dropout masks
    and other per-forward state). ``deepeq.DEQ`` does this at the start of every forward."""
    for m in module.modules():
        fn = getattr(m, "reset_deq_state", None)
        if callable(fn):
            fn()
