"""Recipe machinery: YAML files -> dataclass trees, with `key.sub=value` overrides and validation.

Generic over any dataclass tree (`load_recipe(SFTRecipe, ...)`); the sections are in schema.py.

Rules:
- every YAML key must be a field of its section; an unknown key is an error naming the file, the
  key and the closest valid key;
- values are checked against the field's annotation (int, float, bool, str, Literal[...], X | None,
  a union of these such as `int | Literal["auto"]` (the first member that takes the value wins),
  list[X], dict[str, Any], nested dataclasses, `Section | None` for optional sections);
- an override `a.b=value` is parsed by the type of field `a.b` (so `output.run_dir=123` stays a
  string) and `lora=null` switches an optional section off, `lora.r=8` switches it on;
- floats must be finite; a numeric field declared with `ranged(default, Range(...))` must lie in
  its range (the error names the key and the range; a union's non-numeric choice is not a number and
  is not range-checked), checked as each section is built;
- after construction each dataclass's `validate()` method (if any) checks cross-field rules and
  raises RecipeError.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
_NULL = ("null", "none", "~")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class RecipeError(ValueError):
    """A recipe (file or override) that does not match the schema; the message names key and fix."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric recipe key; each bound is inclusive unless marked open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {low}"
        return f"{'<' if self.open_high else '<='} {high}"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)
ANY = Range()  # every finite value (floats are checked finite anyway)
SEED = Range(0, 2**32 - 1)  # numpy's seed range (accelerate's set_seed seeds numpy too)


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field whose value (each item, for a list) must lie in `valid` (None always passes)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": valid})
    return field(default=default, metadata={"range": valid})


def check_ranges(obj: Any, where: str, prefix: str = "") -> None:
    """RecipeError naming the first field of dataclass `obj` outside its declared Range."""
    for f in dataclasses.fields(obj):
        valid = f.metadata.get("range")
        value = getattr(obj, f.name)
        if valid is None or value is None:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if not isinstance(item, int | float) or isinstance(item, bool):
                continue  # a union's non-numeric choice ('auto')
            if item not in valid:
                key = _join(prefix, f.name) + ("" if i is None else f"[{i}]")
                raise RecipeError(f"{where}: '{key}' must be {valid}, got {item!r}")


# ----------------------------------------------------------------------------------------- types


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """X | None -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            return functools.reduce(operator.or_, args), True
    return tp, False


def _members(tp: Any) -> tuple:
    """The members of a union annotation without None (int | Literal["auto"]), else ()."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()


def _shown(choice: Any) -> str:
    """A Literal choice as YAML writes it (true, not True)."""
    return str(choice).lower() if isinstance(choice, bool) else repr(choice)


def type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    if optional:
        return f"{type_name(inner)} or null"
    if _members(inner):
        return " or ".join(type_name(member) for member in _members(inner))
    origin = typing.get_origin(inner)
    if origin is Literal:
        return "one of " + ", ".join(_shown(a) for a in typing.get_args(inner))
    if origin in (list, Sequence):
        return f"list of {type_name(typing.get_args(inner)[0])}"
    if origin in (dict, Mapping):
        return "mapping"
    if _is_section(inner):
        return f"section ({', '.join(f.name for f in dataclasses.fields(inner))})"
    return getattr(inner, "__name__", str(inner))


# ------------------------------------------------------------------------------------ conversion


def _fail(where: str, key: str, tp: Any, value: Any) -> RecipeError:
    return RecipeError(f"{where}: key '{key}' expects {type_name(tp)}, got {value!r} ({type(value).__name__})")


