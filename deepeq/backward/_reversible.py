"""Exact gradients of the reversible scheme's last iterate, reconstructing the iterates backwards."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .._context import _SAMPLE_INDEX
from .._driver import _autocast_state, _map_args
from .._flatten import check_output, flatten, unflatten
from .._norm import safe_norm
from .._solution import BackwardStats
from ..solvers import AbstractSolver
from ._base import AbstractBackward

logger = logging.getLogger("deepeq")


@dataclass(frozen=True, kw_only=True)
class ReversibleBackward(AbstractBackward):
    """The exact gradient of the iterate ``deepeq.Reversible`` returns, at O(1) memory
    (McCallum et al. 2025, "Reversible deep equilibrium models").

    The forward iterations run without a graph. In the backward pass each sample's iterations
    are undone one by one from its own last step, ``y_k = (y_{k+1} - β f(z_{k+1})) / (1 - β)``,
    ``z_k = (z_{k+1} - β f(y_k)) / (1 - β)``, and the adjoint of each step is taken through a
    fresh tracked call of f at the reconstructed point (two per step; four when f computes
    differently with autograd on, e.g. a fused attention kernel used only without grad: the
    values are then recomputed without grad, as in the forward), so the gradient is that
    of the computed ``z_N`` — what autograd through the same iterations
    (``deepeq.UnrolledBackward``) gives — to parameters, ``args``, ``z0`` and anything f
    closes over, with the memory of one call of f whatever N. Unlike the implicit gradient it
    does not assume ``z_N`` is an exact fixed point.

    Round-off: the reconstructed iterates drift from the forward ones by about
    ``ε / (1 - β)^m`` after m undone steps (the forward map contracts, its inverse expands), but
    the adjoint they are weighted by shrinks at least as fast, so the gradient stays at
    round-off level (measured in docs/results/reversible.md). A sample's reversal stops once its
    adjoint is below ``ε ||dL/dz_N||``, before the drift can overflow; the backward pass
    reports the drift as the error of the reconstructed ``z_0``
    (``Solution.backward.reconstruction_error``, relative to ``||z_N||``; NaN where the
    reversal stopped early) and logs on the ``"deepeq"`` logger when it exceeds
    ``warn_error``. Every sample takes at least one step (a sample whose ``z0`` is already a
    fixed point still gets a gradient from f).

    f must be deterministic across calls (no fresh dropout masks inside f; deepeq's variational
    dropout keeps one mask per forward pass) and should take per-sample tensors through
    ``args``: tensors f closes over that require grad and are not leaves (an injection computed
    outside f) are handled correctly but their graph is traversed at every undone step.
    Unlike ``deepeq.ImplicitBackward`` no tracked call ``f(z*)`` is kept (``Solution.fz``
    is None), so Jacobian regularisation, which differentiates that call, needs the implicit
    backward.

    Drift beyond round-off sets in after ~20-30 undone steps (float32 models, β = 0.5) or ~10
    (β = 0.8), faster where f's Jacobian is large (bench/reversible.py: up to 40% gradient error
    at 100 steps without checkpoints). ``checkpoint_every = C`` (default 10) therefore stores
    both chains every C steps in the forward (no activations: 2 state-sized vectors per
    checkpoint) and the reversal restarts from each stored pair, so the drift never spans more
    than C steps; ``checkpoint_every=None`` keeps the O(1) memory of the pure reversal.

    Args:
        checkpoint_every: C, steps between stored chain pairs, or None (none stored).
        warn_error: log when the reconstruction error of ``z_0`` exceeds this (default 1e-3;
            ``float("inf")``: never).

    Examples:
        >>> import torch, deepeq
        >>> x = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
        >>> sol = deepeq.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 1, dtype=torch.float64),
        ...                          deepeq.Reversible(rtol=1e-12, max_steps=200, beta=0.5), args=(x,),
        ...                          backward=deepeq.ReversibleBackward())
        >>> sol.value.backward()
        >>> round(x.grad.item(), 8)  # (1 - 0.5)^-1 at convergence
        2.0
    """

    checkpoint_every: int | None = 10
    warn_error: float = 1e-3

    def __post_init__(self) -> None:
        c = self.checkpoint_every
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(
                f"ReversibleBackward.checkpoint_every must be an int >= 1 or None; got {c!r}."
            )
        w = self.warn_error
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:  # inf: never
            raise ValueError(f"ReversibleBackward.warn_error must be a float > 0; got {w!r}.")

    def check_forward_solver(self, solver: AbstractSolver) -> None:
        """Raise unless ``solver`` is ``deepeq.Reversible`` (the only invertible scheme)."""
        from ..solvers import Reversible

        if not isinstance(solver, Reversible):
            raise TypeError(
                f"ReversibleBackward undoes the iterations of deepeq.Reversible, the only "
                f"solver whose steps can be inverted; got {type(solver).__name__}. Use "
                f"deepeq.Reversible(beta=...) for the forward solve (models: solver = "
                f"'reversible'), or another backward rule."
            )

    def apply(self, problem):
        self.check_forward_solver(problem.solver)
        with torch.no_grad():
            r = problem.solve(state=True, snapshot_every=self.checkpoint_every or 0, min_steps=1)
        z, status, stats, final = r.z, r.status, r.stats, r.final
        # One tracked call of f finds what f closes over (the parameters to return gradients
        # for), on one sample when samples are independent; its graph is not kept.
        idx = torch.zeros(1, dtype=torch.long, device=z.device) if problem.independent else None
        z1 = z[:1] if idx is not None else z
        z_leaf = z1.detach().requires_grad_()
        with torch.enable_grad():
            fz = _call(problem, z_leaf, idx, problem.args)
        arg_leaves = _tensor_leaves(problem.args)
        params = _closure_leaves(fz, z_leaf, problem.args)
        z0 = problem.z0_tracked
        grad_args = [a for a in arg_leaves if a.requires_grad]
        if not params and not grad_args and not z0.requires_grad:
            return problem.finish(z, status, stats, iterates=r.iterates)
        holder = BackwardStats()
        run = _Reversal(self, problem, final, holder, arg_leaves, len(grad_args), params)
        if problem.iterate_f is problem.f and run.autocast is None:
            # Does f compute the same with autograd on? (then the reversal's tracked calls also
            # give the reconstruction's values: 2 calls of f per undone step instead of 4)
            with torch.no_grad():
                run.replay = not torch.equal(_call(problem, z1, idx, problem.args), fz.detach())
        del fz, z_leaf
        y, zc = final.state  # both chains at each sample's last step (chain dtype)
        snaps = final.snapshots
        run.snap_steps = [k for k, _, _ in snaps]
        flat = [t for _, rows, (ys, zs) in snaps for t in (rows, ys, zs)]
        run.n_inputs = len(grad_args) + len(params)
        value = _ReversibleFunction.apply(run, z, y, zc, z0, len(flat), *flat, *grad_args, *params)
        return problem.finish(value, status, stats, backward=holder, iterates=r.iterates)


def _call(problem, x: Tensor, idx: Tensor | None, args, f=None) -> Tensor:
    """f on flat rows ``x`` of the batch (``idx``: which samples, args sliced alike; None: the
    full batch), flat output in the state's dtype."""
    f = f if f is not None else problem.f
    layout = problem.layout
    if idx is None:
        out = f(unflatten(x, layout), *args)
    else:
        token = _SAMPLE_INDEX.set(idx)
        try:
            out = f(unflatten(x, layout), *_map_args(args, lambda a: a[idx]))
        finally:
            _SAMPLE_INDEX.reset(token)
    check_output(out, layout, x.shape[0], True)
    return flatten(out, layout).to(layout.dtype)


