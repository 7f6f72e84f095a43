"""Type aliases shared across deepeq."""

from collections.abc import Callable
from typing import Any, TypeAlias

from torch import Tensor

#: A DEQ state: one tensor ``(B, ...)`` or a tuple/list of tensors that all share the batch size B.
State: TypeAlias = Tensor | tuple[Tensor, ...] | list[Tensor]

#: ``f(z, *args) -> z_next`` with the same structure, shapes, dtype and device as ``z``.
FixedPointFn: TypeAlias = Callable[..., Any]

#: The flat map a solver sees: ``F(z_rows, rows=None) -> f(z_rows)`` on a ``(b, D)`` tensor. ``rows``
#: (optional, int64 indices into the currently active samples) says which samples ``z_rows`` holds;
#: the other samples are held at their last evaluated values (valid only when the samples are not
#: coupled: ``AbstractSolver.init(..., coupled=...)``).
FlatFn: TypeAlias = Callable[..., Tensor]
