"""Stage configs: frozen dataclasses filled from preset YAML plus per-asset overrides.

A preset (`stages/presets/<name>.yaml`) has one section per stage (`model`, `nerf`, `mesh`, `uv`,
`texture`, `edit`, `export`). `build_config(NerfConfig, preset["nerf"], overrides)` turns a section
into a dataclass, recursing into nested dataclass fields and rejecting unknown keys with the list of
valid ones. A config checks its own fields in `__post_init__` (`csd.checks.validate`: options typed
`Literal[...]` and value ranges, raising one `InvalidConfig` with every `(field, why)`);
`build_config` constructs every nested config and gathers what they refuse, each field named by its
dotted path, into one `ConfigError`, so every bad value anywhere in a nested config is reported at
planning, before any model loads.
`config_hash` gives the stable identity used for caching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from csd.checks import InvalidConfig

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A preset, override or config file does not match the stage's config fields.

    `problems` lists `(field, message)` pairs: `field` is the dotted path of the offending field or
    config (`nerf.renderer.background`), or None when the message says where itself."""

    def __init__(self, message: str = "", field: str | None = None, problems: list[tuple[str | None, str]] | None = None):
        self.problems = list(problems) if problems is not None else [(field, message)]
        super().__init__("; ".join(f"{where}: {text}" if where else text for where, text in self.problems))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset `name` (a shipped preset name or a path to a YAML file) as a dict of stage sections."""
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(preset_names())} (or a path to a YAML file)")
    elif not path.exists():
        raise ConfigError(f"preset file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping of stage sections, got {type(data).__name__}")
    return data


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp`; nested configs are built (raising ConfigError for what they refuse)."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping for {tp.__name__}, got {value!r}", field=where)
        return build_config(tp, value, where=where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            if _is_dataclass_type(arg) and isinstance(value, dict):
                return build_config(arg, value, where=where)
    return value


def build_config(cls, data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, where: str | None = None):
    """Instantiate dataclass `cls` from `data` then dotted `overrides` (`{"guidance.null_scale": -1}`).

    Every nested config is built and checked; one ConfigError lists every problem found (`where` is
    the dotted path that names the fields in it, default the class name)."""
    where = where or cls.__name__
    merged: dict[str, Any] = json.loads(json.dumps(data or {}, default=_jsonable))
    for key, value in (overrides or {}).items():
        target = merged
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r} goes through a non-mapping field {part!r}", field=where)
        target[parts[-1]] = value
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(merged) - valid)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}", field=where)
    problems: list[tuple[str | None, str]] = []
    kwargs = {}
    for key, value in merged.items():
        try:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
        except ConfigError as error:
            problems += error.problems
    # built even when a nested config was refused (that field keeps its default), so this config's
    # own problems are reported with the nested ones
    try:
        config = cls(**kwargs)
    except ConfigError as error:
        problems += error.problems
    except InvalidConfig as error:
        problems += [(f"{where}.{name}", why) for name, why in error.problems]
    except (TypeError, ValueError) as error:
        if not problems:  # with a nested config refused, a missing argument is that config's problem
            problems.append((where, str(error)))
    if problems:
        raise ConfigError(problems=problems)
    return config


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not serialisable in a config: {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-safe) dict of a config dataclass, nested dataclasses included."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=_jsonable))


def config_hash(*parts: Any) -> str:
    """Stable short hash of configs / dicts / strings (the stage identity)."""
    payload = json.dumps([config_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (for MLflow params and catalog overrides)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def dump_yaml(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(config) if dataclasses.is_dataclass(config) else config, sort_keys=False))