def _tensor_leaves(args) -> list[Tensor]:
    out: list[Tensor] = []
    _map_args(args, lambda a: out.append(a) or a)
    return out


def _closure_leaves(fz: Tensor, z_leaf: Tensor, args) -> list[Tensor]:
    """Tensors requiring grad that ``fz``'s graph reaches other than ``z_leaf`` and ``args``:
    the leaves f closes over (parameters), found by walking the graph; the walk stops at the
    args' own graphs (their gradient is returned as the args' gradient)."""
    if fz.grad_fn is None:
        return []
    skip = {id(z_leaf)}
    stop = set()
    for a in _tensor_leaves(args):
        skip.add(id(a))
        if a.grad_fn is not None:
            stop.add(a.grad_fn)
    seen, found, stack = set(), {}, [fz.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in skip:
                found.setdefault(id(var), var)
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())


class _Vjp:
    """f on the reversal's chain values and its vector-Jacobian products; the gradients of the
    args requiring grad (through detached stand-ins) and of the closed-over leaves accumulate
    in ``acc``."""

    def __init__(self, run: _Reversal, cd: torch.dtype):
        problem = run.problem
        self.problem, self.cd, self.replay = problem, cd, run.replay
        self.f, self.layout, self.T = problem.iterate_f, problem.layout, problem.positions
        stand = {id(a): a.detach().requires_grad_() for a in run.arg_leaves if a.requires_grad}
        self.args = _map_args(problem.args, lambda a: stand.get(id(a), a))
        self.wrt = [stand[id(a)] for a in run.arg_leaves if a.requires_grad] + run.params
        self.acc: list[Tensor | None] = [None] * len(self.wrt)
        device, dtype = self.layout.device.type, run.autocast
        self.scope = (
            (lambda: torch.autocast(device, dtype=dtype))
            if dtype is not None
            else contextlib.nullcontext
        )

    def call(self, x: Tensor, idx: Tensor | None) -> Tensor:
        """f on chain values x (cast to the state's dtype, as in the forward), output in the
        chain dtype."""
        layout, T = self.layout, self.T
        xs = x.to(layout.dtype)
        if T:
            B = layout.batch
            out = self.f(unflatten(xs.reshape(B, -1), layout), *self.args)
            check_output(out, layout, B, True)
            return flatten(out, layout).to(layout.dtype).to(self.cd).reshape(B * T, -1)
        return _call(self.problem, xs, idx, self.args, self.f).to(self.cd)

    def __call__(self, x: Tensor, idx: Tensor | None, cot: Tensor) -> tuple[Tensor, Tensor]:
        """f at x -> (f(x) as the forward computed it, cotᵀ ∂f/∂x); the parameter and arg parts
        are accumulated. ``replay``: f computes otherwise with autograd on (e.g. a fused kernel
        only without grad), so the value is recomputed without grad, as in the forward, or the
        reversal would not retrace the forward's iterates bit for bit."""
        leaf = x.detach().requires_grad_()
        value = None
        if self.replay:
            with torch.no_grad(), self.scope():
                value = self.call(x, idx)
        with torch.enable_grad(), self.scope():
            out = self.call(leaf, idx)
            # retain: a closed-over non-leaf's graph (outside f) is shared by every call
            grads = torch.autograd.grad(
                out, [leaf, *self.wrt], cot, allow_unused=True, retain_graph=True
            )
        for i, g in enumerate(grads[1:]):
            if g is not None:
                self.acc[i] = g if self.acc[i] is None else self.acc[i] + g
        gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        return (out.detach() if value is None else value), gx


