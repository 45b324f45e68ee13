"""Typed configs: TOML file -> nested dataclasses, CLI overrides, and back to TOML.

A config is a dataclass whose fields are scalars (int, float, bool, str), Optional[...],
list[...] / tuple[X, ...] of those, Literal[...] choices, or nested dataclasses (one TOML
[section] each). Loading is strict so that a typo never silently trains the wrong model:

* an unknown key is an error naming the dotted key and the closest valid keys;
* a wrongly typed value is an error naming the key, the expected type and the value (for a
  Literal field, the values it takes): a choice is declared as a Literal and checked only here;
* an int is accepted where a float is expected (``lr = 1`` means 1.0).

``@sectioned`` declares a config made of sections (each field a config dataclass, defaulting
to its defaults); ``check_choices`` checks the Literal fields of a config built in code.

Overrides look like ``section.field=value``; the value is read as a TOML literal when it
parses as one that fits the field (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``) and as
a plain string otherwise, so ``train.name=run7`` needs no quotes. ``none`` / ``null``
set an Optional field to None. A list field also takes ``a,b,c`` without brackets.

``dump_toml`` writes the resolved config back (runs save it next to their checkpoints);
``load_config(cls, path_of_dump) == cfg`` holds. TOML has no null: a None field is left
out of the file, which round-trips when the field's default is None.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from titans_scale.errors import ConfigError
from titans_scale.io.atomic import write_text_atomic

T = TypeVar("T")

_FIX = "fix it in the TOML file or pass the override {field}={value}"


class _Raw:
    """An override's value text, typed only once the target field's type is known."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


# ----------------------------------------------------------------------------- types


def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # locally defined classes with string annotations: use raw types
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        if isinstance(tp, str):
            raise TypeError(f"{cls.__name__}.{f.name}: cannot resolve annotation {tp!r}; "
                            "define the config dataclass at module level")
        out[f.name] = tp
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass_type(tp):
        return f"a table ({tp.__name__})"
    if _is_union(tp):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or none" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return f"{value!r} ({type(value).__name__})"


