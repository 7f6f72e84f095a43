"""``SolvePolicy``: how an equilibrium is solved and differentiated, as a value; ``DEQ``: the
public equilibrium layer, a module holding f and a policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._fixed_point import _solve_dtype, check_causal_solver, fixed_point
from .._flatten import _describe, flatten, layout_of, unflatten
from .._solution import Solution
from .._types import State
from ..backward import AbstractBackward, ImplicitBackward
from ..regularization.correction import FixedPointCorrection
from ..solvers import AbstractSolver, Anderson
from ..solvers._base import check_solver
from .cache import FixedPointCache
from .dropout import reset_deq_state


@dataclass(frozen=True, kw_only=True)
class SolvePolicy:
    """How an equilibrium is found and differentiated, as one frozen value: the forward solvers
    (training and evaluation), the backward rule, the solves' dtypes, causality and fixed-point
    correction. ``solve(f, x, z0, training=...)`` runs it on a layer ``f``; ``deepeq.DEQ``
    holds one, and the registered models get theirs from ``config.solve``
    (``deepeq.models.SolveSpec.policy``). Variants are ``dataclasses.replace(policy, ...)``
    (checked again).

    Args:
        solver: forward solver in training mode (default, or None: ``Anderson()``).
        eval_solver: forward solver in eval mode (default: ``solver``).
        backward: gradient rule (default ``ImplicitBackward()``).
        independent: False if f mixes samples (see ``deepeq.fixed_point``).
        nonfinite: ``"raise"`` or ``"return"`` (see ``deepeq.fixed_point``).
        trace: record per-step residuals in ``solution.stats.trace``.
        solve_dtype: in training mode, run f in this autocast dtype during the forward
            solver's iterations only (see ``deepeq.DEQ``).
        eval_solve_dtype: the same in eval mode (default None: full precision).
        causal: per-position solving of a causal sequence layer (see ``deepeq.fixed_point``).
        correction: fixed-point correction (``deepeq.FixedPointCorrection``; 0 steps: None).

    Raises:
        TypeError: a solver, backward or correction that is not a deepeq object.
        ValueError: a combination that cannot work (e.g. SHINE without Broyden, a causal
            Broyden solve, an unknown solve dtype).
    """

    solver: AbstractSolver = field(default_factory=Anderson)
    eval_solver: AbstractSolver | None = None
    backward: AbstractBackward = field(default_factory=ImplicitBackward)
    independent: bool = True
    nonfinite: Literal["raise", "return"] = "raise"
    trace: bool = False
    solve_dtype: torch.dtype | str | None = None
    eval_solve_dtype: torch.dtype | str | None = None
    causal: bool = False
    correction: FixedPointCorrection | None = None

    def __post_init__(self) -> None:
        if self.solver is None:
            object.__setattr__(self, "solver", Anderson())
        if self.eval_solver is None:
            object.__setattr__(self, "eval_solver", self.solver)
        for name in ("solver", "eval_solver"):
            check_solver(getattr(self, name), f"DEQ {name}")
        if self.backward is None:
            object.__setattr__(self, "backward", ImplicitBackward())
        AbstractBackward.check(self.backward, "DEQ backward")
        self.backward.check_forward_solver(self.solver)  # fail now, not at the first step
        c = self.correction
        if c is not None and not isinstance(c, FixedPointCorrection):
            raise TypeError(
                f"DEQ correction must be a deepeq.FixedPointCorrection or None; got "
                f"{type(c).__name__}."
            )
        if c is not None and not c.steps:
            object.__setattr__(self, "correction", None)
        object.__setattr__(self, "causal", bool(self.causal))
        if self.causal:  # fail at construction, not at the first forward
            check_causal_solver(self.solver)
            check_causal_solver(self.eval_solver)
        for v in (self.solve_dtype, self.eval_solve_dtype):
            if v is not None:
                _solve_dtype(v)  # fail here, not at the first forward

    def solver_for(self, training: bool) -> AbstractSolver:
        """The forward solver of the mode: ``solver`` in training, ``eval_solver`` in eval."""
        return self.solver if training else self.eval_solver

    def solve(
        self,
        f: nn.Module,
        x: Any,
        z0: State,
        *,
        training: bool,
        cache: FixedPointCache | None = None,
        cache_keys: Tensor | None = None,
    ) -> tuple[State, Solution]:
        """Solve ``z* = f(z*, x)`` from ``z0`` with the solver of the mode (``training``).

        Once per call, before solving: the supervised iterates of fixed-point correction are
        picked (training mode, autograd recording), ``reset_deq_state()`` is called on every
        submodule of f that defines it, and parametrised weights are computed once for every
        call of f. Under autocast a half-precision ``z0`` is promoted to float32. With a
        ``cache`` and ``cache_keys`` in training mode, cached examples start from their stored
        equilibrium and the new ones are stored.

        Returns:
            ``(z_star, solution)``; ``z_star`` is ``solution.value``.
        """
        return self._solve(f, x, lambda: (z0, "the z0 argument"), training, cache, cache_keys)

    def _solve(
        self,
        f: nn.Module,
        x: Any,
        initial: Callable[[], tuple[State, str]],
        training: bool,
        cache: FixedPointCache | None,
        cache_keys: Tensor | None,
    ) -> tuple[State, Solution]:
        """``solve`` with the initial state and where it comes from (named by the error of a
        failing first call of f) drawn from ``initial`` after f's per-forward state is reset."""
        solver = self.solver_for(training)
        keep = ()
        if self.correction is not None and training and torch.is_grad_enabled():
            keep = self.correction.pick(solver.max_steps)
        reset_deq_state(f)  # fresh dropout masks etc., once per forward
        z_init, source = initial()
        z_init = _full_precision_under_autocast(z_init)
        use_cache = cache is not None and cache_keys is not None and training
        if use_cache:
            layout = layout_of(z_init)
            flat, _ = cache.lookup(cache_keys, flatten(z_init, layout).detach())
            z_init = unflatten(flat, layout)
        # Parametrised weights (weight/spectral norm) are computed once, here, with autograd in
        # the caller's mode, and reused by every call of f in this forward.
        with parametrize.cached():
            for m in f.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
            first = _FirstCall(f)
            try:
                sol = fixed_point(
                    f,
                    z_init,
                    solver,
                    args=(x,),
                    backward=self.backward,
                    independent=self.independent,
                    nonfinite=self.nonfinite,
                    trace=self.trace,
                    solve_dtype=self.solve_dtype if training else self.eval_solve_dtype,
                    causal=self.causal,
                    keep_iterates=keep,
                )
            except Exception as e:
                err = _first_call_error(e, z_init, x, source) if first.failed else None
                if err is None:  # a failure after f has worked once is f's own: untouched
                    raise
                raise err from e
            finally:
                first.remove()
        if use_cache:
            cache.update(cache_keys, flatten(sol.value, layout))
        return sol.value, sol


