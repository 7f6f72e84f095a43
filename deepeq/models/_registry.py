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
        >>> model_config("deq_transformer_tiny", solve=dict(f_max_steps=5)).solve.f_max_steps
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
    raises ValueError. A field holding a config value (``solve``, a ``SolveSpec``) takes a dict,
    merged field by field into the default's value (checked the same way), or a value of its
    type, which replaces it."""
    config = _merge(cls(), defaults, cls.__name__)
    config = _merge(config, overrides, cls.__name__)
    if _CONFIG_ONLY.get():
        if hasattr(config, "validate"):
            config.validate()  # the checks the model constructor makes
        raise _ConfigBuilt(config)
    return config


def _merge(base: Any, changes: dict, where: str) -> Any:
    """``base`` (a dataclass value) with ``changes`` type-checked and replaced; nested dataclass
    fields given as dicts are merged recursively."""
    import dataclasses
    import typing

    from .._coerce import coerce
    from ._solve import LEGACY_KEYS

    cls = type(base)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(changes) - set(valid))
    if unknown:
        moved = [k for k in unknown if k in LEGACY_KEYS and "solve" in valid]
        if moved:
            new = ", ".join(f"solve.{LEGACY_KEYS[k]}" for k in moved)
            raise TypeError(
                f"{', '.join(moved)}: the solver settings of {cls.__name__} live in its solve "
                f"spec (deepeq.models.SolveSpec); write {new} — --model.overrides.solve.KEY=... "
                f"on the command line, [model.overrides.solve] in a config file, solve=dict(...) "
                f"in Python."
            )
        import difflib

        nested = {  # fields of nested config values, as "solve.f_max_steps"
            f"{f.name}.{g.name}": g.name
            for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(getattr(base, f.name))
            for g in dataclasses.fields(getattr(base, f.name))
        }
        close = difflib.get_close_matches(unknown[0], [*valid, *nested.values()], n=1)
        hint = ""
        if close:
            full = next((k for k, v in nested.items() if v == close[0]), close[0])
            hint = f" Did you mean {full!r}?"
        raise TypeError(
            f"Unknown config field(s) {unknown} for {where}; valid: {sorted(valid)}.{hint}"
        )
    hints = typing.get_type_hints(cls)
    checked = {}
    for k, v in changes.items():
        tp, key = hints[k], f"{where}.{k}"
        if dataclasses.is_dataclass(tp):
            if isinstance(v, tp):
                checked[k] = v
            elif isinstance(v, dict):
                checked[k] = _merge(getattr(base, k), v, key)
            else:
                raise TypeError(
                    f"{key}: expected a table of {tp.__name__} fields or a {tp.__name__}; got "
                    f"{v!r} ({type(v).__name__})."
                )
        else:
            checked[k] = coerce(v, tp, key)
    return dataclasses.replace(base, **checked)
