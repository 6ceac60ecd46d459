"""Typed settings: frozen dataclasses that own their defaults and validate their values.

Every component of a registration (preprocessing, each encoder, the ensemble, the method) is a
:class:`Spec`: a frozen dataclass whose fields are declared with :func:`setting`, which records
the allowed values (a range, a set of choices) and a one-line help text. Values are coerced
(``"3"`` -> 3, ``"true"`` -> True, ``[2, 1]`` -> ``(2, 1)``) and checked in ``__post_init__``;
a bad value raises :class:`~dinoreg.errors.DinoregError` naming the key and the allowed range,
so every entry point (CLI options, ``--set key=value``, ``register(**overrides)``, dataset runs)
gets the same one-line error before any work.

The whole registration is a :class:`dinoreg.registration_spec.RegistrationSpec`; this module is
only the machinery, free of any dinoreg concept.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar, Sequence

from dinoreg.errors import DinoregError

_NONE_WORDS = ("none", "null", "")


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, choices: Sequence[Any] | None = None,
            length: int | None = None) -> Any:
    """A spec field with its default, help text and allowed values.

    Args:
        default: the value when nothing overrides it (the only place this default lives).
        help: one line for ``dinoreg presets --keys`` and error messages.
        low, high: inclusive numeric bounds (``low_open``/``high_open`` make them exclusive);
            for tuples they bound every element.
        choices: the allowed values (strings or numbers).
        length: exact number of elements of a tuple value.
    """
    meta = dict(help=help, low=low, high=high, low_open=low_open, high_open=high_open,
                choices=None if choices is None else tuple(choices), length=length)
    if isinstance(default, (list, dict, set)):
        raise TypeError("spec defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _range_text(meta: dict[str, Any]) -> str:
    if meta["choices"] is not None:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo, hi = meta["low"], meta["high"]
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {_number(lo)}")
    if hi is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {_number(hi)}")
    return " and ".join(parts) if parts else "any value"


def _bad(key: str, expected: str, value: Any) -> DinoregError:
    return DinoregError(f"setting '{key}' must be {expected}, got {value!r}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise _bad(key, "true or false", value)


def _as_number(key: str, value: Any, kind: type, meta: dict[str, Any]) -> float | int:
    expected = ("an integer" if kind is int else "a finite number") + (
        f" {_range_text(meta)}" if meta["low"] is not None or meta["high"] is not None else "")
    if isinstance(value, bool):
        raise _bad(key, expected, value)
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value.strip())
        except ValueError:
            raise _bad(key, expected, value) from None
    if not isinstance(value, (int, float)):
        raise _bad(key, expected, value)
    if kind is int:
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            raise _bad(key, expected, value)
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise _bad(key, expected, value)
    lo, hi = meta["low"], meta["high"]
    if lo is not None and (value < lo or (meta["low_open"] and value == lo)):
        raise _bad(key, expected, value)
    if hi is not None and (value > hi or (meta["high_open"] and value == hi)):
        raise _bad(key, expected, value)
    return value


def _split_type(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def coerce(key: str, value: Any, annotation: Any, meta: dict[str, Any]) -> Any:
    """``value`` converted to the field's type and checked against its allowed values."""
    inner, optional = _split_type(annotation)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if value is None:
        raise _bad(key, _range_text(meta) if meta["choices"] else f"a value of type {getattr(inner, '__name__', inner)}",
                   value)
    origin = typing.get_origin(inner)
    if origin is tuple:
        element = typing.get_args(inner)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if meta["length"] is not None and len(value) != meta["length"]:
            raise _bad(key, f"{meta['length']} values", value)
        if not value:
            raise _bad(key, "at least one value", value)
        item_meta = dict(meta, choices=None, length=None)
        return tuple(_as_number(key, v, element, item_meta) for v in value)
    if inner is bool:
        return _as_bool(key, value)
    if inner in (int, float):
        if meta["choices"] is not None and value in meta["choices"]:
            return value
        return _as_number(key, value, inner, meta)
    if meta["choices"] is not None:
        options = meta["choices"]
        text = str(value).strip() if not isinstance(value, bool) else value
        for option in options:
            if text == option or (isinstance(option, int) and not isinstance(text, bool) and str(option) == str(text)):
                return option
        raise _bad(key, _range_text(meta), value)
    if inner is str or inner == "str":
        if not isinstance(value, str):
            raise _bad(key, "a string", value)
        return value
    return value


class Spec:
    """Base of every settings dataclass: coercion and validation after construction.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` with fields made by :func:`setting`.
    ``name`` (a class variable) identifies encoders and methods in flat settings and records.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata:
                continue
            value = coerce(f.name, getattr(self, f.name), hints[f.name], dict(f.metadata))
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks of a subclass (raise :class:`DinoregError`)."""

    @classmethod
    def keys(cls) -> list[str]:
        """The flat setting names this spec holds."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata]  # type: ignore[arg-type]

    @classmethod
    def help(cls) -> dict[str, str]:
        """``key -> "help text (allowed values, default ...)"``."""
        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.metadata:
                out[f.name] = f"{f.metadata['help']} ({_range_text(dict(f.metadata))}; default {f.default!r})"
        return out

    def replace(self, **values: Any) -> Any:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **values)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists) with ``name`` first when the spec has one."""
        out: dict[str, Any] = {"name": self.name} if self.name else {}
        for key in self.keys():
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out
