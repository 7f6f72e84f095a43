"""Multiscale DEQ (Bai, Koltun & Kolter 2020; Bai et al. 2021 §5): one ``f`` over several
resolutions at once, solved for its equilibrium; image classification head over all
resolutions; its explicit weight-tied twin (the same ``f`` unrolled ``depth`` times).

``f(z, x̃)`` with ``z = (z_0, ..., z_{S-1})``, ``z_i`` of shape ``(B, C_i, H/2^i, W/2^i)``:

1. per resolution a residual block ``h_i = GN(relu(z_i + GN(conv(drop(relu(GN(conv(z_i))))) + x̃_i)))``
   where the injection ``x̃`` enters the highest resolution only (``x̃_i = 0`` for ``i > 0``);
2. multiscale fusion: ``u_j = Σ_i T_ij(h_i)`` with ``T_jj`` the identity, ``i < j`` a chain of
   ``j - i`` stride-2 3x3 convolutions (GroupNorm, ReLU between), ``i > j`` a 1x1 convolution,
   GroupNorm and nearest upsampling by ``2^(i-j)``; then ``z'_j = GN(relu(u_j))``.

The classification head maps each ``z_i`` to ``head_channels[i]`` (1x1 conv), merges from high to
low resolution with stride-2 convolutions, then a 1x1 conv to ``final_channels``, average pooling
to a ``head_pool x head_pool`` grid (1: global, as in the paper; the CPU-size MNIST model uses 2,
which learns much faster than global pooling at 64 channels) and a linear classifier. The calling protocol is the sequence models'::

    logits, state, solutions = model(images)        # images (B, C, H, W); state is None
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._solution import Solution
from ..nn.dropout import VariationalDropout
from ..regularization.norm import weight_norm
from ._core import EQUILIBRIUM, TIED, make_core
from ._protocol import EquilibriumModel
from ._registry import register_model
from ._solve import SolveSpec


@dataclass(frozen=True, kw_only=True)
class MDEQConfig:
    in_channels: int = 1  # image channels
    num_classes: int = 10  # classes of the classifier
    image_size: int = 28  # must halve exactly (len(channels) - 1 + downsample_input) times
    channels: tuple[int, ...] = (8, 16)  # per resolution, highest first
    num_groups: int = 4  # GroupNorm groups (each channel count must be divisible)
    downsample_input: int = 0  # stride-2 stem convolutions before the injection (ImageNet: 2)
    head_channels: tuple[int, ...] = (8, 16)  # classification head, per resolution
    final_channels: int = 64  # channels of the head's last 1x1 convolution
    head_pool: int = 1  # pooled grid before the classifier: 1 = global average pooling (paper)
    dropout: float = 0.0  # variational dropout inside f (one mask per forward)
    weight_norm: bool = True  # weight normalisation of f's convolutions
    init_std: float = 0.01  # std of f's convolution weights at initialisation
    # Where the input is injected: "all" resolutions (the stem's output, downsampled by stride-2
    # convolutions, enters every resolution's block) or only the "highest" (Bai et al. 2021's MDEQ).
    injection: Literal["all", "highest"] = "all"
    fusion_scale: float = 0.1  # initial scale (GroupNorm weight) of every cross-resolution path
    core: Literal["deq", "tied"] = "deq"  # equilibrium, or the weight-tied L-layer twin
    depth: int | None = None  # L of the tied twin (default: solve.f_max_steps)
    # Equilibrium solving (deepeq.models.SolveSpec): Broyden both ways; Bai et al. 2021 evaluates
    # at the training threshold (Table 4)
    solve: SolveSpec = field(
        default_factory=lambda: SolveSpec(
            solver="broyden", f_max_steps=12, eval_max_steps=12, b_solver="broyden", b_max_steps=12
        )
    )

    def __post_init__(self) -> None:
        self.validate()  # a config that exists is valid: checked once, where it is made

    def validate(self) -> None:
        make_core(self.core, (EQUILIBRIUM, TIED))
        if not self.channels or len(self.head_channels) != len(self.channels):
            raise ValueError(
                f"channels and head_channels need one entry per resolution; got "
                f"{list(self.channels)} and {list(self.head_channels)}."
            )
        for c in self.channels:
            if c % self.num_groups:
                raise ValueError(
                    f"every channel count must be divisible by num_groups={self.num_groups}; got {c}."
                )
        halvings = len(self.channels) - 1 + self.downsample_input
        if self.image_size % (2**halvings):
            raise ValueError(
                f"image_size {self.image_size} cannot be halved exactly {halvings} times "
                f"({len(self.channels)} resolutions, downsample_input={self.downsample_input}); "
                f"pad the images (data.image_size) or use fewer resolutions."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}.")
        if self.injection not in ("all", "highest"):
            raise ValueError(f"injection must be 'all' or 'highest'; got {self.injection!r}.")
        if not self.fusion_scale > 0.0:
            raise ValueError(
                f"fusion_scale must be > 0 (a zero scale leaves the lower resolutions dead at "
                f"initialisation); got {self.fusion_scale!r}."
            )


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ResidualBlock(nn.Module):
    def __init__(self, c: int, groups: int, dropout: float):
        super().__init__()
        self.conv1, self.conv2 = _conv3(c, c), _conv3(c, c)
        self.gn1, self.gn2, self.gn3 = (nn.GroupNorm(groups, c, affine=True) for _ in range(3))
        self.drop = VariationalDropout(dropout)

    def forward(self, z: Tensor, inj: Tensor | None) -> Tensor:
        h = F.relu(self.gn1(self.conv1(z)))
        h = self.conv2(self.drop(h))
        if inj is not None:
            h = h + inj
        return self.gn3(F.relu(z + self.gn2(h)))


class Fusion(nn.Module):
    """Every resolution receives every other: down by stride-2 convs, up by 1x1 conv + upsampling."""

    def __init__(self, channels: tuple[int, ...], groups: int, scale: float = 0.1):
        super().__init__()
        S = len(channels)
        self.paths = nn.ModuleDict()
        for i in range(S):
            for j in range(S):
                if i < j:  # downsample i -> j
                    layers: list[nn.Module] = []
                    for k in range(j - i):
                        cin = channels[i] if k == 0 else channels[j]
                        layers += [_conv3(cin, channels[j], 2), nn.GroupNorm(groups, channels[j])]
                        if k < j - i - 1:
                            layers.append(nn.ReLU())
                    self.paths[f"{i}_{j}"] = nn.Sequential(*layers)
                elif i > j:  # upsample i -> j
                    self.paths[f"{i}_{j}"] = nn.Sequential(
                        nn.Conv2d(channels[i], channels[j], 1, bias=False),
                        nn.GroupNorm(groups, channels[j]),
                        nn.Upsample(scale_factor=2 ** (i - j), mode="nearest"),
                    )
        self.post = nn.ModuleList(nn.GroupNorm(groups, c) for c in channels)
        self.S = S
        # Cross-resolution terms start small but NOT at zero: with a zero scale the lower
        # resolutions, which get no injection and start at z = 0, map 0 -> 0, sit at ReLU's kink
        # and never receive a gradient (the whole branch stays dead).
        for path in self.paths.values():
            nn.init.constant_([m for m in path if isinstance(m, nn.GroupNorm)][-1].weight, scale)

    def forward(self, hs: list[Tensor]) -> tuple[Tensor, ...]:
        out = []
        for j in range(self.S):
            u = hs[j]
            for i in range(self.S):
                if i != j:
                    u = u + self.paths[f"{i}_{j}"](hs[i])
            out.append(self.post[j](F.relu(u)))
        return tuple(out)


class MDEQLayer(nn.Module):
    """``f(z, x̃)``: residual block per resolution (injection at the highest), then fusion."""

    def __init__(self, c: MDEQConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(ch, c.num_groups, c.dropout) for ch in c.channels)
        self.fusion = Fusion(tuple(c.channels), c.num_groups, c.fusion_scale)

    def forward(self, z: tuple[Tensor, ...], inj: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``inj`` holds one injection per resolution, highest first (fewer: none below)."""
        hs = [
            blk(zi, inj[i] if i < len(inj) else None)
            for i, (blk, zi) in enumerate(zip(self.blocks, z, strict=True))
        ]
        return self.fusion(hs)


