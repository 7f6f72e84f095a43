"""Model registry: ``@register_model`` functions, ``create_model(name, **overrides)``, ``list_models()``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point under its function name (``<family>_<size>``).

    Raises:
        ValueError: if the name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(
            f"Model {name!r} is already registered; registered models: {sorted(_MODELS)}."
        )
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace fields of its config dataclass.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
        TypeError: unknown override (the message lists the valid fields).

    Example:
        >>> from deepeq.models import create_model
        >>> m = create_model("deq_transformer_tiny", vocab_size=20)
        >>> m.config.vocab_size
        20
    """
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; registered models: {list_models()}.") from None
    return fn(**overrides)


def build_config(cls: type, defaults: dict, overrides: dict) -> Any:
    """``cls(**defaults)`` with ``overrides`` replaced. Unknown fields, and values of the wrong
    type for their field (``"false"`` for a bool) raise TypeError; a word outside a ``Literal``
    raises ValueError."""
    import dataclasses
    import typing

    from .._coerce import coerce

    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(
            f"Unknown config field(s) {unknown} for {cls.__name__}; valid: {sorted(valid)}."
        )
    hints = typing.get_type_hints(cls)
    checked = {k: coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in overrides.items()}
    return dataclasses.replace(cls(**defaults), **checked)
