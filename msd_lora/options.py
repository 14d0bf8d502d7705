"""Typed settings: frozen dataclasses whose fields carry their help, choices, bounds and whether they are paths.

    @dataclass(frozen=True)
    class Sampling:
        steps: int = setting(25, "sampler steps", low=1, high=1000, flag="sampling_steps")

    values = coerce_all(Sampling, {"steps": "30"}, origins={"steps": "command line"})   # {"steps": 30}

Values from yaml files and the command line are converted to the field's annotated type and checked; every error
is a ConfigError naming where the value came from, the key and the value. Floats must be finite. The command line
is generated from the same fields (`add_arguments`), so a setting is declared once for both. Lists are tuples (the
dataclasses are frozen); on the command line a list flag is repeated, one item each (`--validation_prompts "a, b"
--validation_prompts c` is two prompts), or given as a yaml list (`--betas "[0.9, 0.98]"`); fields marked `split`
(numbers, module names: items without commas) also take `a,b`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from msd_lora.errors import ConfigError

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
NONE = {"none", "null", "~", ""}


@dataclass(frozen=True)
class Setting:
    help: str
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds, unless low_open / high_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    path: bool = False  # a file or folder: resolved against the yaml's folder / the repo / the working directory
    flag: str | None = None  # the command-line name, when it is not the field's
    split: bool = False  # a list whose items never hold commas: "a,b" on the command line is two items


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its Setting; list defaults are given as tuples."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **kw)})


@dataclass(frozen=True)
class FieldInfo:
    name: str
    kind: Any  # the resolved annotation: bool, int, float, str, float | None, tuple[str, ...], bool | str
    setting: Setting
    default: Any

    @property
    def flag(self) -> str:
        return self.setting.flag or self.name

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.kind) is tuple

    @property
    def item(self) -> type:
        return typing.get_args(self.kind)[0] if self.is_list else self.kind

    def type_name(self) -> str:
        if self.is_list:
            return f"list of {self.item.__name__}"
        args = [a for a in typing.get_args(self.kind) if a is not type(None)]
        if args:
            return " or ".join(a.__name__ for a in args) + (" or empty" if type(None) in typing.get_args(self.kind)
                                                            else "")
        return self.kind.__name__


def fields_of(cls: type) -> dict[str, FieldInfo]:
    hints = typing.get_type_hints(cls)
    return {f.name: FieldInfo(f.name, hints[f.name], f.metadata["setting"], f.default)
            for f in dataclasses.fields(cls) if "setting" in f.metadata}


def suggest(key: str, valid: Sequence[str]) -> str:
    """' Did you mean ...?' for the closest valid key, or an empty string."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def str_to_bool(text: Any) -> bool:
    """mindone-style booleans: True/False, 1/0, yes/no, on/off (any case)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value not in TRUE | FALSE:
        raise ValueError(f"expected True or False, got {text!r}")
    return value in TRUE


def number(value: Any, kind: type = float) -> int | float:
    """`value` (a number or its text) as a finite `kind`; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    number = float(value) if isinstance(value, str) else value
    if not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ValueError("not a finite number")
    if kind is int:
        if float(number) != int(number):
            raise ValueError("not a whole number")
        return int(number)
    return float(number)


def _scalar(value: Any, kind: Any) -> Any:
    args = typing.get_args(kind)
    if args:  # a union: X | None, bool | str
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NONE)):
            return None
        if bool in args and str in args:
            text = str(value).strip()
            return str_to_bool(text) if isinstance(value, bool) or text.lower() in TRUE | FALSE else text
        kind = next(a for a in args if a is not type(None))
    if value is None:
        raise ValueError("empty")
    if kind is bool:
        return str_to_bool(value)
    if kind in (int, float):
        return number(value, kind)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError("not text")
        return str(value)
    raise TypeError(f"unsupported setting type {kind}")