class MDEQ(EquilibriumModel):
    family = "mdeq"
    variable_length = False  # the config's image size

    def __init__(self, config: MDEQConfig):
        super().__init__()
        self.config = c = config
        self.core = make_core(c.core, (EQUILIBRIUM, TIED))
        stem: list[nn.Module] = []
        cin = c.in_channels
        for _ in range(c.downsample_input):
            stem += [
                _conv3(cin, c.channels[0], 2),
                nn.GroupNorm(c.num_groups, c.channels[0]),
                nn.ReLU(),
            ]
            cin = c.channels[0]
        stem += [_conv3(cin, c.channels[0]), nn.GroupNorm(c.num_groups, c.channels[0])]
        self.stem = nn.Sequential(*stem)
        # injection of the lower resolutions: stride-2 convolutions from the one above
        self.inject_down = nn.ModuleList(
            nn.Sequential(
                _conv3(c.channels[i], c.channels[i + 1], 2),
                nn.GroupNorm(c.num_groups, c.channels[i + 1]),
            )
            for i in range(len(c.channels) - 1 if c.injection == "all" else 0)
        )
        self.f = MDEQLayer(c)
        self.depth = c.depth if c.depth is not None else c.solve.f_max_steps
        self.head_in = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ch, hc, 1, bias=False),
                nn.GroupNorm(math.gcd(c.num_groups, hc), hc),
                nn.ReLU(),
            )
            for ch, hc in zip(c.channels, c.head_channels, strict=True)
        )
        hc = c.head_channels
        self.head_down = nn.ModuleList(
            nn.Sequential(
                _conv3(hc[i], hc[i + 1], 2),
                nn.GroupNorm(math.gcd(c.num_groups, hc[i + 1]), hc[i + 1]),
                nn.ReLU(),
            )
            for i in range(len(hc) - 1)
        )
        self.head_final = nn.Sequential(nn.Conv2d(hc[-1], c.final_channels, 1), nn.ReLU())
        self.classifier = nn.Linear(c.final_channels * c.head_pool**2, c.num_classes)
        for m in self.f.modules():
            if isinstance(m, nn.Conv2d):
                # Bai et al. 2021 A.4: weights drawn from N(0, 0.01) at the start of training; small
                # convolutions leave f close to its contractive residual path at initialisation
                nn.init.normal_(m.weight, std=c.init_std)
                if c.weight_norm:
                    weight_norm(m)

    def non_embedding_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def equilibrium_problem(
        self, batch: int, generator: torch.Generator, length: int = 0, inputs: Tensor | None = None
    ) -> tuple[nn.Module, tuple, tuple[Tensor, ...]]:
        """``(f, args, z0)`` of the equilibrium on the first ``batch`` of ``inputs`` (images) or
        on ``batch`` standard-normal images drawn from ``generator`` (``length`` is unused: the
        config fixes the image size)."""
        c = self.config
        x = (
            inputs[:batch]
            if inputs is not None
            else torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=generator)
        )
        inj = self.inject(x)
        return self.f, (inj,), self.initial_state(x.shape[0], x.device)

    def state_shapes(self, B: int) -> list[tuple[int, ...]]:
        c = self.config
        s = c.image_size // 2**c.downsample_input
        return [(B, ch, s // 2**i, s // 2**i) for i, ch in enumerate(c.channels)]

    def initial_state(self, B: int, device: torch.device) -> tuple[Tensor, ...]:
        """Zeros of the equilibrium's shapes in the parameters' dtype: float32 under autocast,
        where the injection (the stem's output) is in the autocast dtype but the solver state
        and the backward solve must not be."""
        dtype = self.classifier.weight.dtype
        return tuple(torch.zeros(s, device=device, dtype=dtype) for s in self.state_shapes(B))

    def inject(self, images: Tensor) -> tuple[Tensor, ...]:
        c = self.config
        if (
            images.dim() != 4
            or images.shape[1] != c.in_channels
            or images.shape[-1] != c.image_size
            or images.shape[-2] != c.image_size
        ):
            raise ValueError(
                f"images must be (B, {c.in_channels}, {c.image_size}, {c.image_size}); got "
                f"{tuple(images.shape)}. Set data.image_size / model.overrides.image_size to match."
            )
        inj = [self.stem(images)]
        for down in self.inject_down:
            inj.append(down(inj[-1]))
        return tuple(inj)

    def forward(
        self,
        images: Tensor,
        state: None = None,
        *,
        targets: Tensor | None = None,
        cache_keys: Tensor | None = None,
    ) -> tuple[Tensor, None, list[Solution]]:
        inj = self.inject(images)
        z0 = self.initial_state(images.shape[0], images.device)
        sols: list[Solution] = []
        if self.core.solves:
            z, sol = self.solve_equilibrium(inj, z0, cache_keys)
            sols.append(sol)
        else:
            z = z0
            for _ in range(self.depth):
                z = self.f(z, inj)
        logits = self.classify(z)
        if targets is not None:
            return F.cross_entropy(logits, targets, reduction="none"), None, sols
        return logits, None, sols

    def head_loss(self, z: tuple[Tensor, ...], targets: Tensor) -> Tensor:
        """The training loss of a state ``z`` (the equilibrium or a supervised iterate of
        fixed-point correction): per-image cross-entropy ``(B,)``."""
        return F.cross_entropy(self.classify(z), targets, reduction="none")

    def classify(self, z: tuple[Tensor, ...]) -> Tensor:
        y = self.head_in[0](z[0])
        for i in range(1, len(z)):
            y = self.head_down[i - 1](y) + self.head_in[i](z[i])
        y = F.adaptive_avg_pool2d(self.head_final(y), self.config.head_pool)
        return self.classifier(y.flatten(1))


# MNIST at CPU scale: a stride-2 stem takes 28x28 to 14x14, then 2 resolutions (14, 7), channels
# (16, 32). Against the first version (no stem, 28/14 with channels 8/16): the same convolution cost
# per f call, half the state (D = 4,704), so half the solver work (about 2x faster per training
# step on a CPU).
_TINY = dict(
    in_channels=1, image_size=28, downsample_input=1, channels=(16, 32), head_channels=(16, 32),
    final_channels=64, head_pool=2, num_groups=4,
    solve=dict(f_max_steps=6, eval_max_steps=6, b_max_steps=6),
)  # fmt: skip
# CIFAR-10 ("MDEQ-small" of Bai et al. 2021 Table 4): 4 resolutions 32/16/8/4, channels [28, 56,
# 112, 224], GroupNorm, dropout 0.25, weight norm, NFE 7 forward / 8 backward, eps 1e-3 / 1e-4.
_CIFAR = dict(
    in_channels=3, image_size=32, channels=(28, 56, 112, 224), head_channels=(14, 28, 56, 112),
    final_channels=1680, num_groups=4, dropout=0.25,
    solve=dict(f_max_steps=7, eval_max_steps=7, b_max_steps=8),
)  # fmt: skip
# ImageNet: scales [32, 64, 128, 256] after two stride-2 stem convolutions (224 -> 56), NFE 14/14,
# dropout 0.02.
_IMAGENET = dict(
    in_channels=3,
    image_size=224,
    channels=(32, 64, 128, 256),
    head_channels=(32, 64, 128, 256),
    final_channels=2048,
    num_groups=8,
    num_classes=1000,
    downsample_input=2,
    dropout=0.02,
    solve=dict(f_max_steps=14, eval_max_steps=14, b_max_steps=14),
)
# name, defaults (over the config class's), one line for listings
for _name, _defaults, _doc in (
    ("mdeq_tiny", _TINY,
     "MDEQ for MNIST on a CPU: stride-2 stem, 2 resolutions (14, 7), channels (16, 32), NFE 6 / 6."),
    ("mdeq_tied_tiny", {**_TINY, "core": "tied"},
     "Explicit twin of ``mdeq_tiny``: the same f unrolled L = f_max_steps times (weight-tied)."),
    ("mdeq_small", {**_TINY, "in_channels": 3, "image_size": 32, "downsample_input": 0,
                    "channels": (16, 32, 64), "head_channels": (16, 32, 64), "head_pool": 4},
     "MDEQ 3 resolutions (32, 16, 8), channels (16, 32, 64): small CIFAR-size model for CPUs."),
    ("mdeq_cifar", _CIFAR,
     "The CIFAR-10 MDEQ of Bai et al. 2021, Table 4 (4 resolutions, [28, 56, 112, 224]); GPU."),
    ("mdeq_imagenet", _IMAGENET,
     "The ImageNet MDEQ of Bai et al. 2021, Table 4 (4 resolutions [32, 64, 128, 256], input downsampled twice); GPU."),
):  # fmt: skip
    register_model(_name, MDEQConfig, _defaults, MDEQ, _doc)
