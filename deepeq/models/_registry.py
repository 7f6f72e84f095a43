"""Model registry: ``@register_model`` functions, ``create_model(name, **overrides)``, ``list_models()``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_CONFIG_ONLY: ContextVar[bool] = ContextVar("deepeq_config_only", default=False)


class _ConfigBuilt(Exception):
    def __init__(self, config: Any):
        super().__init__()
        self.config = config


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

    Examples:
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


def model_config(name: str, **overrides: Any) -> Any:
    """The config dataclass ``create_model(name, **overrides)`` would build, without building the
    model (cheap: used to validate ``model.overrides`` when a training config is loaded). For a
    model registered without ``build_config`` the model is built and None returned.

    Raises:
        ValueError: unknown name; TypeError / ValueError: as ``create_model`` for a bad
            override (unknown field, wrong type, a choice outside its options, a failed check).

    Examples:
        >>> from deepeq.models import model_config
        >>> model_config("deq_transformer_tiny", f_max_steps=5).f_max_steps
        5
    """
    token = _CONFIG_ONLY.set(True)
    try:
        create_model(name, **overrides)
    except _ConfigBuilt as built:
        return built.config
    finally:
        _CONFIG_ONLY.reset(token)
    return None  # a model registered without build_config: its overrides are checked when built


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
    config = dataclasses.replace(cls(**defaults), **checked)
    if _CONFIG_ONLY.get():
        if hasattr(config, "validate"):
            config.validate()  # the checks the model constructor makes
        raise _ConfigBuilt(config)
    return config
