"""``deepeq train --help-config [SECTION]``: every config key with its type, default and meaning,
generated from the config dataclasses, so that it cannot go stale.

The meaning of a field is read from its class's source, where a reader of the class sees it: the
comment on the field's line(s), else the block of comment lines right above it, else its entry
in the class docstring's ``Args:`` / ``Attributes:`` section (``deepeq.models.SolveSpec``).
``tests/test_friction.py`` checks that every field of every section, and of every registered
model's config, has one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from .config import TrainConfig, check_model

#: the sections of ``--help-config SECTION`` ("top": the keys outside any table)
SECTIONS = ("top", "model", "data", "optim", "jac")
#: model config fields that training fills in from the data (``Task.model_kwargs``)
FROM_DATA = ("vocab_size", "in_channels", "num_classes", "image_size")
_TOOL_COMMENT = re.compile(r"^(fmt: (skip|off|on)|noqa\b.*|type: ignore.*|pragma: .*)$")


@functools.cache
def describe_fields(cls: type) -> dict[str, str]:
    """Field name -> its description, for a dataclass and the dataclasses it derives from
    (a subclass's own description wins); fields without one are absent."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__annotations__" in klass.__dict__:
            out.update(_own_descriptions(klass))
    return out


def _own_descriptions(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen application): docstrings only
        return _docstring_args(cls.__doc__ or "")
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not _TOOL_COMMENT.match(text):
                comments[tok.start[0]] = text
    body = ast.parse(source).body[0]
    out = _docstring_args(ast.get_docstring(body) or "")
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        if not own:  # the comment lines right above the field
            i = node.lineno - 1
            while i >= 1 and lines[i - 1].strip().startswith("#"):
                if i in comments:
                    own.insert(0, comments[i])
                i -= 1
        if own:
            out[node.target.id] = " ".join(own)
    return out


def _docstring_args(doc: str) -> dict[str, str]:
    """``name[, name]: text`` entries of a Google-style ``Args:`` / ``Attributes:`` section."""
    out: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Attributes:"):
            inside, names = True, []
            continue
        if inside and line and not line.startswith(" "):
            inside = False  # the next section
        if not inside or not line.strip():
            continue
        m = re.match(r"^ {4}(\w[\w, ]*):\s*(.*)$", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif names:
            for n in names:
                out[n] += " " + line.strip()
    return out


def type_name(tp: Any) -> str:
    """A field's annotation as a reader writes it: ``int``, ``float | None``, ``'a' | 'b'``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def toml_value(v: Any) -> str:
    """A value as a TOML file (or a ``--key=value`` override) spells it."""
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _keys(obj: Any, prefix: str, defaults: Any = None, skip_tables: bool = False) -> list[str]:
    """Lines for every field of the dataclass instance ``obj`` (values as configured), nested
    dataclasses recursively; ``defaults``: the instance holding the defaults (else the
    class's)."""
    cls = type(obj)
    hints, docs = typing.get_type_hints(cls), describe_fields(cls)
    out = []
    for f in dataclasses.fields(cls):
        value, tp = getattr(obj, f.name), hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            if not skip_tables:
                out += _keys(value, f"{prefix}{f.name}.", default)
            continue
        text = f"  {prefix}{f.name}: {type_name(tp)} = {toml_value(value)}"
        if value != default and default is not dataclasses.MISSING:
            text += f"  (default {toml_value(default)})"
        out.append(text)
        meaning = docs.get(f.name, "")
        if prefix.startswith("model.overrides.") and f.name in FROM_DATA:
            meaning = (meaning + " (set by training from the data)").strip()
        out += textwrap.wrap(meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return out


def _model_section(cfg: TrainConfig) -> list[str]:
    from ..models import model_config

    out = _keys(cfg.model, "model.")
    default = model_config(cfg.model.name)
    current = check_model(cfg.model)
    head = (
        f"model.overrides.* of {cfg.model.name} ({type(default).__name__}; values: the "
        f"registered model's, or this config's; another model: --model.name=NAME):"
    )
    out += ["", *textwrap.wrap(head, 98, initial_indent="  ", subsequent_indent="  ")]
    return out + _keys(current, "model.overrides.", default)


def help_config(cfg: TrainConfig | None = None, section: str = "all") -> str:
    """The reference of every config key (``section``: one of ``SECTIONS`` or "all"), with the
    values of ``cfg`` (default: the defaults) and the keys of its model."""
    from .config import ConfigError

    cfg = cfg if cfg is not None else TrainConfig()
    if section not in ("all", *SECTIONS):
        raise ConfigError(
            f"--help-config: unknown section {section!r}; expected one of {list(SECTIONS)} "
            f"(or none for all)."
        )
    parts = []
    for name in SECTIONS if section == "all" else (section,):
        if name == "top":
            head = "top-level keys (TOML: before any [table]; command line: --KEY=VALUE)"
            lines = _keys(cfg, "", skip_tables=True)
        else:
            head = f"[{name}]  (command line: --{name}.KEY=VALUE)"
            lines = (
                _model_section(cfg) if name == "model" else _keys(getattr(cfg, name), name + ".")
            )
        parts.append("\n".join([head, *lines]))
    return "\n\n".join(parts)
