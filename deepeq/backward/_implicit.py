"""Implicit differentiation of the equilibrium (IFT), without tensor hooks."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .._driver import DriverOptions
from .._driver import solve as driver_solve
from .._flatten import layout_of
from .._norm import safe_norm
from .._solution import BackwardStats, ConvergenceWarning, Status
from ..solvers import AbstractSolver, Anderson
from ..solvers._base import _check_int, bmv, bvm, check_damping, check_solver
from ._base import AbstractBackward

logger = logging.getLogger("deepeq")


@dataclass(frozen=True, kw_only=True)
class ImplicitBackward(AbstractBackward):
    """Implicit-function-theorem gradients (Bai et al. 2019, Theorem 1).

    The forward iterations run without an autograd graph; then ONE tracked call ``f(z*)`` is
    made from a detached leaf ``z*``. In the backward pass, with ``v = dL/dz*`` and
    ``J = ∂f/∂z`` at ``z*``, the linear fixed point ``g = Jᵀ g + v`` is solved per sample by
    ``solver``, started at ``g = v``, using vector-Jacobian products through that single call
    (a cap of k steps costs k + 1 of them), and ``g`` is then
    propagated through it to f's parameters, ``args`` and anything f closes over:
    ``dL/dθ = gᵀ ∂f/∂θ = v (I - J)⁻¹ ∂f/∂θ``. Memory is that of one call of f, whatever the
    number of forward steps. Implemented with a module-level ``torch.autograd.Function``.

    Samples that reach ``max_steps`` with a shrinking residual are normal (counted in
    ``Solution.backward``). A sample whose backward solve *diverged* (non-finite, or final
    residual above ``||v||``, the residual of ``g = 0``) gets the ``fallback``: ``"phantom"``
    (default) replaces its g by the phantom gradient at ``z*``,
    ``g = (1-β) Σ_{i<k} ((1-β) Jᵀ + β I)^i v`` with ``k = fallback_steps`` and
    ``β = fallback_damping`` (``k=1, β=0`` is the Jacobian-free gradient ``g = v``);
    ``"raise"`` raises ``FloatingPointError``. Fallbacks are counted in ``Solution.backward``
    and logged on the ``"deepeq"`` logger (never a Python warning).

    ``init="shine"`` starts the backward solve from the forward solver's own estimate of the
    inverse Jacobian instead of ``v`` (SHINE, Ramzi et al. 2022): Broyden keeps
    ``(I - J_f)⁻¹ ≈ I - Σ_i u_i v_iᵀ`` at its last iterate, so ``g₀ = v - Σ_i (u_i·v) v_i`` costs
    no vector-Jacobian product. With ``solver=None`` the backward makes no iterations at all and
    ``g = g₀`` (``init="v"``: the Jacobian-free gradient; ``"shine"``: SHINE without refinement),
    and no residual is measured (``Solution.backward`` then has ``nfe = 0`` and no residuals);
    with a solver, ``g₀`` is refined by it as usual.

    Double backward (``create_graph=True`` through the equilibrium) is not supported and
    raises ``RuntimeError``.

    Args:
        solver: solver for the backward linear fixed point (own tolerances), or None (no
            iterations: ``g`` is the initial guess).
        init: the backward solve's initial guess, ``"v"`` (``dL/dz*``, the first Neumann term) or
            ``"shine"`` (needs a forward solver with an inverse estimate: ``deepeq.Broyden``).
        fallback: ``"phantom"`` or ``"raise"``.
        fallback_steps: k of the phantom fallback.
        fallback_damping: β of the phantom fallback, in ``[0, 1)``.

    Examples:
        >>> import torch, deepeq
        >>> A = torch.tensor([[0.5]], dtype=torch.float64)
        >>> x = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
        >>> sol = deepeq.fixed_point(lambda z, x: z @ A.T + x, torch.zeros(1, 1, dtype=torch.float64),
        ...                          deepeq.Broyden(rtol=1e-12), args=(x,),
        ...                          backward=deepeq.ImplicitBackward(solver=deepeq.Broyden(rtol=1e-12)))
        >>> sol.value.backward()
        >>> round(x.grad.item(), 8)  # (1 - 0.5)^-1
        2.0
        >>> sol.backward.status.name
        'CONVERGED'
    """

    solver: AbstractSolver | None = field(default_factory=lambda: Anderson(rtol=1e-4, max_steps=30))
    init: Literal["v", "shine"] = "v"
    fallback: Literal["phantom", "raise"] = "phantom"
    fallback_steps: int = 1
    fallback_damping: float = 0.0

    def __post_init__(self) -> None:
        if self.solver is not None:
            check_solver(self.solver, "ImplicitBackward.solver", ", or None (no iterations)")
        if self.init not in ("v", "shine"):
            raise ValueError(f"ImplicitBackward.init must be 'v' or 'shine'; got {self.init!r}.")
        if self.fallback not in ("phantom", "raise"):
            raise ValueError(
                f"ImplicitBackward.fallback must be 'phantom' or 'raise'; got {self.fallback!r}."
            )
        _check_int("ImplicitBackward", "fallback_steps", self.fallback_steps, 1)
        check_damping("ImplicitBackward", "fallback_damping", self.fallback_damping)

    def check_forward_solver(self, solver: AbstractSolver) -> None:
        """Raise if this rule cannot work after a forward solve by ``solver``
        (``init="shine"`` needs a solver that keeps an inverse-Jacobian estimate)."""
        if (
            self.init == "shine"
            and type(solver).inverse_estimate is AbstractSolver.inverse_estimate
        ):
            raise ValueError(
                f"ImplicitBackward(init='shine') starts the backward solve from the forward "
                f"solver's inverse-Jacobian estimate, which {type(solver).__name__} does not "
                f"keep. Use deepeq.Broyden(...) for the forward solve (models: solve.solver = 'broyden'), "
                f"or init='v'."
            )

    def apply(self, problem):
        self.check_forward_solver(problem.solver)
        with torch.no_grad():
            r = problem.solve(state=self.init == "shine")
        z, status, stats = r.z, r.status, r.stats
        z_leaf = z.detach().requires_grad_()
        with torch.enable_grad():
            fz = problem.call(z_leaf)
        if not _reaches_other_leaves(fz, z_leaf):
            # Nothing f depends on requires grad: plain values, no graph kept.
            return problem.finish(z, status, stats, fz=fz, z_leaf=z_leaf, iterates=r.iterates)
        holder = BackwardStats()
        factors = None
        if r.final is not None and r.final.state is not None:
            factors = problem.solver.inverse_estimate(r.final.state)
        coupled = not problem.independent
        value = _ImplicitFunction.apply(fz, z_leaf, z, self, holder, factors, coupled)
        return problem.finish(
            value, status, stats, backward=holder, fz=fz, z_leaf=z_leaf, iterates=r.iterates
        )


def _reaches_other_leaves(fz: Tensor, z_leaf: Tensor) -> bool:
    """Does fz's graph reach any tensor requiring grad other than z_leaf? (Early-exit search.)"""
    if fz.grad_fn is None:
        return False
    seen, stack = set(), [fz.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and var is not z_leaf:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


class _ImplicitFunction(torch.autograd.Function):
    """Identity on z* in the forward pass; IFT linear solve in the backward pass."""

    @staticmethod
    def forward(ctx, fz, z_leaf, z, rule, holder, factors, coupled):
        ctx.save_for_backward(fz, z_leaf)
        ctx.rule, ctx.holder, ctx.factors, ctx.coupled = rule, holder, factors, coupled
        return z.clone()

    @staticmethod
    def backward(ctx, v):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ImplicitBackward does not support double backward (create_graph=True through "
                "the equilibrium). For Jacobian regularisation differentiate the tracked call "
                "instead (deepeq.jacobian_penalty(sol.fz, sol.z_leaf)); for higher-order "
                "gradients use backward=deepeq.UnrolledBackward()."
            )
        fz, z_leaf = ctx.saved_tensors
        rule, holder = ctx.rule, ctx.holder
        t0 = time.perf_counter()
        v = v.contiguous()
        # A non-finite upstream gradient (e.g. from sqrt at 0) is handed through as it is, so
        # that the caller's guard sees it; the other samples are solved for as usual.
        finite = torch.isfinite(v).all(1)
        v_in, clean = v, bool(finite.all())
        if not clean:
            v = torch.where(finite.unsqueeze(1), v, 0.0)

        def vjp(g: Tensor) -> Tensor:
            return torch.autograd.grad(fz, z_leaf, g, retain_graph=True)[0]

        def h(g: Tensor) -> Tensor:  # the linear fixed-point map g -> Jᵀ g + v
            return vjp(g) + v

        # The solve starts from g = v (the first Neumann term, = h(0): starting from 0 would
        # spend its first vjp on Jᵀ0 = 0) or from the forward solver's inverse estimate.
        g0 = v.clone() if ctx.factors is None else _shine(v, *ctx.factors)
        if rule.solver is None:
            holder.calls += 1
            holder.status = holder.abs_residual = holder.rel_residual = holder.converged = None
            holder.num_steps = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
            holder.fallback = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
            holder.nfe = 0
            holder.wall_time = time.perf_counter() - t0
            if not clean:
                g0 = torch.where(finite.unsqueeze(1), g0, v_in)
            return g0, None, None, None, None, None, None
        # The vjp runs on the full batch (one recorded graph), so samples are not independent
        # for the driver; converged samples are still frozen unless f couples the samples (then
        # Jᵀ does too, and the batch converges as a whole).
        opts = DriverOptions(independent=False, nonfinite="return", coupled=ctx.coupled)
        r = driver_solve(h, g0, rule.solver, layout_of(v), (), opts)
        g, status, st = r.z, r.status, r.stats
        v_norm = safe_norm(v, 1)
        diverged = st.nonfinite | (st.abs_residual > v_norm)
        nfe = st.nfe
        if bool(diverged.any()):
            ids = diverged.nonzero().flatten().tolist()
            msg = (
                f"ImplicitBackward: the backward solve diverged for {len(ids)} of {v.shape[0]} "
                f"samples (first: {ids[:8]}; residual above ||dL/dz*|| or non-finite)"
            )
            if rule.fallback == "raise":
                raise FloatingPointError(
                    msg + ". The Jacobian at the equilibrium is probably not contractive: add "
                    "Jacobian regularisation or weight normalisation, use a stronger backward "
                    "solver, or use fallback='phantom'."
                )
            g_fb, k = _phantom_adjoint(vjp, v, rule.fallback_steps, rule.fallback_damping)
            nfe += k
            g = torch.where(diverged.unsqueeze(1), g_fb, torch.nan_to_num(g))
            logger.info("%s; used the phantom gradient (k=%d).", msg, rule.fallback_steps)
        if status is Status.NONFINITE and not bool(diverged.any()):  # pragma: no cover
            raise AssertionError("non-finite backward samples must be marked diverged")
        converged = st.converged
        if not clean:
            g = torch.where(finite.unsqueeze(1), g, v_in)
            converged = converged & finite
            status = Status.NONFINITE
        elif status is Status.MAX_STEPS and bool((~st.converged & ~diverged).any()):
            warnings.warn(_CAPPED, ConvergenceWarning, stacklevel=1)
        holder.calls += 1
        holder.status = status
        holder.abs_residual = st.abs_residual
        holder.rel_residual = st.rel_residual
        holder.num_steps = st.num_steps
        holder.converged = converged
        holder.fallback = diverged
        holder.nfe = nfe
        holder.wall_time = time.perf_counter() - t0
        return g, None, None, None, None, None, None


_CAPPED = (
    "ImplicitBackward: the backward linear solve reached max_steps before meeting its tolerance "
    "for some samples, so their gradient is approximate (meaningless where the residual did not "
    "fall: Solution.backward.rel_residual near 1). Check Solution.backward.status and "
    ".rel_residual; raise the backward solver's max_steps (models: solve.b_max_steps), loosen "
    "its rtol, or make f contractive (Jacobian regularisation). Shown once; "
    "warnings.simplefilter('always', deepeq.ConvergenceWarning) shows every occurrence."
)


def _shine(v: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``vᵀ(I - J_f)⁻¹ ≈ v - Σ_i (u_i·v) v_i`` from the forward solver's factors ``(B, m, D)``;
    a sample whose estimate is not finite starts from v."""
    g0 = v - bvm(bmv(U, v), V)
    ok = torch.isfinite(g0).all(1, keepdim=True)
    return torch.where(ok, g0, v)


def _phantom_adjoint(vjp, v: Tensor, steps: int, damping: float) -> tuple[Tensor, int]:
    """``(1-β) Σ_{i<k} M^i v`` with ``M = (1-β) Jᵀ + β I``: the adjoint of k damped steps
    linearised at z*. Returns it and the number of vjps used."""
    w, acc = v, v
    for _ in range(steps - 1):
        w = (1 - damping) * vjp(w) + damping * w
        acc = acc + w
    return (1 - damping) * acc, steps - 1