def _choices(tp: Any) -> tuple:
    """The values a Literal field (or an Optional Literal) allows; () for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if _is_union(tp):
        return tuple(c for a in typing.get_args(tp) for c in _choices(a))
    return ()


def _allows(choices: tuple, value: Any) -> bool:
    # type(c) check: True == 1 and 1 == 1.0 must not pass for each other.
    return any(value == c and type(value) is type(c) for c in choices)


def _one_of(choices: typing.Iterable) -> str:
    """'a, b or c': the choices of a field as a message names them."""
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    field, item = key.partition("[")[0], "[" in key       # an item of a list is overridden with the list
    fix = _FIX.format(field=field, value="[...]" if item else "VALUE")
    if _choices(tp):
        fix += f" ({'each item' if item else 'VALUE'}: {_one_of(_choices(tp))})"
    return ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_got(value)}; {fix}")


# ------------------------------------------------------------------------- declaring


def sectioned(cls: type[T]) -> type[T]:
    """``@dataclass`` for a config made of [sections]: each field is a config dataclass and
    defaults to that class's defaults (``model: ModelConfig`` means
    ``model: ModelConfig = field(default_factory=ModelConfig)``)."""
    hints = typing.get_type_hints(cls)
    for name in cls.__annotations__:
        if not _is_dataclass_type(hints[name]):
            raise TypeError(f"{cls.__name__}.{name}: a sectioned config holds only config dataclasses")
        if name not in cls.__dict__:
            setattr(cls, name, dataclasses.field(default_factory=hints[name]))
    return dataclasses.dataclass(cls)


def check_choices(cfg: Any, name: typing.Callable[[str], str] = str) -> None:
    """ConfigError for a Literal field of the dataclass `cfg` holding a value it does not allow:
    the loader checks that for TOML and overrides, this for a config built in code.
    name(field) is how the message names the field (a config key, a command-line flag)."""
    for f, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, f)
        if _choices(tp) and not _allows(_choices(tp), value) and not (value is None and _accepts_none(tp)):
            raise ConfigError(f"{name(f)}: {value!r} is not known; use {_one_of(_choices(tp))}")


# ------------------------------------------------------------------------ conversion


def _convert(value: Any, tp: Any, key: str, root: type) -> Any:
    """Check `value` (a TOML value or an override's _Raw) against `tp`; return the typed value."""
    if isinstance(value, _Raw):
        return _convert_raw(value.text, tp, key, root)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return _from_dict(tp, value, key, root)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, root)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        if _allows(args, value):
            return value
        raise _type_error(key, tp, value)
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if origin is list:
            return [_convert(v, args[0] if args else Any, f"{key}[{i}]", root) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", root) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise _type_error(key, tp, value)
        return tuple(_convert(v, a, f"{key}[{i}]", root) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config key '{key}': unsupported field type {tp!r} in the config dataclass")
    raise _type_error(key, tp, value)


def _parse_toml_value(text: str) -> tuple[bool, Any]:
    try:
        return True, tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        return False, None


def _accepts_none(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _convert_raw(text: str, tp: Any, key: str, root: type) -> Any:
    """An override's value: none/null, then a TOML literal, then a list shorthand, then a string."""
    if _accepts_none(tp) and text.strip().lower() in ("none", "null"):
        return None
    ok, parsed = _parse_toml_value(text)
    literal_error = None
    if ok:
        try:
            return _convert(parsed, tp, key, root)
        except ConfigError as e:
            literal_error = e
    if not ok:  # Python float spellings TOML lacks, such as .5 or 1.e-3
        try:
            return _convert(float(text), tp, key, root)
        except (ValueError, ConfigError):
            pass
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and not text.strip().startswith("["):
        items = [] if not text.strip() else [_Raw(t.strip()) for t in text.split(",")]
        return _convert(items, tp, key, root)
    try:
        return _convert(text, tp, key, root)
    except ConfigError:
        # not a string either: the TOML value's error says more (e.g. which list item is wrong)
        if literal_error is not None:
            raise literal_error from None
        raise


# ------------------------------------------------------------------------- loading


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class: sections and leaves."""
    keys = []
    for name, tp in _field_types(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if _is_dataclass_type(tp):
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _unknown_key(dotted: str, section_cls: type, section: str, root: type) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    local = _field_types(section_cls)
    prefix = f"{section}." if section else ""
    matches = [prefix + m for m in difflib.get_close_matches(name, list(local), n=3, cutoff=0.6)]
    # the same name in another section: a key put under the wrong [section]
    for m in _all_keys(root):
        leaf = m.rsplit(".", 1)[-1]
        if m not in matches and difflib.SequenceMatcher(None, name, leaf).ratio() >= 0.8:
            matches.append(m)
    where = f"[{section}]" if section else "the top level"
    if matches:
        hint = "did you mean " + " or ".join(f"'{m}'" for m in matches[:3]) + "?"
    else:
        hint = f"valid keys in {where}: {', '.join(local) or '(none)'}"
    return ConfigError(f"unknown config key '{dotted}'; {hint}")


def _from_dict(cls: type[T], data: dict, prefix: str, root: type) -> T:
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in types_:
            raise _unknown_key(dotted, cls, prefix, root)
        kwargs[name] = _convert(value, types_[name], dotted, root)
    for f in dataclasses.fields(cls):
        if (f.init and f.name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            where = f"[{prefix}]" if prefix else "the top level"
            raise ConfigError(f"config key '{dotted}' is required; add it to {where} of the TOML "
                              f"file or pass {dotted}=VALUE")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a __post_init__ check
        raise ConfigError(f"config section '{prefix or cls.__name__}': {e}") from None


def config_from_dict(cls: type[T], data: dict) -> T:
    """Build a config from plain nested dicts (as tomllib returns), strictly checked."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict: {cls!r} is not a dataclass type")
    return _from_dict(cls, data, "", cls)


def apply_override(cls: type, data: dict, override: str) -> None:
    """Write one ``a.b.c=value`` override into the raw dict `data` (checked against `cls`)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}' must look like section.field=value")
    parts = key.split(".")
    section_cls, node = cls, data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        section = ".".join(parts[:i])
        types_ = _field_types(section_cls)
        if part not in types_:
            raise _unknown_key(dotted, section_cls, section, cls)
        if i == len(parts) - 1:
            node[part] = _Raw(text)
            return
        if not _is_dataclass_type(types_[part]):
            raise ConfigError(f"override '{override}': '{dotted}' is a value, not a section; "
                              f"use {dotted}=VALUE")
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        section_cls, node = types_[part], child


def _is_sectioned(cls: type) -> bool:
    """A config made of [sections] only (``@sectioned``)."""
    types_ = _field_types(cls)
    return bool(types_) and all(_is_dataclass_type(tp) for tp in types_.values())


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Read `path` (TOML; None = all defaults), apply `overrides`, return a checked `cls`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found; pass the path of an existing .toml file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid TOML ({e}); fix its syntax") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{p}' is not UTF-8 text; save it as UTF-8") from None
        if not data and _is_sectioned(cls):
            # Most likely the wrong or a truncated file: refused rather than trained on all defaults.
            raise ConfigError(f"config file '{p}' is empty (no [section] in it): every setting would silently "
                              "take its default; add the sections you mean (an empty [train] table keeps "
                              "the defaults on purpose)")
    for ov in overrides:
        apply_override(cls, data, ov)
    return config_from_dict(cls, data)


# ------------------------------------------------------------------------- writing


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists of a config (None values kept; tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX ...) are all valid TOML; DEL must be escaped too.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # always has '.' or 'e', so it reads back as a float
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, f"{key}[{i}]") for i, x in enumerate(v)) + "]"
    if v is None:
        raise ConfigError(f"config key '{key}': TOML has no null; None can only be saved for "
                          "Optional fields whose default is None")
    raise ConfigError(f"config key '{key}': cannot write {type(v).__name__} values to TOML")


def _emit(cfg: Any, path: list[str], lines: list[str]) -> None:
    scalars, tables = [], []
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        dotted = ".".join(path + [f.name])
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            tables.append((f.name, v))
        elif v is None and f.default is None:
            continue  # left out: loading restores the default None
        else:
            scalars.append(f"{_toml_key(f.name)} = {_toml_value(v, dotted)}")
    if path and (scalars or not tables):
        if lines:
            lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    lines.extend(scalars)
    for name, sub in tables:
        _emit(sub, path + [name], lines)


def dump_toml(cfg: Any) -> str:
    """The config as TOML text; `load_config(type(cfg), file_with_this_text) == cfg`."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"dump_toml: expected a dataclass instance, got {type(cfg).__name__}")
    lines: list[str] = []
    _emit(cfg, [], lines)
    return "\n".join(lines) + "\n"


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write `dump_toml(cfg)` to `path` atomically (a crash never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p, dump_toml(cfg))
    return p


__all__ = ["load_config", "config_from_dict", "apply_override", "config_to_dict", "dump_toml",
           "save_config", "sectioned", "check_choices"]
