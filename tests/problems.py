"""Fixed-point problems with known solutions, shared by tests and benchmarks."""

from __future__ import annotations

import math

import torch

DOTTIE = 0.7390851332151607  # the solution of z = cos(z)


def linear_problem(rho: float, dim: int, batch: int, gen: torch.Generator, dtype=torch.float64):
    """``f(z, b) = z Aᵀ + b`` with A symmetric, eigenvalues spread over [-rho, rho] (so its spectral
    radius and norm are exactly rho). Returns (f, b, z_star) with z* = (I - A)⁻¹ b."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    lam = torch.linspace(-rho, rho, dim, dtype=torch.float64)
    A = (q * lam) @ q.T
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, b.T).T
    A, b, z_star = A.to(dtype), b.to(dtype), z_star.to(dtype)

    def f(z, b):
        return z @ A.T + b

    return f, b, z_star


def tanh_mlp_problem(dim: int, batch: int, gen: torch.Generator, norm: float = 0.8):
    """``f(z, x) = tanh(z Wᵀ + x)`` with ||W||₂ = norm < 1: a contraction. The reference z* comes
    from plain iteration to 1e-15, which is exact to float64 precision for a contraction."""
    W = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    W = norm * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    z = torch.zeros_like(x)
    steps = int(math.log(1e-17) / math.log(norm)) + 10
    for _ in range(steps):
        z = f(z, x)
    return f, x, z


class Counting:
    """Wraps f and counts calls and evaluated rows, independently of the driver's bookkeeping."""

    def __init__(self, f):
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, z, *args):
        self.calls += 1
        self.rows += (z[0] if isinstance(z, tuple | list) else z).shape[0]
        return self.f(z, *args)