class _Reversal:
    """Everything the backward pass needs to undo the iterations (non-tensor state; the
    tensors go through ``ctx.save_for_backward``)."""

    def __init__(self, rule, problem, final, holder, arg_leaves, n_grad_args, params):
        self.rule, self.problem, self.holder = rule, problem, holder
        self.steps, self.bad = final.steps, final.nonfinite
        self.arg_leaves, self.n_grad_args, self.params = arg_leaves, n_grad_args, params
        self.autocast = _autocast_state(problem.layout.device.type)
        self.replay = True  # set by ReversibleBackward.apply

    def reverse(self, v: Tensor, z_out: Tensor, y: Tensor, z: Tensor, z0: Tensor, snaps: dict):
        """Undo the iterations from the chains ``(z_N, y_N)`` (chain dtype; ``z_out``: the
        returned iterate) carrying the adjoints; returns the gradients of z0, the args requiring
        grad and the closed-over leaves (and the stats)."""
        problem = self.problem
        layout, T = problem.layout, problem.positions
        B = layout.batch
        rows_view = (lambda t: t.reshape(B * T, -1)) if T else (lambda t: t)
        cd = y.dtype  # the chains' dtype (float64 by default); f runs in the state's
        z, y = rows_view(z).clone(), rows_view(y).clone()
        v, z0r = rows_view(v).to(cd), rows_view(z0).detach().to(cd)
        steps, bad = self.steps.clone(), self.bad
        if bool(bad.any()):  # non-finite rows: no gradient, held at their last finite iterate
            steps[bad] = 0
            v = torch.where(bad.unsqueeze(1), 0.0, v)
            y = torch.where(bad.unsqueeze(1), z, y)
        full = T > 0 or not problem.independent  # f sees every row (held rows at z_N)
        vjp = _Vjp(self, cd)
        gz, gy = v.clone(), torch.zeros_like(v)
        nfe = 0
        # A unit (a sample; in causal solving its positions together; a coupled batch as one)
        # stops being undone once its adjoint is below round-off, eps * ||dL/dz_N||: what is
        # left of its gradient is then below the float resolution of the result, and the
        # reconstructed iterates, whose round-off grows ~1/(1-β) per undone step, never reach
        # overflow (in float32 they would after ~50-100 steps: inf * 0 = NaN gradients).
        unit = self._unit_sum(B, T, full and not T)
        v_unit = unit(safe_norm(v, 1))
        eps = torch.finfo(layout.dtype).eps
        undone = steps.clone()  # steps undone per row (fewer where the reversal stopped early)
        early = torch.zeros_like(bad)  # rows whose reversal stopped before z_0
        for k in range(int(steps.max()) if steps.numel() else 0, 0, -1):
            small = unit(safe_norm(gz, 1) + safe_norm(gy, 1)) <= eps * v_unit
            stop = small & (steps >= k)
            if k in snaps:  # restart from the stored chains (rows still being undone)
                rows, ys, zs = snaps[k]
                live = steps[rows] >= k
                rows, ys, zs = rows[live], ys[live], zs[live]
                z, y = z.index_copy(0, rows, zs), y.index_copy(0, rows, ys)
            if bool(stop.any()):
                undone = torch.where(stop, steps - k, undone)
                early |= stop
                steps = torch.where(stop, -1, steps)  # held where it is from now on
            act = steps >= k
            if not bool(act.any()):  # rows that stopped earlier in the forward come later
                continue
            undo = self._undo_masked if full else self._undo_rows
            z, y, gz, gy = undo(vjp, act, z0r if k == 1 else None, z, y, gz, gy)
            nfe += 4 if self.replay else 2
        g_z0, err = self._at_z0(z, y, gz, gy, z0r, early, rows_view(z_out), B, T)
        if T:
            undone, early = undone.view(B, T).amax(1), early.view(B, T).any(1)
        err = torch.where(early, float("nan"), err)
        return g_z0.to(z0.dtype), vjp.acc, nfe, err, undone

    def _undo_masked(self, vjp, act, z0r, z, y, gz, gy):
        """One step undone on the whole batch (f sees every row; held rows at their z_N), the
        rows ``act`` moving. ``z0r``: z0 at the first step (y_0 is z0 exactly, not its
        reconstruction: f may have a kink there, e.g. ReLU at 0), else None."""
        beta, m = self.problem.solver.beta, act.unsqueeze(1)
        # y_k = (1-β) y_{k-1} + β f(z_k): undo it, adjoint of f(z_k) is β gy_k
        fzk, g1 = vjp(z, None, torch.where(m, beta * gy, 0.0))
        gz = gz + g1
        y = torch.where(m, (y - beta * fzk) / (1 - beta), y)
        gy = torch.where(m, (1 - beta) * gy, gy)
        # z_k = (1-β) z_{k-1} + β f(y_{k-1}); held rows enter f at their z_N
        yin = torch.where(m, z0r if z0r is not None else y, z)
        fyk, g2 = vjp(yin, None, torch.where(m, beta * gz, 0.0))
        gy = gy + torch.where(m, g2, 0.0)
        gz = torch.where(m, (1 - beta) * gz, gz + g2)
        z = torch.where(m, (z - beta * fyk) / (1 - beta), z)
        return z, y, gz, gy

    def _undo_rows(self, vjp, act, z0r, z, y, gz, gy):
        """One step undone on the rows ``act`` only (independent samples: f on those rows)."""
        beta, idx = self.problem.solver.beta, act.nonzero().squeeze(1)
        zi, yi, gzi, gyi = z[idx], y[idx], gz[idx], gy[idx]
        fzk, g1 = vjp(zi, idx, beta * gyi)
        gzi = gzi + g1
        yi = (yi - beta * fzk) / (1 - beta)
        gyi = (1 - beta) * gyi
        fyk, g2 = vjp(z0r[idx] if z0r is not None else yi, idx, beta * gzi)
        gyi = gyi + g2
        gzi = (1 - beta) * gzi
        zi = (zi - beta * fyk) / (1 - beta)
        z, y = z.index_copy(0, idx, zi), y.index_copy(0, idx, yi)
        gz, gy = gz.index_copy(0, idx, gzi), gy.index_copy(0, idx, gyi)
        return z, y, gz, gy

    @staticmethod
    def _at_z0(z, y, gz, gy, z0r, early, z_final, B: int, T: int):
        """The gradient of z0 (z_0 = y_0 = z0; a row stopped early carries an adjoint below
        round-off: zero) and the reconstruction error of z_0 (both chains) relative to
        ``||z_N||`` per sample (per row before the causal aggregation)."""
        g_z0 = torch.where(early.unsqueeze(1), 0.0, gz + gy)
        err = torch.maximum(safe_norm(z - z0r, 1), safe_norm(y - z0r, 1))
        scale = safe_norm(z_final, 1)
        if T:
            err = safe_norm(err.view(B, T), 1)
            scale = safe_norm(scale.view(B, T), 1)
            g_z0 = g_z0.reshape(B, -1)
        err = torch.where(err == 0, 0.0, err / scale.clamp_min(torch.finfo(err.dtype).tiny))
        return g_z0, err

    @staticmethod
    def _unit_sum(B: int, T: int, coupled: bool):
        """Per-row values -> per-row sums over the row's unit (sample / sample's positions /
        whole coupled batch)."""
        if T:
            return lambda r: r.view(B, T).sum(1).repeat_interleave(T)
        if coupled:
            return lambda r: r.sum().expand_as(r)
        return lambda r: r