def _items(info: FieldInfo, value: Any) -> list:
    """A list value from yaml (a list) or the command line (the strings of its repeated flags)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("not a list")
    items: list = []
    for item in value:
        if isinstance(item, str) and item.strip().startswith("["):
            parsed = yaml.safe_load(item)
            if not isinstance(parsed, list):
                raise ValueError(f"{item!r} is not a yaml list")
            items += parsed
        elif isinstance(item, str) and info.setting.split:
            items += [part.strip() for part in item.split(",") if part.strip()]
        else:
            items.append(item.strip() if isinstance(item, str) else item)
    return items


def coerce(info: FieldInfo, value: Any, origin: str) -> Any:
    """`value` as the field's type, checked against its choices and bounds; a ConfigError names key and value."""
    try:
        typed = tuple(_scalar(v, info.item) for v in _items(info, value)) if info.is_list else _scalar(value, info.kind)
    except (TypeError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{origin}: '{info.name}' must be {info.type_name()}, got {value!r} ({err})") from err
    for item in typed if info.is_list else (typed,):
        check_value(info, item, origin, whole=typed)
    return typed


def check_value(info: FieldInfo, value: Any, origin: str, whole: Any = None) -> None:
    s = info.setting
    shown = whole if whole is not None else value
    if value is None or isinstance(value, bool):
        return
    if s.choices is not None and value not in s.choices:
        raise ConfigError(f"{origin}: '{info.name}' is {shown!r}; choose one of {list(s.choices)}."
                          f"{suggest(str(value), [str(c) for c in s.choices])}")
    if s.low is not None and (value <= s.low if s.low_open else value < s.low):
        raise ConfigError(f"{origin}: '{info.name}' is {shown!r}; it must be {range_text(s)}")
    if s.high is not None and (value >= s.high if s.high_open else value > s.high):
        raise ConfigError(f"{origin}: '{info.name}' is {shown!r}; it must be {range_text(s)}")


def _num(x: float) -> str:
    return f"{x:g}"


def range_text(s: Setting) -> str:
    if s.low is not None and s.high is not None:
        return f"in {'(' if s.low_open else '['}{_num(s.low)}, {_num(s.high)}{')' if s.high_open else ']'}"
    if s.low is not None:
        return f"{'>' if s.low_open else '>='} {_num(s.low)}"
    return f"{'<' if s.high_open else '<='} {_num(s.high)}"


def coerce_all(cls: type, values: Mapping[str, Any], origins: Mapping[str, str]) -> dict[str, Any]:
    """Every field of `cls` typed and checked: `values` where given, else the field's default."""
    typed = {}
    for name, info in fields_of(cls).items():
        if name in values:
            typed[name] = coerce(info, values[name], origins.get(name, "defaults"))
        else:
            typed[name] = info.default
    return typed


def check_keys(cls: type, keys, origin: str, what: str = "key") -> None:
    """Unknown keys are errors that suggest the closest valid one."""
    valid = list(fields_of(cls))
    for key in keys:
        if key not in valid:
            raise ConfigError(f"{origin}: unknown {what} '{key}'.{suggest(key, valid)}")


def help_text(info: FieldInfo) -> str:
    s = info.setting
    parts = [s.help]
    if s.choices:
        parts.append(f"{{{', '.join(map(str, s.choices))}}}")
    elif s.low is not None or s.high is not None:
        parts.append(f"({range_text(s)})")
    if info.is_list:
        parts.append("(repeat the flag for several" + (", or a,b)" if s.split else ")"))
    shown = list(info.default) if info.is_list else info.default
    parts.append(f"(default: {shown!r})")
    return " ".join(parts)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  names: Sequence[str] | None = None) -> None:
    """One flag per field (`--<flag>`), its value kept as given (a string, a list of strings for repeated list
    flags) for `coerce_all`; a flag left out is absent from the parsed namespace, so it never overrides."""
    infos = fields_of(cls)
    for name in names or list(infos):
        info = infos[name]
        parser.add_argument(f"--{info.flag}", dest=name, default=argparse.SUPPRESS,
                            action="append" if info.is_list else "store", help=help_text(info).replace("%", "%%"),
                            metavar=info.item.__name__.upper() if not typing.get_args(info.item) else "VALUE")


def to_plain(value: Any) -> Any:
    """Tuples as lists (yaml and json write lists)."""
    return [to_plain(v) for v in value] if isinstance(value, tuple) else value
