"""Checkpoints that load safely: tensors and plain containers only, read with
``torch.load(..., weights_only=True)``, so opening a downloaded run directory never executes code.

A checkpoint is a dict with ``"format": FORMAT``; the run's config is stored as plain data
(``dataclasses.asdict``), never as a pickled class, and the RNG state as a uint8 tensor.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "deepeq-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unsafe to load, or not one deepeq wrote."""


def save(obj: dict, path: Path) -> None:
    """Write ``obj`` (plus the format tag) atomically: a crash leaves the previous file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **obj}, tmp)
    os.replace(tmp, path)


def load(path: str | Path, map_location: Any = None, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint with ``weights_only=True``. Raises ``CheckpointError`` (one clear
    message) for a missing file, a file that would need arbitrary unpickling (an old deepeq
    checkpoint, which pickled its config, or a foreign one), or one without ``required`` keys."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is not a readable checkpoint (not a file written by torch.save)."
            ) from None
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{path} does not load with torch.load(weights_only=True), so deepeq will not open "
            f"it (unpickling arbitrary objects can execute code). It is not a checkpoint in "
            f"deepeq's current format ({FORMAT}): an older deepeq pickled the run config into "
            f"it, or another program wrote it. If you trust the file, convert it once with "
            f'`python -c "from deepeq.train.checkpoint import convert_trusted; '
            f"convert_trusted('{path}')\"`. ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}).") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(
            f"{path} is not a deepeq checkpoint: expected a dict with format {FORMAT!r}, got "
            f"{got!r}."
        )
    missing = [k for k in required if k not in ck]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not a training checkpoint.")
    return ck


def convert_trusted(path: str | Path) -> Path:
    """Rewrite a checkpoint written by an older deepeq (pickled config) in the current format,
    in place. Only for files you trust: it loads them with ``weights_only=False``."""
    import dataclasses

    path = Path(path)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} holds a {type(ck).__name__}, not a checkpoint dict.")
    ck.pop("format", None)
    cfg = ck.get("config")
    if dataclasses.is_dataclass(cfg):
        ck["config"] = dataclasses.asdict(cfg)
    save(ck, path)
    load(path)  # fails loudly if anything unsafe remains
    return path


def parameters_finite(model: torch.nn.Module) -> list[str]:
    """Names of the model's parameters and buffers that hold inf/nan (empty: all finite)."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    bad += [
        n
        for n, b in model.named_buffers()
        if b.is_floating_point() and not bool(torch.isfinite(b).all())
    ]
    return bad


def describe_latest(path: Path) -> str:
    """'resume from PATH (step N)' for an existing checkpoint, or a sentence saying there is none."""
    if not path.exists():
        return f"no checkpoint was written yet ({path} does not exist): start the run again"
    try:
        step = load(path, map_location="cpu").get("step")
    except CheckpointError:
        return f"{path} exists but is not readable: start the run again"
    return f"resume from {path} (step {step}) with --resume"