class _ReversibleFunction(torch.autograd.Function):
    """Identity on z_N in the forward pass; the reversal in the backward pass."""

    @staticmethod
    def forward(ctx, run, z, y, zc, z0, n_snap, *inputs):
        ctx.save_for_backward(z, y, zc, z0, *inputs[:n_snap])
        ctx.n_snap = n_snap
        ctx.run = run
        ctx.z0_grad = z0.requires_grad
        return z.clone()

    @staticmethod
    def backward(ctx, v):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ReversibleBackward does not support double backward (create_graph=True through "
                "the equilibrium); use backward=deepeq.UnrolledBackward() for higher-order "
                "gradients."
            )
        run: _Reversal = ctx.run
        z, y, zc, z0, *flat = ctx.saved_tensors
        snaps = {
            k: tuple(flat[3 * i : 3 * i + 3]) for i, k in enumerate(run.snap_steps)
        }  # step -> (rows, y, z)
        t0 = time.perf_counter()
        g_z0, acc, nfe, err, steps = run.reverse(v.contiguous(), z, y, zc, z0, snaps)
        h = run.holder
        h.calls += 1
        h.num_steps = steps
        h.fallback = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
        h.nfe = nfe
        h.reconstruction_error = err
        h.wall_time = time.perf_counter() - t0
        worst = float(err.nan_to_num(0.0).max()) if err.numel() else 0.0
        if worst > run.rule.warn_error:
            logger.info(
                "ReversibleBackward: reconstruction error of z_0 up to %.2e (relative to "
                "||z_N||) after undoing %d steps with beta=%g; the gradient carries round-off of "
                "that order. Use fewer steps, a smaller beta or float64.",
                worst, int(steps.max()), run.problem.solver.beta,
            )  # fmt: skip
        return (None, None, None, None, g_z0 if ctx.z0_grad else None, None,
                *([None] * ctx.n_snap), *acc)  # fmt: skip