def _policy_field(name: str) -> property:
    """A ``DEQ`` attribute that reads the policy's field ``name``; setting it replaces the
    policy by a copy with the new value (checked again)."""

    def get(self: DEQ) -> Any:
        return getattr(self.policy, name)

    def set_(self: DEQ, value: Any) -> None:
        self.policy = dataclasses.replace(self.policy, **{name: value})

    return property(get, set_, doc=f"The solve policy's ``{name}`` (``DEQ.policy``).")


class DEQ(nn.Module):
    """Deep equilibrium layer: ``z* = f(z*, x)``, differentiated by ``backward``.

    ``f`` is an ``nn.Module`` called as ``f(z, x)``; ``x`` is a tensor or a tuple of tensors
    batched along dim 0 (input injection, memory, masks: the engine slices them together with
    ``z`` when only some samples are still iterating); ``z`` is a tensor or a tuple of tensors
    (multiscale states). The layer holds ``f`` and a ``SolvePolicy`` (``policy``: solvers,
    backward, dtypes, causality, correction), which it applies to f in every forward; the
    registered models hold their f and apply the policy of their ``config.solve`` themselves.

    Initial state, in order of precedence: the ``z0`` argument; the previous call's
    equilibrium when ``warm_start=True`` and x has the same shapes (e.g. consecutive segments of a
    sequence; call ``reset_warm_start`` between unrelated batches); ``f.init_state(x)``
    when f defines it; ``torch.zeros_like(x)``.

    In training mode ``solver`` is used, in eval mode ``eval_solver`` (default: ``solver``;
    the papers use more steps at evaluation). Gradients follow autograd, not the module mode:
    in eval mode they still flow when grad is enabled and something requires it.

    Once per forward, before solving, the layer calls ``reset_deq_state()`` on every submodule
    of f that defines it (e.g. ``deepeq.nn.VariationalDropout`` draws a fresh mask) and
    computes parametrised weights (``deepeq.weight_norm``, ``deepeq.spectral_norm``)
    once; every iteration, the tracked call and the backward solve then share them.

    Mixed precision: under ``torch.autocast`` f runs in the autocast dtype while the solver
    state, residuals and the backward linear solve stay in float32: a z0 (given or built from x)
    in a floating dtype narrower than float32 is promoted to float32 (float32 and float64 states
    are kept as they are).

    Args:
        f: the layer ``f(z, x)``.
        solver: forward solver in training mode.
        backward: gradient rule (default ``ImplicitBackward()``).
        eval_solver: forward solver in eval mode (default: ``solver``).
        independent: False if f mixes samples (see ``deepeq.fixed_point``).
        nonfinite: ``"raise"`` or ``"return"`` (see ``deepeq.fixed_point``).
        warm_start: start from the previous call's equilibrium when shapes match.
        trace: record per-step residuals in ``solution.stats.trace``.
        solve_dtype: in training mode, run f in this autocast dtype (``torch.bfloat16``) during
            the forward solver's iterations only (see ``deepeq.fixed_point``): cheaper
            iterations whose round-off (~0.4% for bf16) lies below a capped training solve's
            residual; the tracked call and the backward stay in full precision.
        eval_solve_dtype: the same in eval mode (default None: full precision, so that the
            eval solver can reach tight tolerances).
        causal: z is a sequence ``(B, T, ...)`` and f is causal along T: solve so that outputs
            at position t never depend on later positions, at any tolerance and cap (see
            ``deepeq.fixed_point``). Every registered sequence DEQ uses it.
        correction: fixed-point correction (``deepeq.FixedPointCorrection``): in training
            mode, with autograd recording, ``solution.trajectory`` holds the supervised
            iterates' one-step states (steps picked from the training solver's cap).
        cache: a per-example fixed-point cache (``deepeq.nn.FixedPointCache``): in
            training mode, a call with ``cache_keys`` starts each cached example from its
            stored equilibrium and stores the new ones.

    Examples:
        >>> import torch, deepeq
        >>> class Layer(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(8, 8)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> torch.manual_seed(0) and None
        >>> deq = deepeq.DEQ(Layer(), solver=deepeq.Anderson(rtol=1e-5))
        >>> x = torch.randn(4, 8)
        >>> z, sol = deq(x)
        >>> z.pow(2).sum().backward()
        >>> sol.status.name, deq.f.lin.weight.grad is not None
        ('CONVERGED', True)
    """

    solver = _policy_field("solver")
    eval_solver = _policy_field("eval_solver")
    backward_rule = _policy_field("backward")
    independent = _policy_field("independent")
    nonfinite = _policy_field("nonfinite")
    trace = _policy_field("trace")
    solve_dtype = _policy_field("solve_dtype")
    eval_solve_dtype = _policy_field("eval_solve_dtype")
    causal = _policy_field("causal")
    correction = _policy_field("correction")

    def __init__(
        self,
        f: nn.Module,
        solver: AbstractSolver | None = None,
        backward: AbstractBackward | None = None,
        eval_solver: AbstractSolver | None = None,
        *,
        independent: bool = True,
        nonfinite: Literal["raise", "return"] = "raise",
        warm_start: bool = False,
        trace: bool = False,
        solve_dtype: torch.dtype | str | None = None,
        eval_solve_dtype: torch.dtype | str | None = None,
        causal: bool = False,
        correction: FixedPointCorrection | None = None,
        cache: FixedPointCache | None = None,
    ):
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(
                f"DEQ(f) needs an nn.Module f(z, x) so that its parameters are registered; got "
                f"{type(f).__name__}. For a plain function use deepeq.fixed_point."
            )
        self.f = f
        self.policy = SolvePolicy(
            solver=solver,
            eval_solver=eval_solver,
            backward=backward,
            independent=independent,
            nonfinite=nonfinite,
            trace=trace,
            solve_dtype=solve_dtype,
            eval_solve_dtype=eval_solve_dtype,
            causal=causal,
            correction=correction,
        )
        if cache is not None and not isinstance(cache, FixedPointCache):
            raise TypeError(
                f"DEQ cache must be a deepeq.nn.FixedPointCache or None; got {type(cache).__name__}."
            )
        self.cache = cache
        self.warm_start = warm_start
        self._last: State | None = None
        self._last_sig: tuple | None = None

    def reset_warm_start(self) -> None:
        """Forget the stored equilibrium (warm start begins from the default z0 again)."""
        self._last = None
        self._last_sig = None

    def _initial_state(self, x: Any, z0: State | None) -> tuple[State, str]:
        """The initial state and where it comes from (named by the error of a failing first
        call of f)."""
        if z0 is not None:
            return z0, "the z0 argument"
        if self.warm_start and self._last is not None and self._last_sig == _signature(x):
            return self._last, "the previous call's equilibrium (warm_start)"
        init = getattr(self.f, "init_state", None)
        if callable(init):
            return init(x), "f.init_state(x)"
        if not isinstance(x, Tensor):
            raise TypeError(
                f"DEQ cannot build a default z0 for x of type {type(x).__name__}: pass z0=..., "
                f"or define f.init_state(x) returning the initial state."
            )
        return (
            torch.zeros_like(x),
            "zeros_like(x): without z0= or f.init_state(x), z has the shape of x",
        )

    def forward(
        self, x: Any, z0: State | None = None, *, cache_keys: Tensor | None = None
    ) -> tuple[State, Solution]:
        """Solve for the equilibrium (``policy.solve`` on f from the initial state).

        Args:
            x: input injection, a tensor ``(B, ...)`` or a tuple of such tensors.
            z0: optional initial state.
            cache_keys: ``(B,)`` example ids for the fixed-point cache (training mode only;
                ignored without a cache).

        Returns:
            ``(z_star, solution)``; ``z_star`` is ``solution.value``.
        """
        z, sol = self.policy._solve(
            self.f, x, lambda: self._initial_state(x, z0), self.training, self.cache, cache_keys
        )
        if self.warm_start:
            self._last = z.detach() if isinstance(z, Tensor) else type(z)(p.detach() for p in z)
            self._last_sig = _signature(x)
        return z, sol

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver}, eval_solver={self.eval_solver}, "
            f"backward={self.backward_rule}, warm_start={self.warm_start}"
            + (", causal=True" if self.causal else "")
            + (f", solve_dtype={self.solve_dtype}" if self.solve_dtype is not None else "")
        )