def _scalar(value: Any, tp: Any, where: str, key: str, shown: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):
            raise RecipeError(f"{where}: key '{key}' must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise _fail(where, key, shown, value)


def convert(value: Any, tp: Any, where: str, key: str, root: type | None = None) -> Any:
    """A YAML value checked (and lightly coerced) against annotation `tp`."""
    inner, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise _fail(where, key, tp, value)
    if _members(inner):
        for member in _members(inner):
            try:
                return convert(value, member, where, key, root)
            except RecipeError:
                continue
        raise _fail(where, key, tp, value)
    origin = typing.get_origin(inner)
    if _is_section(inner):
        shorthand = getattr(inner, "SHORTHAND", None)  # a section written as one string: {SHORTHAND: value}
        if shorthand is not None and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, Mapping):
            raise _fail(where, key, tp, value)
        return build(inner, value, where, key, root)
    if origin is Literal:
        choices = typing.get_args(inner)
        if bool in {type(c) for c in choices} and isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            value = value.lower() in _TRUE
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: key '{key}' expects {type_name(inner)}, got {value!r}{hint}")
    if origin in (list, Sequence):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise _fail(where, key, tp, value)
        (item,) = typing.get_args(inner)
        return [convert(v, item, where, f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail(where, key, tp, value)
        return {str(k): v for k, v in value.items()}
    return _scalar(value, inner, where, key, tp)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(root: type, cls: type, name: str, where: str, prefix: str) -> RecipeError:
    """The error for key `name` in section `prefix`, with the closest valid key anywhere in `root`."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        suggestion = _join(prefix, close[0])
    else:  # maybe it belongs to another section (e.g. 'lr' under 'train')
        paths = all_keys(root)
        near = [p for p in paths if p.rsplit(".", 1)[-1] == name]
        near = near or difflib.get_close_matches(_join(prefix, name), paths, n=1, cutoff=0.6)
        suggestion = near[0] if near else None
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    section = f"section '{prefix}'" if prefix else "the top level"
    return RecipeError(
        f"{where}: unknown key '{_join(prefix, name)}'{hint} (valid keys in {section}: {', '.join(names)})"
    )


def build(
    cls: type[T], data: Mapping[str, Any], where: str = "<recipe>", prefix: str = "", root: type | None = None
) -> T:
    """Construct dataclass `cls` from a mapping, recursively, checking every key and value.

    Sections left out are built from their defaults, so their validate() runs too."""
    root = root or cls
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in hints or name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(root, cls, str(name), where, prefix)
        kwargs[name] = convert(value, hints[name], where, _join(prefix, name), root)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and _is_section(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], {}, where, _join(prefix, f.name), root)
    obj = cls(**kwargs)
    check_ranges(obj, where, prefix)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree (sections included)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out.append(key)
        inner, _ = _split_optional(_hints(cls)[f.name])
        if _is_section(inner):
            out += all_keys(inner, key)
    return out


# ------------------------------------------------------------------------------------- overrides


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override_value(text: str, tp: Any) -> Any:
    inner, optional = _split_optional(tp)
    if optional and text.strip().lower() in _NULL:
        return None
    literal_strs = typing.get_origin(inner) is Literal and all(isinstance(a, str) for a in typing.get_args(inner))
    if inner is str or literal_strs:
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def apply_override(cls: type, data: dict[str, Any], item: str, where: str = "override") -> None:
    """Apply `a.b.c=value` to the raw recipe mapping `data`, parsing value by the field's type."""
    if "=" not in item:
        raise RecipeError(f"{where} {item!r}: expected key=value (e.g. train.steps=100)")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    section, node, prefix = cls, data, ""
    for i, name in enumerate(parts):
        if not _is_section(section) or name not in {f.name for f in dataclasses.fields(section)}:
            if not _is_section(section):
                raise RecipeError(f"{where} {item!r}: '{prefix}' is not a section; it has no key '{name}'")
            raise _unknown_key(cls, section, name, f"{where} {item!r}", prefix)
        tp = _hints(section)[name]
        prefix = f"{prefix}.{name}" if prefix else name
        if i == len(parts) - 1:
            value = _parse_override_value(text, tp)
            convert(value, tp, f"{where} {item!r}", prefix, cls)  # type check now, for a precise message
            node[name] = value
            return
        inner, _ = _split_optional(tp)
        if typing.get_origin(inner) in (dict, Mapping):  # free-form mapping: the rest is its key
            sub = node.get(name) or {}
            sub[".".join(parts[i + 1:])] = _parse_override_value(text, Any)
            node[name] = sub
            return
        if not isinstance(node.get(name), dict):
            node[name] = {}  # absent or null section: start from its defaults
        section, node = inner, node[name]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (None = all defaults), apply `key=value` overrides, build and validate."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "<defaults>"
    for item in overrides:
        apply_override(cls, data, item)
    return build(cls, data, where)


def dump_recipe(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=100)
