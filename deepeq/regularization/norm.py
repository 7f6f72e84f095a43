"""Weight and spectral normalisation as parametrisations that suit equilibrium layers."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrizations


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``g * v / ||v||`` (Salimans & Kingma 2016; used by the
    DEQ papers for every layer of f). ``g`` starts at ``||v||``, so the function is unchanged
    at initialisation; gradients reach ``g`` and ``v`` (``module.parametrizations.<name>.original0``
    and ``.original1``).

    Built on ``torch.nn.utils.parametrizations.weight_norm``. Inside ``deepeq.DEQ`` the
    normalised weight is computed ONCE per forward call (not once per solver iteration) and
    shared by every iteration, the tracked call and the backward solve.

    Examples:
        >>> import torch, deepeq
        >>> lin = torch.nn.Linear(3, 3)
        >>> w = lin.weight.detach().clone()
        >>> lin = deepeq.weight_norm(lin)
        >>> torch.allclose(lin.weight, w)
        True
    """
    return parametrizations.weight_norm(module, name=name, dim=dim)


def spectral_norm(
    module: nn.Module, name: str = "weight", n_power_iterations: int = 1
) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``W / σ_max(W)`` (Miyato et al. 2018), with σ_max
    estimated by power iteration that advances once per weight computation in training mode and
    is frozen in eval mode. Inside ``deepeq.DEQ`` that is once per forward call.

    Built on ``torch.nn.utils.parametrizations.spectral_norm``.

    Examples:
        >>> import torch, deepeq
        >>> lin = deepeq.spectral_norm(torch.nn.Linear(8, 8), n_power_iterations=50)
        >>> round(torch.linalg.matrix_norm(lin.weight.detach(), 2).item(), 3)
        1.0
    """
    return parametrizations.spectral_norm(module, name=name, n_power_iterations=n_power_iterations)