def _full_precision_under_autocast(z: State) -> State:
    """``z`` with its half-precision floating tensors (float16, bfloat16) promoted to float32
    when autocast is on for their device: the equilibrium state stays in float32 while f runs
    in the autocast dtype (an fp16 state makes the backward solve overflow)."""

    def one(t: Tensor) -> Tensor:
        low = t.is_floating_point() and t.dtype.itemsize < 4
        return t.float() if low and torch.is_autocast_enabled(t.device.type) else t

    return one(z) if isinstance(z, Tensor) else type(z)(one(t) for t in z)


def _signature(x: Any) -> tuple:
    """Shapes, dtypes and devices of the tensors in x: warm start requires an identical one."""
    parts = [x] if isinstance(x, Tensor) else list(x) if isinstance(x, tuple | list) else []
    return tuple((tuple(p.shape), p.dtype, p.device) for p in parts if isinstance(p, Tensor))


class _FirstCall:
    """Hooks on ``f`` that tell whether its first call in a solve raised (``failed``): started
    and never finished. Both hooks remove themselves once they have fired, so later calls of f
    run without them."""

    def __init__(self, f: nn.Module):
        self.started = self.finished = False
        self._pre = f.register_forward_pre_hook(self._on_start)
        self._post = f.register_forward_hook(self._on_finish)

    def _on_start(self, module, args) -> None:
        self.started = True
        self._pre.remove()

    def _on_finish(self, module, args, output) -> None:
        self.finished = True
        self._post.remove()

    @property
    def failed(self) -> bool:
        return self.started and not self.finished

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()


def _first_call_error(e: Exception, z0: State, x: Any, source: str) -> Exception | None:
    """An exception of ``e``'s type whose message adds what f received on its first call, for
    the errors a mismatch of shapes, dtypes or arguments raises (``RuntimeError``, ``ValueError``,
    ``TypeError``, ``IndexError``; out of memory excepted); None for the others (f's own bugs,
    e.g. an ``AttributeError``, keep their message) and for types whose constructor does not
    take a message."""
    oom = getattr(torch, "OutOfMemoryError", ())
    if not isinstance(e, RuntimeError | ValueError | TypeError | IndexError) or isinstance(e, oom):
        return None
    msg = (
        f"f(z, x) failed on its first call, with z0 {_describe(z0)} (from {source}) and x "
        f"{_describe(x)}: {type(e).__name__}: {e}. Check that f accepts these shapes (e.g. the "
        f"input features of its first layers), or pass z0= / define f.init_state(x) for a "
        f"state of another shape."
    )
    try:
        return type(e)(msg)
    except Exception:  # an exception type whose constructor takes other arguments
        return None
