"""Load stage configs from JSON into validated dataclasses, with errors that name the key path."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from vlmtrain.config.schema import (
    MODULE_GROUPS,
    ModuleGroupConfig,
    StageConfig,
    ValidationError,
    record_given_keys,
)


class ConfigError(ValueError):
    """A stage config that cannot be used: the message names the file, the key path and the fix."""


def _suggest(key: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}valid keys: {', '.join(valid)}"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}"
        )
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is dict:
        _, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {type(value).__name__}")
        return {k: _convert(v, val_tp, _join(path, k)) for k, v in value.items()}
    if origin is tuple:
        item_types = get_args(tp)
        if len(item_types) == 2 and item_types[1] is Ellipsis:  # tuple[X, ...]: a list of any length
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return tuple(_convert(v, item_types[0], _join(path, i)) for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            raise ConfigError(f"{path}: expected a list of {len(item_types)} values, got {value!r}")
        return tuple(
            _convert(v, t, _join(path, i)) for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        )
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = list(fields)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{_join(path, key)}: unknown key; {_suggest(key, valid)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")
    section = cls(**kwargs)
    # What the user wrote, apart from the defaults: a stage with init_from checks only these model keys.
    record_given_keys(section, frozenset(data))
    return section


def stage_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> StageConfig:
    """Build and validate a StageConfig; errors name `source` and the key path."""
    try:
        modules = data.get("modules") if isinstance(data, dict) else None
        if isinstance(modules, dict):
            for group in modules:
                if group not in MODULE_GROUPS:
                    raise ConfigError(
                        f"modules.{group}: unknown module group; {_suggest(group, MODULE_GROUPS)}"
                    )
        cfg = _build(StageConfig, data, "")
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: {err}") from None
    assert all(isinstance(m, ModuleGroupConfig) for m in cfg.modules.values())
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word such as `causal` is a string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with `key.path=value` overrides applied (values parsed as JSON when possible)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. optim.weight_decay=0.1")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not an object")
        node[parts[-1]] = _parse_value(raw)
    return out


def shipped_stage_path(stage: int | str) -> Path:
    """Path of a stage preset shipped with the package (stage0 ... stage3)."""
    name = f"stage{stage}" if isinstance(stage, int) or str(stage).isdigit() else str(stage)
    path = Path(str(resources.files("vlmtrain") / "stages" / f"{name}.json"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ConfigError(f"no shipped stage config named {name!r}; shipped: {', '.join(shipped)}")
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a stage config is a JSON object, got {type(data).__name__}")
    return data


def load_stage_config(
    stage: int | str | None = None, config: str | Path | None = None, overrides: list[str] | None = None
) -> StageConfig:
    """Load a stage config: `config` if given, else the shipped preset for `stage`; then apply overrides."""
    if config is None and stage is None:
        raise ConfigError("give a stage number (--stage N) or a config file (--config FILE)")
    path = Path(config) if config is not None else shipped_stage_path(stage)  # type: ignore[arg-type]
    data = apply_overrides(read_json(path), overrides or [])
    return stage_config_from_dict(data, source=str(path))


def config_changes(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-JSON configs (a resumed stage against its output)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            change
            for key in sorted(set(saved) | set(current), key=str)
            for change in config_changes(saved.get(key), current.get(key), f"{prefix}{key}.")
        ]
    return [] if saved == current else [f"{prefix[:-1]}: {saved!r} -> {current!r}"]


# The file a stage writes beside its weights: the resolved stage config it trained with (resume, init checks, eval).
STAGE_CONFIG_NAME = "stage_config.json"


def stage_config_to_dict(cfg: StageConfig) -> dict[str, Any]:
    """Plain-JSON form of a config (the resolved config written next to a stage's output)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
