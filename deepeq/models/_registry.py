"""Model registry as data: ``register_model(name, config, defaults, builder)`` records a model's
config class, its defaults and the builder that makes the model from a config;
``model_config(name, **overrides)`` reads the config without building anything,
``create_model(name, **overrides)`` builds the model from it, ``list_models()`` lists them."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Args:
        name: ``<family>_<size>``.
        config: the config dataclass (frozen; validated when made); None for a model without
            one, whose builder then takes the overrides as keyword arguments.
        defaults: this model's values of config fields (a dict for a nested config value such
            as ``solve`` is merged into its default).
        builder: makes the model from a config (usually the model class).
        doc: one line for listings.
    """

    name: str
    config: type | None
    defaults: Mapping[str, Any]
    builder: Callable[..., nn.Module]
    doc: str = ""


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    config: type | None,
    defaults: Mapping[str, Any],
    builder: Callable[..., nn.Module],
    doc: str = "",
) -> ModelEntry:
    """Register a model: ``create_model(name, **overrides)`` then builds
    ``builder(model_config(name, **overrides))``.

    Raises:
        ValueError: if the name is already registered.

    """
    if name in _MODELS:
        raise ValueError(
            f"Model {name!r} is already registered; registered models: {sorted(_MODELS)}."
        )
    entry = ModelEntry(name, config, dict(defaults), builder, doc)
    _MODELS[name] = entry
    return entry


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def _entry(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; registered models: {list_models()}.") from None


def model_config(name: str, **overrides: Any) -> Any:
    """The config ``create_model(name, **overrides)`` builds its model from: the config class's
    defaults, the model's registered defaults, then ``overrides``, each type-checked, and the
    whole validated when it is made. Nothing is built (cheap: used to validate
    ``model.overrides`` when a training config is loaded). None for a model registered without
    a config class.

    Raises:
        ValueError: unknown name; TypeError / ValueError: a bad override (unknown field, wrong
            type, a choice outside its options, a failed check).

    Examples:
        >>> from deepeq.models import model_config
        >>> model_config("deq_transformer_tiny", solve=dict(f_max_steps=5)).solve.f_max_steps
        5
    """
    entry = _entry(name)
    if entry.config is None:
        return None
    config = _merge(entry.config(), entry.defaults, entry.config.__name__)
    return _merge(config, overrides, entry.config.__name__)


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
    entry = _entry(name)
    if entry.config is None:
        return entry.builder(**overrides)
    return entry.builder(model_config(name, **overrides))


def _merge(base: Any, changes: dict, where: str) -> Any:
    """``base`` (a dataclass value) with ``changes`` type-checked and replaced; nested dataclass
    fields given as dicts are merged recursively."""
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
