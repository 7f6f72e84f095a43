"""The one driver loop: ``fixed_point(f, z0, solver, ...)``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._driver import check_args
from ._flatten import _describe, layout_of
from ._problem import Problem
from ._solution import Solution
from ._types import FixedPointFn, State
from .backward import AbstractBackward, ImplicitBackward
from .solvers import AbstractSolver, Anderson
from .solvers._base import check_solver


def fixed_point(
    f: FixedPointFn,
    z0: State,
    solver: AbstractSolver | None = None,
    *,
    args: tuple = (),
    backward: AbstractBackward | None = None,
    independent: bool = True,
    throw: bool = False,
    nonfinite: Literal["raise", "return"] = "raise",
    trace: bool = False,
    solve_dtype: torch.dtype | str | None = None,
    causal: bool = False,
    keep_iterates: tuple[int, ...] = (),
    compaction: Literal["auto", "eager", "lazy"] = "auto",
) -> Solution:
    """Solve ``z* = f(z*, *args)`` per sample, starting from ``z0``.

    Each sample stops as soon as ``||f(z) - z|| <= atol + rtol * ||f(z)||`` (norms over all
    non-batch dimensions) and is then frozen: its iterate and its solver history no longer
    change. With ``independent=True`` (default) f is then evaluated only on the still-active
    samples, with every tensor in ``args`` sliced alike, so compute falls as samples converge
    and a sample's result does not depend on its batch-mates. Each sample returns its
    lowest-residual iterate (ranked by ``residual / (atol + rtol*||f(z)||)``).

    A relative rule is scale-free, so an iterate that runs away can meet it: on ``f(z) = z + c``
    (no fixed point) ``||c|| / ||f(z_k)||`` falls like 1/k. A sample therefore counts as
    converged only if its residual fell below its starting residual (by more than the
    round-off ``16 ε ||f(z)||`` of the residual at that scale) or ``||f(z)||`` did not grow;
    ``deepeq.Broyden`` also refuses steps longer than ``||f(z) - z|| / sqrt(ε)``. A map whose
    residual stalls while the iterate grows ends at ``max_steps``, reported as not converged.

    Gradients follow ``backward`` (default ``ImplicitBackward``): the iterations run
    without an autograd graph and ``z*`` is differentiated implicitly, so memory is that of
    one call of f. No graph is built when autograd is not recording (``torch.no_grad()``) or
    when nothing f depends on requires grad.

    Args:
        f: ``f(z, *args) -> z_next`` with the structure, shapes, dtype and device of ``z``.
        z0: initial state, a tensor ``(B, ...)`` or a tuple/list of tensors sharing the batch
            size B (flattened once to ``(B, D)``; solvers only see the flat form).
        solver: a solver object (``Picard``, ``Anderson``, ``Broyden``); default ``Anderson()``.
        args: extra arguments of f. Tensors must be batched along dim 0 like z0 (input
            injection, memory, masks); they are sliced to the active samples. Nested
            tuples/lists are sliced leaf-wise; non-tensor leaves pass through unchanged.
        backward: how gradients reach f's parameters, ``args`` and whatever f closes over:
            ``ImplicitBackward()`` (default), ``PhantomBackward(steps=k)`` or
            ``UnrolledBackward()``.
        independent: set False when f mixes samples (batch statistics) or closes over
            per-sample tensors: f then always runs on the full batch, converged samples held at
            their returned values, and only their rows of the output are used.
        throw: raise ``RuntimeError`` when some sample hits ``max_steps`` without converging.
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` naming the step and the
            samples where f produced inf/nan; ``"return"`` stops those samples, returns their
            lowest-residual finite iterate and sets ``Status.NONFINITE``.
        trace: record each sample's residual at every step in ``stats.trace``/``rel_trace``.
        solve_dtype: run f under ``torch.autocast`` in this dtype (``torch.bfloat16`` or
            ``"bfloat16"``, ``float16``) during the forward solver's iterations only; the
            solver's state and arithmetic, the tracked call at z* that gradients flow through,
            and the backward solve stay in z0's dtype. The iterations then cost less (bf16
            matrix units) but carry the low precision's round-off (~0.4% relative for bf16),
            which bounds the reachable residual: use it when the solve stops well above that
            (loose tolerances or small caps), as in training. Convergence is judged at full
            precision: before a sample stops (and at the cap) f is evaluated once in z0's dtype
            at the iterate it returns, and its statistics are those of that evaluation; if a
            sample that met the rule in the low precision misses it there, the solve goes on in
            full precision (with ``causal=True`` or ``deepeq.Reversible`` it stays in the low
            precision, whose floor then ends the solve at the cap, reported as such). With
            ``UnrolledBackward`` the gradient flows through the low-precision iterations.
        causal: z0 is a sequence state ``(B, T, ...)`` and f is causal along dim 1 (its output at
            position t depends only on positions ``<= t``, as in a language model). The solve
            is then causal too, at any tolerance and cap: each (sample, position) is checked
            against the stopping rule on its own, a position is frozen once it and every
            earlier position of its sample meet it (a growing prefix, so nothing a frozen
            position depends on moves again), each position returns its last finite iterate
            (not a lowest-residual one: that iterate saw other values of the positions before
            it), and Anderson mixes per position (its weights for position t minimise the
            residual over positions ``<= t``); Broyden is refused (its inverse estimate does
            not split by position). f always runs on the whole batch. Without it the per-sample rule, iterate selection and mixing use norms over
            the whole sequence, so earlier outputs change with later tokens unless the solve
            converges exactly. ``stats`` stay per sample: ``converged`` means every position
            met the rule, and ``abs_residual`` / ``rel_residual`` (and the traces) are the
            largest over the positions, so with ``atol = 0`` a sample converged exactly when
            its ``rel_residual <= rtol``.
        keep_iterates: solver steps whose iterates ``z_s`` to supervise (fixed-point
            correction, ``deepeq.FixedPointCorrection``): when autograd records,
            ``Solution.trajectory`` holds ``f(z_s)`` for each, one tracked call of f from the
            detached ``z_s`` (a one-step phantom gradient), in the structure of z0; a sample that
            stopped before step s contributes its returned value. Empty when not recording.
        compaction: when samples that stopped leave the solver's arrays (with
            ``independent=True``): ``"auto"`` (at once on CPU; on accelerators in batches of
            at least a quarter of the rows, since every gather is a kernel launch), ``"eager"``
            (at once) or ``"lazy"`` (in batches). The solve is the same (to float rounding: a
            product over fewer rows may round otherwise); only the cost differs.

    Returns:
        A ``Solution`` with ``value`` (the structure of z0), ``status`` and ``stats``.

    Raises:
        TypeError, ValueError: bad z0, args, solver or f output (the message says which).
        FloatingPointError: inf/nan with ``nonfinite="raise"``.
        RuntimeError: double backward through ``ImplicitBackward``.
        RuntimeError: ``throw=True`` and max_steps reached.

    Examples:
        >>> import torch, deepeq
        >>> x = torch.randn(4, 8, dtype=torch.float64)
        >>> W = 0.3 * torch.eye(8, dtype=torch.float64)
        >>> sol = deepeq.fixed_point(lambda z, x: torch.tanh(z @ W + x), torch.zeros_like(x),
        ...                          deepeq.Broyden(rtol=1e-10), args=(x,))
        >>> sol.status
        <Status.CONVERGED: 'converged: every sample met ||f(z)-z|| <= atol + rtol*||f(z)||'>
        >>> bool(torch.allclose(sol.value, torch.tanh(sol.value @ W + x)))
        True
    """
    if solver is None:
        solver = Anderson()
    check_solver(solver, "solver")
    if not callable(f):
        raise TypeError(f"f must be callable f(z, *args) -> z; got {type(f).__name__}.")
    if not isinstance(args, tuple | list):
        args = (args,)
    if backward is None:
        backward = ImplicitBackward()
    AbstractBackward.check(backward, "backward")
    layout = layout_of(z0)
    check_args(args, layout)
    positions = 0
    if causal:
        if layout.kind is not Tensor or len(layout.shapes[0]) < 1:
            raise TypeError(
                f"causal=True needs z0 as one tensor (B, T, ...) with the positions along dim 1; "
                f"got {_describe(z0)}."
            )
        if not independent:
            raise ValueError(
                "causal=True treats the samples as independent (f mixes positions, not samples); "
                "independent=False is not supported with it."
            )
        check_causal_solver(solver)
        positions = layout.shapes[0][0]
    keep = _check_keep(keep_iterates)
    grad = torch.is_grad_enabled()
    problem = Problem.create(
        f=f, z0=z0, solver=solver, layout=layout, args=tuple(args), independent=independent,
        throw=throw, nonfinite=nonfinite, trace=trace, positions=positions,
        iterate_f=None if solve_dtype is None else _autocast(f, layout, _solve_dtype(solve_dtype)),
        keep=keep if grad else (), compaction=compaction,
    )  # fmt: skip
    if not grad:
        r = problem.solve()
        return problem.finish(r.z, r.status, r.stats)
    return backward.apply(problem)


def _check_keep(steps) -> tuple[int, ...]:
    if not isinstance(steps, tuple | list) or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps
    ):
        raise ValueError(
            f"keep_iterates must be a tuple of solver steps (ints >= 0); got {steps!r}."
        )
    return tuple(sorted(set(steps)))


def check_causal_solver(solver: AbstractSolver) -> None:
    """Raise for solvers whose mixing cannot be made causal (per position) reliably."""
    from .solvers import Broyden

    if isinstance(solver, Broyden):
        raise ValueError(
            "causal=True solves with per-position mixing, and Broyden's inverse-Jacobian estimate "
            "does not split by position: kept per position it ignores how earlier positions move "
            "and diverges on the DEQ language models (residual O(1) after 15-30 steps, measured). "
            "Use deepeq.Anderson (one set of coefficients per position) or deepeq.Picard for a "
            "causal solve (models: solve.solver = 'anderson'), or causal=False (models: "
            "solve.causal = false) for whole-sequence Broyden, whose outputs then depend on later "
            "positions unless the solve converges exactly."
        )


_SOLVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _solve_dtype(value: torch.dtype | str) -> torch.dtype:
    dtype = _SOLVE_DTYPES.get(value, value) if isinstance(value, str) else value
    if dtype not in _SOLVE_DTYPES.values():
        raise ValueError(
            f"solve_dtype must be torch.bfloat16 or torch.float16 (or their names), or None; got "
            f"{value!r}."
        )
    return dtype


def _autocast(f: FixedPointFn, layout, dtype: torch.dtype) -> FixedPointFn:
    """f under ``torch.autocast(dtype)``, its output cast back to the state's dtype."""
    device = layout.device.type

    def iterate(z, *args):
        with torch.autocast(device, dtype=dtype):
            out = f(z, *args)
        if isinstance(out, Tensor):
            return out.to(layout.dtype)
        if isinstance(out, tuple | list):
            return type(out)(o.to(layout.dtype) if isinstance(o, Tensor) else o for o in out)
        return out  # not a state: the driver's output check reports it

    return iterate
