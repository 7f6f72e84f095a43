"""Constructive versions of the DEQ papers' universality theorems (Bai et al. 2019, §B-§C).

* Theorem 3: any L-layer feed-forward network ``z[i+1] = σ_i(W_i z[i] + b_i)`` equals L
  applications, from zero, of ONE weight-tied input-injected layer
  ``z̃ <- σ(W_z z̃ + W_x x + b̃)`` (``weight_tied_equivalent``).
* Theorem 2: two stacked equilibrium layers equal a single equilibrium layer over the
  concatenated state (``StackedEquilibrium``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn

ELEMENTWISE = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
)


class WeightTiedEquivalent(nn.Module):
    """The weight-tied layer ``f(z̃, x) = σ(W_z z̃ + W_x x + b̃)`` of Theorem 3.

    ``z̃ = [z̃_1, …, z̃_L]`` stacks one block per layer of the original network (block i has layer
    i's output width). ``W_z`` is block sub-diagonal (block (i, i-1) is ``W_i``), ``W_x`` feeds the
    first block (``W_1``), ``b̃`` stacks the biases and σ applies ``σ_i`` to block i. After k
    applications from ``z̃ = 0`` blocks 1..k hold the network's first k layer outputs, so after L
    applications the last block is the network's output. ``W_z`` is nilpotent, so ``z̃`` after L
    applications is also the layer's exact fixed point: a DEQ with this f computes the network.

    Attributes:
        depth: L.
        widths: the block widths.
    """

    def __init__(
        self, W_z: Tensor, W_x: Tensor, bias: Tensor, widths: list[int], activations: list[Callable]
    ):
        super().__init__()
        self.W_z = nn.Parameter(W_z)
        self.W_x = nn.Parameter(W_x)
        self.bias = nn.Parameter(bias)
        self.widths = list(widths)
        self.activations = nn.ModuleList(
            a if isinstance(a, nn.Module) else nn.Identity() for a in activations
        )
        self.depth = len(widths)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        pre = z @ self.W_z.T + x @ self.W_x.T + self.bias  # (B, Σ widths)
        parts = torch.split(pre, self.widths, dim=-1)
        return torch.cat([act(p) for act, p in zip(self.activations, parts, strict=True)], dim=-1)

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], sum(self.widths))

    def output(self, z: Tensor) -> Tensor:
        """The last block (the original network's output)."""
        return z[..., -self.widths[-1] :]


def weight_tied_equivalent(network: nn.Sequential | list[nn.Module]) -> WeightTiedEquivalent:
    """Build the Theorem-3 weight-tied layer of a feed-forward network.

    Args:
        network: ``nn.Linear`` layers, each optionally followed by ONE elementwise activation
            module (ReLU, Tanh, Sigmoid, GELU, …; none means identity). Widths may differ.

    Returns:
        A ``WeightTiedEquivalent`` whose ``L``-fold application from zero (or equilibrium)
        reproduces ``network(x)`` in its last block.

    Raises:
        TypeError: for a module that is neither ``nn.Linear`` nor a supported activation, or an
            activation not preceded by a linear layer.

    Examples:
        >>> import torch
        >>> from deepeq.analysis import weight_tied_equivalent
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).double()
        >>> f = weight_tied_equivalent(net)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z = f.init_state(x)
        >>> for _ in range(f.depth):
        ...     z = f(z, x)
        >>> torch.allclose(f.output(z), net(x), atol=1e-12)
        True
    """
    layers: list[tuple[nn.Linear, nn.Module]] = []
    for m in list(network):
        if isinstance(m, nn.Linear):
            layers.append((m, nn.Identity()))
        elif isinstance(m, ELEMENTWISE):
            if not layers or not isinstance(layers[-1][1], nn.Identity):
                raise TypeError(
                    f"Activation {m} must directly follow an nn.Linear (one per layer)."
                )
            layers[-1] = (layers[-1][0], m)
        else:
            raise TypeError(
                f"weight_tied_equivalent handles nn.Linear layers with elementwise activations "
                f"{[c.__name__ for c in ELEMENTWISE]}; got {type(m).__name__}."
            )
    if not layers:
        raise TypeError("weight_tied_equivalent needs at least one nn.Linear layer.")
    widths = [lin.out_features for lin, _ in layers]
    for (a, _), (b, _) in itertools.pairwise(layers):
        if a.out_features != b.in_features:
            raise TypeError(f"Layer widths do not chain: {a} followed by {b}.")
    ref = layers[0][0].weight
    n, d_in = sum(widths), layers[0][0].in_features
    W_z = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
    W_x = torch.zeros(n, d_in, dtype=ref.dtype, device=ref.device)
    bias = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    with torch.no_grad():
        for i, (lin, _) in enumerate(layers):
            rows = slice(offsets[i], offsets[i + 1])
            if i == 0:
                W_x[rows] = lin.weight
            else:
                W_z[rows, offsets[i - 1] : offsets[i]] = lin.weight
            if lin.bias is not None:
                bias[rows] = lin.bias
    return WeightTiedEquivalent(W_z, W_x, bias, widths, [act for _, act in layers])


class StackedEquilibrium(nn.Module):
    """Theorem 2: ONE equilibrium layer equivalent to two stacked ones.

    With ``z1* = f1(z1*; x)`` and ``z2* = f2(z2*; z1*)``, the layer over ``w = (w1, w2)``
    ``Γ(w; x) = (f1(w1; x), f2(w2; f1(w1; x)))`` has the fixed point ``(z1*, z2*)``: its second part
    is the stacked DEQs' output. Use it with ``deepeq.DEQ`` (tuple state); values and
    gradients equal those of the two stacked DEQs (tested).

    Args:
        f1: ``f1(z1, x)``.
        f2: ``f2(z2, z1)`` (its injection is the first equilibrium).
    """

    def __init__(self, f1: nn.Module, f2: nn.Module):
        super().__init__()
        self.f1, self.f2 = f1, f2

    def forward(self, w: tuple[Tensor, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.f1(w[0], x)
        return (a, self.f2(w[1], a))
