"""Type checks of configuration values against dataclass field annotations.

Shared by the training config (``deepeq.train.config``) and the model configs
(``deepeq.models.build_config``), so that a value of the wrong type — ``"false"`` for a bool, a
float for an int, a word outside a ``Literal`` — is refused with one message instead of being
used silently (the string ``"false"`` is true in Python)."""

from __future__ import annotations

import types
import typing
from typing import Any


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and minimally converted: int -> float, list -> tuple) for the
    annotation ``tp``; ``key`` names the field in the error.

    Raises:
        TypeError: the value does not fit the annotation (the message says what was expected).
        ValueError: a value outside a ``Literal``'s choices.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except (TypeError, ValueError):
                pass
        literal = any(typing.get_origin(a) is typing.Literal for a in args)
        err = ValueError if literal and isinstance(value, str) else TypeError  # a word: a choice
        raise err(f"{key}: expected {_name(tp)}; got {value!r} ({type(value).__name__}).")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ValueError(
                f"{key}: expected one of {', '.join(repr(c) for c in choices)}; got {value!r}."
            )
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{key}: expected a float; got {value!r} ({type(value).__name__}).")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key}: expected an int; got {value!r} ({type(value).__name__}).")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(
                f"{key}: expected true or false; got {value!r} ({type(value).__name__})."
            )
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected a string; got {value!r} ({type(value).__name__}).")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{key}: expected a table; got {value!r}.")
        return dict(value)
    if tp is tuple or origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"{key}: expected a list; got {value!r} ({type(value).__name__}).")
        args = typing.get_args(tp)  # the configs' tuples are tuple[X, ...]
        if args:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    return value


def _name(tp: Any) -> str:
    """A readable name of an annotation: ``int``, ``one of 'a', 'b'``, ``float or None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
