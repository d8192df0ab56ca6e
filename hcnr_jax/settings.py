"""Settings dataclasses from YAML files and flags: one reader and one type check for every config
(`RepairConfig`, `TrainConfig`), so a YAML value of the wrong type is a message naming the file and
the field, never a TypeError from deep inside a run."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError


def user_set(name: str, flag_value: Any, config: str | Path | None) -> bool:
    """Whether the user chose setting ``name`` (a flag, or a key of the ``config`` YAML file)
    rather than leaving the default."""
    return flag_value is not None or (config is not None and name in read_yaml_mapping(config))


# Example settings files installed with the package, addressable by name (`--config train_task`).
CONFIGS_DIR = Path(__file__).resolve().parent / "bundled" / "configs"


def bundled_configs() -> list[str]:
    """Names of the shipped settings files (``hcnr_default``, ``train_task``, ...)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else the shipped settings file of that name (``train_task``
    or ``train_task.yaml``), so the examples work outside a checkout; else an error listing them."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    shipped = CONFIGS_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    raise HcnrError(f"{p}: config file not found, and not the name of a shipped one ({', '.join(bundled_configs())})")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping of settings in a YAML file, a path or a shipped file's name (`config_path`;
    empty file: {}); errors name the file."""
    import yaml

    p = config_path(path)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HcnrError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise HcnrError(f"{p}: cannot read as YAML ({e})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise HcnrError(f"{p}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


def coerce_fields(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` checked against the dataclass ``cls``: unknown keys are an error, and each value
    is converted to its field's type (YAML reads ``1e-4`` as a string and ``1`` as an int), with
    an error naming the field when it cannot be. Floats must be finite."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HcnrError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is not tuple and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        origin = typing.get_origin(base)
        try:
            if value is None and optional:
                out[name] = None
            elif origin is tuple:
                items = value.split(",") if isinstance(value, str) else value
                if not isinstance(items, (list, tuple)):
                    raise TypeError
                out[name] = tuple(str(x).strip() for x in items)
            elif origin is not None and issubclass(origin, Mapping):
                if not isinstance(value, Mapping):
                    raise TypeError
                out[name] = dict(value)
            elif isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
                raise TypeError
            elif base is int:
                if isinstance(value, float) and not value.is_integer():
                    raise TypeError
                out[name] = int(value)
            elif base is float:
                out[name] = float(value)
                if not math.isfinite(out[name]):
                    raise ValueError
            else:
                out[name] = str(value)
        except (TypeError, ValueError, OverflowError):
            kind = getattr(base, "__name__", str(base))
            raise HcnrError(f"{source}: {name}={value!r} is not a valid {kind}"
                            + (" (finite)" if base is float else "")) from None
    return out


class Settings:
    """Mixin of the settings dataclasses: defaults <- YAML file <- flags, each step type-checked
    (``coerce_fields``) and validated (the subclass's ``validate``)."""

    def validate(self) -> Any:
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values: tuples as lists, mappings as dicts."""
        return {k: list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> Any:
        return cls(**coerce_fields(cls, values, source)).validate()

    def override(self, **changes: Any) -> Any:
        """A copy with the non-None ``changes`` applied (flags over the YAML file)."""
        return type(self).from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Any:
        """Defaults <- YAML file ``path`` (a mapping of settings) <- non-None ``overrides``, each
        layer type-checked on its own (errors name the file) and the result validated once (a
        flag may change a setting that another YAML setting depends on, e.g. the solver of
        ``solver_options``)."""
        values = {} if path is None else coerce_fields(cls, read_yaml_mapping(path), str(path))
        flags = coerce_fields(cls, {k: v for k, v in overrides.items() if v is not None}, "overrides")
        return cls(**{**values, **flags}).validate()
