"""The copy-memory task (Bai et al. 2018, 2019 appendix F)."""

from __future__ import annotations

import torch
from torch import Tensor

VOCAB = 10  # symbols 0..9: 0 blank, 1..8 data, 9 delimiter
DELIMITER = 9


def copy_memory(n: int, seq_len: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` samples of copy memory with delay ``T = seq_len``.

    Each input ``x`` has ``T + 20`` positions: ``x[0:10]`` are random symbols in 1..8 (with
    repetition), ``x[T + 9] = 9`` is the delimiter (the paper's 1-based ``x_{T+10}``), all other
    positions are 0. The target is 0 for the first ``T + 10`` positions and ``x[0:10]`` for the last
    10: after the delimiter the model must recall the ten symbols it saw ``T`` steps earlier.

    Args:
        n: number of samples.
        seq_len: T.
        seed: generator seed (the same seed gives the same samples).

    Returns:
        ``(x, y)``, int64 tensors of shape ``(n, T + 20)``.

    Examples:
        >>> x, y = copy_memory(2, 5, seed=0)
        >>> x.shape, bool((x[:, 14] == 9).all()), bool((y[:, 15:] == x[:, :10]).all())
        (torch.Size([2, 25]), True, True)
    """
    if n < 1 or seq_len < 1:
        raise ValueError(
            f"copy_memory needs n >= 1 and seq_len >= 1; got n={n}, seq_len={seq_len}."
        )
    g = torch.Generator().manual_seed(seed)
    L = seq_len + 20
    data = torch.randint(1, 9, (n, 10), generator=g)
    x = torch.zeros(n, L, dtype=torch.long)
    x[:, :10] = data
    x[:, seq_len + 9] = DELIMITER
    y = torch.zeros(n, L, dtype=torch.long)
    y[:, seq_len + 10 :] = data
    return x, y
